"""X-EcoMLA upcycling (Li et al. 2025, "X-EcoMLA: Upcycling Pre-Trained Attention into MLA"):
turn the GQA/MHA layers of a pretrained research.models.llama model into MLA layers by SVD.

For each layer, with W_q (H d_h, D), W_k, W_v (K d_h, D) in (out, in) form and g = H / K:

1. RoPE dims. Each head keeps d_r = 2 n RoPE dims and d_n = d_h - d_r non-RoPE dims.
   ``rope_mode="split"`` is the reference's choice: the last d_r dims of each head, rotated with
   fresh frequencies of a d_r-dim RoPE (a warm start, not the same function). The other modes keep
   n whole frequency pairs (i, i + d_h/2) with their original (Llama-3-scaled) frequencies, as
   MHA2MLA (Ji et al. 2025) does: "high" / "low" frequencies, "uniform" (evenly spaced) or "2norm"
   (largest calibration mean of |q_pair| |k_pair|). Keeping all pairs then changes nothing.
   ``rope_key="shared"`` makes one RoPE key, the mean over KV heads of W_k's RoPE rows (the
   reference, DeepSeek's layout); "shared_fit" fits that one key to the calibration RoPE scores
   (``fit_shared_rope_key``); "per_kv_head" keeps one per KV head (exact, R = K more cache).
2. Query: the per-head rows reordered to [non-RoPE ; RoPE]; with r_q > 0, W_q ~ U_r (U_r^T W_q):
   W_qa = U_r^T W_q = S_r V_r^T and W_qb = U_r.
3. Keys and values: W_k and W_v repeat-interleaved g times to H heads and stacked per head as
   [k_nope_h ; v_h]; one joint factorisation W_kv ~ U_r (U_r^T W_kv) gives W_kva's latent rows
   U_r^T W_kv and W_kvb = U_r. (``kv_svd_rows="all"`` also puts the RoPE rows of the K block into
   the SVD, as the reference does, and drops them from U_r after: rank then goes to rows no one uses.)
4. o_proj, the MLP, norms and embeddings are copied.

Ranks: fixed (``kv_rank``, ``q_rank``), or per layer from an energy threshold (``rank_energy``:
the smallest r with sum_{i<=r} s_i^2 >= rank_energy * sum_i s_i^2, rounded up to a multiple of 8),
with ``fixed_rank_layers`` kept at the fixed rank (the reference keeps the first and last).

Activation-aware (TransMLA-style): with calibration inputs X (N, D) of the layer and
C = X^T X / N = L L^T, U_r is taken from the SVD of W L instead of W, which minimises
||(W - U_r U_r^T W) X^T||_F, the error on the actual activations, rather than on the weights.

Target "deepseek_v3" builds what stock DeepSeek-V3 code runs (transformers, vLLM, SGLang;
``research.models.deepseek_hf`` exports it): every layer MLA at one rank, one shared RoPE key, a
standard RoPE at one theta ("uniform" keeps pairs i * (d_h / d_r): theta itself; "high" keeps the
first d_r / 2 pairs: theta^(d_r / d_h); "split": theta), and DeepSeek's RMSNorm on the latents c_kv
(and c_q when r_q > 0). That norm divides each token's latent by the token's own RMS, which no
weight can undo, so the student carries it from the start: its gain is the per-channel
least-squares fit, on calibration inputs, of the normed latent n_t = c_t / rms(c_t) to c_t,

    g_j = sum_t c_tj n_tj / sum_t n_tj^2,

which (W_kvb = U_r has orthonormal columns, with ``kv_svd_rows="used"``) also minimises the error
of every head's [k_nope ; v];
the layer-wise reconstruction and KD then train with the norm in place.

Hybrid models keep ``gqa_layers`` as GQA; ``auto_gqa_layers = k`` keeps the k layers whose KV
factorisation has the largest relative error ||(W_kv - U_r U_r^T W_kv) L||_F / ||W_kv L||_F.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
import itertools
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.attention.mla import LATENT_NORM_EPS, MLAConfig, MLAttention
from research.attention.ops import attention_ops
from research.attention.rope import inverse_frequencies
from research.attention.gqa import GQAttention
from research.core import config as config_lib
from research.core.params import set_param, zeros_module

if TYPE_CHECKING:  # upcycling works on the model it is handed; it imports no model
    from research.models.llama import Llama

DEEPSEEK_ROPE_KEYS = ("shared", "shared_fit")
DEEPSEEK_ROPE_MODES = ("uniform", "high", "split")  # one standard RoPE for every layer (see the docstring)


@dataclasses.dataclass(frozen=True)
class UpcycleConfig:
    """How each GQA layer becomes MLA; the ``upcycle`` section of configs/x_ecomla.py."""
    kv_rank: int = 128                    # r_kv (fixed rank, or the rank of fixed_rank_layers)
    q_rank: int = 0                       # r_q; 0 = W_q kept whole (no query compression)
    rope_dim: int = 32                    # d_r per head, even, <= head_dim
    rope_mode: Literal["split", "high", "low", "uniform", "2norm"] = "2norm"
    rope_key: Literal["shared", "shared_fit", "per_kv_head"] = "shared"  # shared_fit: see fit_shared_rope_key
    rank_energy: float = 0.0              # > 0: per-layer ranks keeping this fraction of sigma^2
    fixed_rank_layers: tuple[int, ...] = ()  # kept at kv_rank under rank_energy
    activation_aware: bool = False        # factor W L (L L^T = calibration input covariance) instead of W
    kv_svd_rows: Literal["used", "all"] = "used"  # all: the reference's SVD also factors the RoPE rows
    gqa_layers: tuple[int, ...] = ()      # layers that stay GQA
    auto_gqa_layers: int = 0              # and this many more, by largest KV factorisation error
    target: Literal["mla", "deepseek_v3"] = "mla"  # deepseek_v3: what stock DeepSeek-V3 code can run (below)

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "kv_rank", self.kv_rank >= 1, "a positive int")
        config_lib.require(self, "q_rank", self.q_rank >= 0, "an int >= 0 (0 = no query compression)")
        config_lib.require(self, "rope_dim", self.rope_dim >= 2 and self.rope_dim % 2 == 0, "an even int >= 2")
        config_lib.require(self, "rank_energy", 0 <= self.rank_energy <= 1, "a fraction in [0, 1]")
        config_lib.require(self, "auto_gqa_layers", self.auto_gqa_layers >= 0, "an int >= 0")
        if self.target == "deepseek_v3":  # one layout for every layer, one RoPE key, standard frequencies
            why = "for target 'deepseek_v3'"
            config_lib.require(self, "rope_key", self.rope_key in DEEPSEEK_ROPE_KEYS,
                               f"one of {', '.join(DEEPSEEK_ROPE_KEYS)} {why} (one shared RoPE key per token)")
            config_lib.require(self, "rope_mode", self.rope_mode in DEEPSEEK_ROPE_MODES,
                               f"one of {', '.join(DEEPSEEK_ROPE_MODES)} {why} (a standard RoPE at one theta)")
            config_lib.require(self, "rank_energy", self.rank_energy == 0, f"0 {why} (one rank for every layer)")
            config_lib.require(self, "gqa_layers", not self.gqa_layers, f"() {why} (every layer MLA)")
            config_lib.require(self, "auto_gqa_layers", self.auto_gqa_layers == 0, f"0 {why} (every layer MLA)")

    def validate(self, head_dim: int, num_layers: int) -> None:
        """The checks that need the model: rope_dim <= head_dim, layer indices in range."""
        def fail(msg):
            raise ValueError(f"upcycle: {msg}")
        if self.rope_dim > head_dim:
            fail(f"rope_dim must be even and in [2, head_dim={head_dim}], got {self.rope_dim}")
        if self.target == "deepseek_v3" and self.rope_mode == "uniform" and (head_dim // 2) % (self.rope_dim // 2):
            fail(f"rope_mode 'uniform' for target 'deepseek_v3' needs rope_dim / 2 to divide head_dim / 2 = "
                 f"{head_dim // 2} (evenly spaced pairs are then a standard RoPE), got rope_dim {self.rope_dim}")
        bad = [i for i in (*self.gqa_layers, *self.fixed_rank_layers) if not 0 <= i < num_layers]
        if bad or not 0 <= self.auto_gqa_layers + len(set(self.gqa_layers)) <= num_layers:
            fail(f"layer indices must lie in [0, {num_layers}) and GQA layers be at most {num_layers}: {self}")


ROPE_MODES = config_lib.choices(UpcycleConfig, "rope_mode")
ROPE_KEYS = config_lib.choices(UpcycleConfig, "rope_key")
KV_SVD_ROWS = config_lib.choices(UpcycleConfig, "kv_svd_rows")


# ----------------------------------------------------------------------------- RoPE pair choice
def select_rope_pairs(mode: str, num_pairs: int, half: int, scores: np.ndarray | None = None) -> np.ndarray:
    """Indices (sorted) of the ``num_pairs`` frequency pairs kept out of ``half`` = d_h / 2.

    Pair i has inverse frequency theta^(-2i/d_h): small i = high frequency. ``scores`` (half,)
    ranks pairs for "2norm"."""
    if mode == "high":
        kept = np.arange(num_pairs)
    elif mode == "low":
        kept = np.arange(half - num_pairs, half)
    elif mode == "uniform":
        kept = np.floor(np.arange(num_pairs) * half / num_pairs).astype(int)
    elif mode == "2norm":
        if scores is None:
            raise ValueError("rope_mode '2norm' needs calibration tokens")
        kept = np.argsort(-scores, kind="stable")[:num_pairs]
    else:
        raise ValueError(f"no pair selection for rope_mode {mode!r}")
    return np.sort(kept)


def _pair_norms(w: np.ndarray, x: np.ndarray, heads: int) -> np.ndarray:
    """Mean over calibration rows of |(y_i, y_{i + d_h/2})| per head and pair: (heads, d_h / 2)."""
    y = (x @ w.T).reshape(len(x), heads, -1)
    a, b = np.split(y, 2, axis=-1)
    return np.sqrt(a * a + b * b).mean(axis=0)


def head_layouts(cfg: UpcycleConfig, head_dim: int, num_groups: int, inv_freq: np.ndarray,
                 rope_theta: float, rope_scaling, pair_scores: np.ndarray | None):
    """Per RoPE group: row order [non-RoPE ; RoPE] of a head (d_h,), and RoPE inv freqs (d_r / 2,)."""
    half, n = head_dim // 2, cfg.rope_dim // 2
    orders, freqs = [], []
    for group in range(num_groups):
        if cfg.rope_mode == "split":
            rope_rows = np.arange(head_dim - cfg.rope_dim, head_dim)
            freq = inverse_frequencies(cfg.rope_dim, rope_theta, rope_scaling)
        else:
            kept = select_rope_pairs(cfg.rope_mode, n, half, None if pair_scores is None else pair_scores[group])
            rope_rows = np.concatenate([kept, kept + half])  # rotate-half layout within d_r
            freq = inv_freq[kept]
        nope_rows = np.setdiff1d(np.arange(head_dim), rope_rows)
        orders.append(np.concatenate([nope_rows, rope_rows]))
        freqs.append(freq)
    return np.stack(orders), np.stack(freqs)


# ----------------------------------------------------------------------------- shared RoPE key
def _complex_pairs(rows: np.ndarray) -> np.ndarray:
    """RoPE rows (..., d_r, D) in rotate-half layout -> complex rows (..., d_r / 2, D): pair p is
    rows p + i (p + d_r / 2), which RoPE at position m multiplies by e^{i theta_p m}."""
    n = rows.shape[-2] // 2
    return rows[..., :n, :] + 1j * rows[..., n:, :]


def _real_rows(pairs: np.ndarray) -> np.ndarray:
    return np.concatenate([pairs.real, pairs.imag], axis=-2)


def fit_shared_rope_key(q_rope: np.ndarray, k_rope: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One RoPE key for all heads, fitted to the grouped RoPE scores on calibration inputs.

    q_rope (H, d_r, D) and k_rope (K, d_r, D) are the RoPE rows of each query and KV head (query
    head h reads KV head j(h) = h // (H / K)); x (N, D) calibration inputs. Returns the shared
    key's rows (d_r, D) and the query RoPE rows (H, d_r, D) rescaled to read it.

    In complex form (``_complex_pairs``) pair p of head h scores Re(q_h(m) conj(k_j(n)) e^{i theta (m-n)}).
    With the shared key k_s = sum_j alpha_j k_j and each query group rescaled by a complex d_j,
    the error averaged over the phase and over independent query and key tokens is, per pair,

        sum_j w_j E|conj(d_j) k_s - k_j|^2 / 2,   w_j = sum_{h: j(h) = j} E|q_h|^2.

    d_j = E[k_s conj(k_j)] / E|k_s|^2 is optimal for any k_s, and then alpha maximises
    alpha^H G W G alpha / alpha^H G alpha with G_jk = E[conj(k_j) k_k], W = diag(w): the top
    generalised eigenvector (a rank-one fit of the query-weighted keys). alpha is rescaled so that
    k_s is the w-weighted least-squares key without query rescaling, so equal keys give k_s = the
    mean and d = 1. The mean (alpha = 1/K, d = 1) is one candidate, so the fitted error is never larger.
    """
    h, k = len(q_rope), len(k_rope)
    group = np.arange(h) // (h // k)
    qz, kz = _complex_pairs(q_rope), _complex_pairs(k_rope)              # (H, n, D), (K, n, D)
    keys = np.einsum("td,kpd->ptk", x, kz)                               # (n, N, K)
    gram = np.einsum("ptj,ptk->pjk", keys.conj(), keys) / len(x)         # (n, K, K) Hermitian
    q_power = (np.abs(np.einsum("td,hpd->pth", x, qz)) ** 2).mean(axis=1)  # (n, H)
    weights = np.stack([q_power[:, group == j].sum(axis=1) for j in range(k)], axis=1)  # (n, K)
    alphas, scales = [], []
    for g, w in zip(gram, weights):
        lam, vec = np.linalg.eigh(g)
        keep = lam > 1e-10 * max(lam.max(), 1e-300)
        if not keep.any():                                               # no signal: keep the mean
            alphas.append(np.full(k, 1 / k, complex)), scales.append(np.ones(k, complex))
            continue
        root = vec[:, keep] * np.sqrt(lam[keep])                         # G = root root^H
        _, beta = np.linalg.eigh(root.conj().T @ np.diag(w) @ root)
        alpha = vec[:, keep] @ (beta[:, -1] / np.sqrt(lam[keep]))        # top eigenvector, in G's range
        alpha = alpha * (w @ (alpha.conj() @ g)) / (w.sum() * np.real(alpha.conj() @ g @ alpha))
        alphas.append(alpha)
        scales.append(g @ alpha / np.real(alpha.conj() @ g @ alpha))
    alphas, scales = np.stack(alphas), np.stack(scales)                  # (n, K)
    shared = np.einsum("pk,kpd->pd", alphas, kz)
    queries = qz * scales.T[group][:, :, None]
    return _real_rows(shared), _real_rows(queries)


