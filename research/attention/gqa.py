"""Grouped-query attention (Ainslie et al. 2023): H query heads share K key/value heads, with RoPE.

    q = W_q x (H heads), k = W_k x, v = W_v x (K heads);  q, k <- RoPE
    y = W_o concat_h softmax(q_h k_{g(h)}^T / sqrt(Dh)) v_{g(h)},   g(h) = h // (H / K)

K = H is multi-head attention. The KV cache holds k and v: 2 K Dh values per token and layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.attention.layers import head_output, head_projection, write_cache
from research.attention.rope import apply_rope


class GQAttention(nnx.Module):
    """(B, T, D) -> (B, T, D); cache {"k": (B, S, K, Dh), "v": (B, S, K, Dh)}. ``config``: the
    decoder's architecture (see research.attention.layers). Kernels: q (D, H, Dh), k and v
    (D, K, Dh), o (H, Dh, D)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.config = c  # static: RoPE frequencies are computed from it at trace time
        dtype = c.compute_dtype
        h, k, dh = c.num_heads, c.num_kv_heads, c.head_dim
        self.q = head_projection(c.dim, h, dh, ("embed", "q_heads", "head_dim"), dtype, rngs)
        self.k = head_projection(c.dim, k, dh, ("embed", "kv_heads", "head_dim"), dtype, rngs)
        self.v = head_projection(c.dim, k, dh, ("embed", "kv_heads", "head_dim"), dtype, rngs)
        self.o = head_output(h, dh, c.dim, ("q_heads", "head_dim", "embed"), dtype, rngs)

    def cache_values_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def init_cache(self, batch: int, length: int, dtype) -> dict[str, jax.Array]:
        shape = (batch, length, self.num_kv_heads, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, x, positions, cache, ops):
        q, k, v = self.q(x), self.k(x), self.v(x)  # (B, T, H, Dh), (B, T, K, Dh), (B, T, K, Dh)
        inv_freq = self.config.inv_freq()
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        kv_positions = positions
        if cache is not None:
            cache = {"k": write_cache(cache["k"], k, positions), "v": write_cache(cache["v"], v, positions)}
            k, v, kv_positions = cache["k"], cache["v"], None
        y = ops.gqa(q, k, v, positions, kv_positions, scale=self.head_dim ** -0.5)
        return self.o(y), cache
