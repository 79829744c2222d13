"""Multi-head latent attention (DeepSeek-AI 2024, "DeepSeek-V2", section 2.1), a drop-in for
``research.attention.gqa.GQAttention`` in a decoder such as research.models.llama.

With hidden size D, H query heads and the dims of ``MLAConfig``:

    c_q = W_qa x  (r_q)              q = W_qb c_q  -> per head [q_nope (d_n) ; q_pe (d_r)]
    [c_kv ; k_pe] = W_kva x  (r_kv + R d_r)         [k_nope (d_n) ; v (d_v)] = W_kvb c_kv per head
    q_pe, k_pe <- RoPE;  score_h = (q_nope_h . k_nope_h + q_pe_h . k_pe_{g(h)}) * scale
    y = W_o concat_h(softmax(score_h) v_h)

(r_q = 0: no query compression, q = W_q x.) With ``latent_norm`` (DeepSeek's layout) c_q and
c_kv pass an RMSNorm with a learnt gain before W_qb / W_kvb; the cache holds the normed c_kv.
``k_pe`` has R heads: R = 1 is DeepSeek's single shared RoPE key; R = the former KV heads keeps GQA's per-group RoPE keys (MHA2MLA), and query head
h uses RoPE key g(h) = h // (H / R). The KV cache holds only c_kv and k_pe: r_kv + R d_r numbers
per token and layer.

Decode reads the cache one of two ways, with the same result: "naive" re-expands k_nope and v
through W_kvb at every step; "absorbed" folds W_UK (the k_nope block of W_kvb) into the query and
W_UV (the v block) into the output and attends over the latent directly (``ops.mla_absorbed``).
Prefill (more than one query) always takes the naive path, which costs fewer FLOPs there.

RoPE frequencies are per layer and per RoPE head (``rope_inv_freq``, (R, d_r / 2), not trained),
since upcycling keeps different frequency pairs of the original heads in each layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from research.attention.rope import apply_rope, inverse_frequencies
from research.attention.layers import RMSNorm, head_output, head_projection, linear, write_cache

MLA_DECODE = ("absorbed", "naive")
LATENT_NORM_EPS = 1e-6  # DeepSeek-V3's q_a_layernorm / kv_a_layernorm eps (fixed in transformers)


class RopeFrequencies(nnx.Variable):
    """RoPE inverse frequencies of one layer: state, not an nnx.Param, so never trained."""


@dataclass(frozen=True)
class MLAConfig:
    kv_rank: int                 # r_kv
    rope_dim: int                # d_r (even): RoPE dims per head
    nope_dim: int                # d_n: non-RoPE query/key dims per head
    v_dim: int                   # d_v
    q_rank: int = 0              # r_q; 0 = no query compression
    rope_heads: int = 1          # R: 1 = one shared RoPE key; num_kv_heads = one per former KV head
    latent_norm: bool = False    # RMSNorm on c_q and c_kv (DeepSeek; X-EcoMLA's target "deepseek_v3")
    latent_norm_eps: float = LATENT_NORM_EPS
    decode: str = "absorbed"     # absorbed | naive
    scale: float = 0.0           # 0 = (d_n + d_r)^-1/2

    def __post_init__(self):
        if self.rope_dim % 2 or self.rope_dim < 2 or self.nope_dim < 0:
            raise ValueError(f"MLA needs an even rope_dim >= 2 and nope_dim >= 0, got {self.rope_dim}, {self.nope_dim}")
        if min(self.kv_rank, self.v_dim, self.rope_heads) < 1 or self.q_rank < 0:
            raise ValueError(f"MLA kv_rank, v_dim and rope_heads must be >= 1 and q_rank >= 0: {self}")
        if self.decode not in MLA_DECODE:
            raise ValueError(f"unknown MLA decode {self.decode!r}; choose one of: {', '.join(MLA_DECODE)}")

    @property
    def qk_dim(self) -> int:
        return self.nope_dim + self.rope_dim

    def attention_scale(self) -> float:
        return self.scale or self.qk_dim ** -0.5


class MLAttention(nnx.Module):
    """MLA in place of GQAttention: (B, T, D) -> (B, T, D); cache {"c_kv": (B, S, r_kv),
    "k_pe": (B, S, R, d_r)}. Kernels: q (D, H, d_n + d_r) or q_a (D, r_q) and q_b (r_q, H, d_n + d_r);
    kv_a (D, r_kv + R d_r); kv_b (r_kv, H, d_n + d_v); o (H, d_v, D)."""

    def __init__(self, config, mla: MLAConfig, *, rngs: nnx.Rngs):
        """``config``: the decoder's architecture (see research.attention.layers)."""
        c, m = config, mla
        dtype = c.compute_dtype
        if c.num_heads % m.rope_heads:
            raise ValueError(f"num_heads {c.num_heads} is not a multiple of rope_heads {m.rope_heads}")
        self.num_heads, self.mla = c.num_heads, m
        h = c.num_heads
        heads = ("q_heads", "head_dim")
        if m.q_rank:
            self.q_a = linear(c.dim, m.q_rank, ("embed", None), dtype, rngs)
            self.q_norm = RMSNorm(m.q_rank, m.latent_norm_eps) if m.latent_norm else None
            self.q_b = head_projection(m.q_rank, h, m.qk_dim, (None, *heads), dtype, rngs)
        else:
            self.q = head_projection(c.dim, h, m.qk_dim, ("embed", *heads), dtype, rngs)
        self.kv_a = linear(c.dim, m.kv_rank + m.rope_heads * m.rope_dim, ("embed", None), dtype, rngs)
        self.kv_norm = RMSNorm(m.kv_rank, m.latent_norm_eps) if m.latent_norm else None
        self.kv_b = head_projection(m.kv_rank, h, m.nope_dim + m.v_dim, (None, *heads), dtype, rngs)
        self.o = head_output(h, m.v_dim, c.dim, (*heads, "embed"), dtype, rngs)
        freqs = inverse_frequencies(m.rope_dim, c.rope_theta, c.rope_scaling)
        self.rope_inv_freq = RopeFrequencies(jnp.tile(jnp.asarray(freqs, jnp.float32), (m.rope_heads, 1)))

    def cache_values_per_token(self) -> int:
        return self.mla.kv_rank + self.mla.rope_heads * self.mla.rope_dim

    def init_cache(self, batch: int, length: int, dtype) -> dict[str, jax.Array]:
        m = self.mla
        return {"c_kv": jnp.zeros((batch, length, m.kv_rank), dtype),
                "k_pe": jnp.zeros((batch, length, m.rope_heads, m.rope_dim), dtype)}

    def queries(self, x):
        """x (B, T, D) -> q_nope (B, T, H, d_n), q_pe (B, T, H, d_r) before RoPE."""
        m = self.mla
        if m.q_rank:
            c_q = self.q_a(x)
            q = self.q_b(self.q_norm(c_q) if self.q_norm is not None else c_q)
        else:
            q = self.q(x)
        return q[..., :m.nope_dim], q[..., m.nope_dim:]

    def latent(self, x):
        """x (B, T, D) -> c_kv (B, T, r_kv), k_pe (B, T, R, d_r) before RoPE: what the cache stores."""
        m = self.mla
        kv = self.kv_a(x)
        c_kv = kv[..., :m.kv_rank]
        if self.kv_norm is not None:
            c_kv = self.kv_norm(c_kv)
        return c_kv, kv[..., m.kv_rank:].reshape(*x.shape[:2], m.rope_heads, m.rope_dim)

    def up_projections(self):
        """W_UK (r_kv, H, d_n) and W_UV (r_kv, H, d_v): the blocks of W_kvb."""
        m = self.mla
        w = self.kv_b.kernel[...]
        return w[..., :m.nope_dim], w[..., m.nope_dim:]

    def __call__(self, x, positions, cache, ops):
        m = self.mla
        t = x.shape[1]
        q_nope, q_pe = self.queries(x)
        c_kv, k_pe = self.latent(x)
        inv_freq = self.rope_inv_freq[...]
        q_pe = apply_rope(q_pe, positions, inv_freq)
        k_pe = apply_rope(k_pe, positions, inv_freq)
        kv_positions = positions
        if cache is not None:
            cache = {"c_kv": write_cache(cache["c_kv"], c_kv, positions),
                     "k_pe": write_cache(cache["k_pe"], k_pe, positions)}
            c_kv, k_pe, kv_positions = cache["c_kv"], cache["k_pe"], None
        scale = m.attention_scale()
        if t == 1 and m.decode == "absorbed":
            w_uk, w_uv = self.up_projections()
            q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk.astype(q_nope.dtype))
            o_latent = ops.mla_absorbed(q_latent, q_pe, c_kv, k_pe, positions, kv_positions, scale=scale)
            y = jnp.einsum("bthr,rhv->bthv", o_latent, w_uv.astype(o_latent.dtype))
        else:
            kv = self.kv_b(c_kv)  # (B, S, H, d_n + d_v)
            k_nope, v = kv[..., :m.nope_dim], kv[..., m.nope_dim:]
            y = ops.mla(q_nope, q_pe, k_nope, k_pe, v, positions, kv_positions, scale=scale)
        return self.o(y), cache


def set_mla_decode(model: nnx.Module, decode: str) -> None:
    """Switches every MLA layer of ``model`` to the "absorbed" or "naive" decode path (in place)."""
    if decode not in MLA_DECODE:
        raise ValueError(f"unknown MLA decode {decode!r}; choose one of: {', '.join(MLA_DECODE)}")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MLAttention):
            node.mla = dataclasses.replace(node.mla, decode=decode)