# ----------------------------------------------------------------------------- factorisation
def energy_rank(singular_values: np.ndarray, energy: float, multiple: int = 8) -> int:
    """Smallest r with sum_{i<=r} s_i^2 >= energy * sum s_i^2, rounded up to ``multiple``."""
    power = np.cumsum(singular_values.astype(np.float64) ** 2)
    r = int(np.searchsorted(power, energy * power[-1] * (1 - 1e-12)) + 1)
    return int(min(-(-r // multiple) * multiple, len(singular_values)))


def low_rank(w: np.ndarray, rank: int, weight: np.ndarray | None = None, energy: float = 0.0):
    """W (m, D) ~ A B with A = U_r (m, r) from the SVD of W L (L = ``weight``, or I) and B = U_r^T W.

    Returns A, B and the relative error ||(W - A B) L||_F / ||W L||_F."""
    target = w if weight is None else w @ weight
    u, s, _ = np.linalg.svd(target, full_matrices=False)
    r = energy_rank(s, energy) if energy > 0 else min(rank, len(s))
    a = u[:, :r]
    b = a.T @ w
    residual = np.sqrt(max(float((s[r:] ** 2).sum()), 0.0) / max(float((s ** 2).sum()), 1e-30))
    return a, b, residual


def _whitening(x: np.ndarray) -> np.ndarray:
    """L with L L^T = X^T X / N (+ a tiny ridge so that L exists for rank-deficient X)."""
    c = x.T @ x / len(x)
    return np.linalg.cholesky(c + 1e-6 * np.trace(c) / len(c) * np.eye(len(c)))


# ----------------------------------------------------------------------------- calibration
def layer_io(model: Llama, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every layer's attention input (after its RMSNorm), attention output and the residual stream
    entering the layer, on ``tokens`` (B, T): three (L, B, T, D) float32 arrays. ``model`` must be
    all-GQA with one segment."""
    if len(model.segments) != 1:
        raise ValueError("layer_io expects the original all-GQA model (one segment)")
    graphdef, stacked = nnx.split(model.segments[0])
    ops = attention_ops(model.config.attention_impl)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    @jax.jit
    def one_layer(state, x):
        layer = nnx.merge(graphdef, state)
        normed = layer.attn_norm(x)
        attn, _ = layer.attn(normed, positions, None, ops)
        h, _ = layer(x, positions, None, ops)
        return h, normed, attn

    x = model.embed(jnp.asarray(tokens))
    inputs, outputs, residuals = [], [], []
    for i in range(model.config.num_layers):
        residuals.append(np.asarray(x, np.float32))
        x, normed, attn = one_layer(jax.tree.map(lambda v: v[i], stacked), x)
        inputs.append(np.asarray(normed, np.float32))
        outputs.append(np.asarray(attn, np.float32))
    return np.stack(inputs), np.stack(outputs), np.stack(residuals)


# ----------------------------------------------------------------------------- one layer
def upcycle_layer(weights: dict[str, np.ndarray], cfg: UpcycleConfig, config, x: np.ndarray | None,
                  kv_rank: int, q_rank: int, energy: float):
    """MLA parameters (kernels in flattened (in, out) form; set_param splits the heads), the latent
    norms' gains (target "deepseek_v3": "kv_norm" (r_kv,), "q_norm" (r_q,); else none), RoPE
    frequencies and the KV error of one layer.

    weights: "q" (H d_h, D), "k" and "v" (K d_h, D) in (out, in) form; x: calibration inputs or None."""
    h, k, dh = config.num_heads, config.num_kv_heads, config.head_dim
    groups = k if cfg.rope_key == "per_kv_head" else 1
    g = h // k
    dr = cfg.rope_dim
    dn = dh - dr
    wq = weights["q"].reshape(h, dh, -1)
    wk = weights["k"].reshape(k, dh, -1)
    wv = weights["v"].reshape(k, dh, -1)
    scores = None
    if cfg.rope_mode == "2norm":
        if x is None:
            raise ValueError("rope_mode '2norm' needs calibration tokens")
        qn = _pair_norms(weights["q"], x, h).reshape(k, g, -1)      # (K, g, d_h/2)
        kn = _pair_norms(weights["k"], x, k)                        # (K, d_h/2)
        per_kv = (qn * kn[:, None]).sum(axis=1)                     # (K, d_h/2)
        scores = per_kv.sum(axis=0, keepdims=True) if groups == 1 else per_kv
    orders, freqs = head_layouts(cfg, dh, groups, config.inv_freq(), config.rope_theta, config.rope_scaling, scores)
    q_group = np.arange(h) // (h // groups)
    kv_group = np.arange(k) // (k // groups)
    wq = np.stack([wq[i, orders[q_group[i]]] for i in range(h)])   # (H, d_h, D) as [nope ; rope]
    wk = np.stack([wk[j, orders[kv_group[j]]] for j in range(k)])
    if cfg.rope_key == "shared_fit":
        if x is None:
            raise ValueError("rope_key 'shared_fit' needs calibration tokens")
        shared_key, wq[:, dn:] = fit_shared_rope_key(wq[:, dn:], wk[:, dn:], x)
    weight = _whitening(x) if cfg.activation_aware else None

    out = {}
    wq_flat = wq.reshape(h * dh, -1)
    if q_rank:
        a, b, _ = low_rank(wq_flat, q_rank, weight, energy)
        out["q_a"], out["q_b"] = b.T, a.T
    else:
        out["q"] = wq_flat.T

    rep = np.arange(h) // g                                          # query head -> KV head
    k_nope, k_rope = wk[rep, :dn], wk[rep, dn:]                      # (H, d_n, D), (H, d_r, D)
    blocks = [k_nope, k_rope, wv[rep]] if cfg.kv_svd_rows == "all" else [k_nope, wv[rep]]
    stack = np.concatenate(blocks, axis=1)                           # (H, rows, D)
    a, b, err = low_rank(stack.reshape(-1, stack.shape[-1]), kv_rank, weight, energy)
    a = a.reshape(h, stack.shape[1], -1)
    if cfg.kv_svd_rows == "all":
        a = np.concatenate([a[:, :dn], a[:, dn + dr:]], axis=1)      # drop the RoPE rows
    rope_rows = wk[:, dn:]                                           # (K, d_r, D)
    if cfg.rope_key == "shared_fit":
        rope_rows = shared_key
    else:
        rope_rows = rope_rows.mean(axis=0) if groups == 1 else rope_rows.reshape(k * dr, -1)
    out["kv_a"] = np.concatenate([b, rope_rows.reshape(-1, b.shape[1])]).T
    out["kv_b"] = a.reshape(h * (dn + dh), -1).T
    norms = {}
    if cfg.target == "deepseek_v3":
        norms["kv_norm"] = latent_norm_gain(x @ b.T)
        if q_rank:
            norms["q_norm"] = latent_norm_gain(x @ out["q_a"])
    return out, norms, freqs, err


def latent_norm_gain(latent: np.ndarray, eps: float = LATENT_NORM_EPS) -> np.ndarray:
    """Per-channel gain g (r,) with g * n_t closest to c_t in least squares, n_t = c_t / rms(c_t):
    latent (N, r) -> g_j = sum_t c_tj n_tj / sum_t n_tj^2."""
    normed = latent / np.sqrt((latent ** 2).mean(axis=-1, keepdims=True) + eps)
    return (latent * normed).sum(axis=0) / np.maximum((normed ** 2).sum(axis=0), 1e-30)


# ----------------------------------------------------------------------------- whole model
def student_mla_config(cfg: UpcycleConfig, config, kv_rank: int, q_rank: int) -> MLAConfig:
    """The MLAConfig of a layer ``cfg`` upcycles from the decoder ``config`` at these ranks: d_n =
    d_h - d_r, d_v = d_h, R = the KV heads for per-KV-head RoPE keys (else 1), DeepSeek's latent
    norm for target "deepseek_v3"."""
    return MLAConfig(kv_rank=kv_rank, rope_dim=cfg.rope_dim, nope_dim=config.head_dim - cfg.rope_dim,
                     v_dim=config.head_dim, q_rank=q_rank,
                     rope_heads=config.num_kv_heads if cfg.rope_key == "per_kv_head" else 1,
                     latent_norm=cfg.target == "deepseek_v3", latent_norm_eps=LATENT_NORM_EPS)


def layer_runs(kinds: Sequence[Any]) -> list[tuple[Any, list[int]]]:
    """Consecutive runs of equal kinds: ["gqa", "mla", "mla"] -> [("gqa", [0]), ("mla", [1, 2])]."""
    out, start = [], 0
    for kind, group in itertools.groupby(kinds):
        n = len(list(group))
        out.append((kind, list(range(start, start + n))))
        start += n
    return out


def _layer_weights(model: Llama, layer: int) -> dict[str, np.ndarray]:
    """Layer ``layer``'s q, k, v kernels (D, heads, Dh) as (heads * Dh, D) matrices (out, in)."""
    attn = nnx.state(model.segments[0], nnx.Param)["attn"]
    kernels = {name: np.asarray(attn[name]["kernel"][...][layer], np.float64) for name in ("q", "k", "v")}
    return {name: w.reshape(w.shape[0], -1).T for name, w in kernels.items()}


def _get(state, path: Sequence[str]) -> jax.Array:
    for key in path:
        state = state[key]
    return state[...]


def upcycle_gqa_to_mla(model: Llama, cfg: UpcycleConfig, calibration_tokens: np.ndarray | None = None
                       ) -> tuple[Llama, dict[str, Any]]:
    """A new Llama whose attention layers are MLA (hybrid when some stay GQA); ``model`` is unchanged.

    calibration_tokens (B, T) int: needed for rope_mode="2norm", activation_aware and
    auto_gqa_layers. Returns (student, report) with per-layer kinds, ranks and KV errors."""
    config = model.config
    if len(model.segments) != 1 or set(model.layer_kinds) != {"gqa"}:
        raise ValueError("upcycle_gqa_to_mla expects an all-GQA model")
    cfg.validate(config.head_dim, config.num_layers)
    needs_x = (cfg.rope_mode == "2norm" or cfg.activation_aware or cfg.auto_gqa_layers or cfg.rope_key == "shared_fit"
               or cfg.target == "deepseek_v3")
    if needs_x and calibration_tokens is None:
        raise ValueError("upcycle: rope_mode='2norm', rope_key='shared_fit', activation_aware, auto_gqa_layers and "
                         "target='deepseek_v3' need calibration tokens")
    xs = None
    if needs_x:
        inputs = layer_io(model, np.asarray(calibration_tokens))[0]            # (L, B, T, D)
        xs = inputs.reshape(len(inputs), -1, inputs.shape[-1]).astype(np.float64)

    layers = []
    for i in range(config.num_layers):
        fixed = i in cfg.fixed_rank_layers
        energy = 0.0 if fixed else cfg.rank_energy
        params, norms, freqs, err = upcycle_layer(_layer_weights(model, i), cfg, config, None if xs is None else xs[i],
                                           cfg.kv_rank, cfg.q_rank, energy)
        mla = student_mla_config(cfg, config, kv_rank=params["kv_b"].shape[0],
                                 q_rank=params["q_a"].shape[1] if "q_a" in params else 0)
        layers.append(dict(params=params, norms=norms, freqs=freqs, error=err, mla=mla))

    gqa = set(cfg.gqa_layers)
    if cfg.auto_gqa_layers:
        by_error = sorted((i for i in range(config.num_layers) if i not in gqa), key=lambda i: -layers[i]["error"])
        gqa |= set(by_error[:cfg.auto_gqa_layers])
    kinds = ["gqa" if i in gqa else layers[i]["mla"] for i in range(config.num_layers)]

    old_layers = nnx.state(model.segments[0], nnx.Param)
    segments = []
    for kind, idx in layer_runs(kinds):
        if kind == "gqa":
            make_attention = lambda r: GQAttention(config, rngs=r)  # noqa: E731
        else:
            make_attention = lambda r, m=kind: MLAttention(config, m, rngs=r)  # noqa: E731
        segment = zeros_module(lambda: model.stacked_layers(config, make_attention, len(idx), nnx.Rngs(0)))
        state = nnx.state(segment)
        for path in (("attn_norm", "scale"), ("mlp_norm", "scale"), ("mlp", "gate", "kernel"),
                     ("mlp", "up", "kernel"), ("mlp", "down", "kernel"), ("attn", "o", "kernel")):
            set_param(state, path, _get(old_layers, path)[np.asarray(idx)])
        if kind == "gqa":
            for name in ("q", "k", "v"):
                set_param(state, ("attn", name, "kernel"), old_layers["attn"][name]["kernel"][...][np.asarray(idx)])
        else:
            for name in layers[idx[0]]["params"]:
                set_param(state, ("attn", name, "kernel"), np.stack([layers[i]["params"][name] for i in idx]))
            for name in layers[idx[0]]["norms"]:
                set_param(state, ("attn", name, "scale"), np.stack([layers[i]["norms"][name] for i in idx]))
            set_param(state, ("attn", "rope_inv_freq"), np.stack([layers[i]["freqs"] for i in idx]))
        nnx.update(segment, state)
        segments.append(segment)

    student = type(model)(config, rngs=nnx.Rngs(0), segments=segments,
                          layer_kinds=["gqa" if kind == "gqa" else "mla" for kind in kinds])
    student_state = nnx.state(student)
    for path in (("embed", "embedding"), ("norm", "scale")) + ((("lm_head", "kernel"),) if not config.tie_embeddings else ()):
        set_param(student_state, path, _get(nnx.state(model), path))
    nnx.update(student, student_state)
    report = {
        "layer_kinds": list(student.layer_kinds),
        "kv_rank": [None if kind == "gqa" else kind.kv_rank for kind in kinds],
        "q_rank": [None if kind == "gqa" else kind.q_rank for kind in kinds],
        "kv_error": [float(layer["error"]) for layer in layers],
        "kv_values_per_token": student.kv_values_per_token(),
    }
    return student, report
