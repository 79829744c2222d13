"""Grouped-query attention (Ainslie et al. 2023): H query heads share K key/value heads, with RoPE.

    q = W_q x (H heads), k = W_k x, v = W_v x (K heads);  q, k <- RoPE
    y = W_o concat_h softmax(q_h k_{g(h)}^T / sqrt(Dh)) v_{g(h)},   g(h) = h // (H / K)

K = H is multi-head attention. The KV cache holds k and v: 2 K Dh values per token and layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.attention.layers import linear, write_cache
from research.attention.rope import apply_rope


class GQAttention(nnx.Module):
    """(B, T, D) -> (B, T, D); cache {"k": (B, S, K, Dh), "v": (B, S, K, Dh)}. ``config``: the
    decoder's architecture (see research.attention.layers)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.config = c  # static: RoPE frequencies are computed from it at trace time
        dtype = c.compute_dtype
        self.q = linear(c.dim, c.num_heads * c.head_dim, ("embed", "heads"), dtype, rngs)
        self.k = linear(c.dim, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), dtype, rngs)
        self.v = linear(c.dim, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), dtype, rngs)
        self.o = linear(c.num_heads * c.head_dim, c.dim, ("heads", "embed"), dtype, rngs)

    def cache_values_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def init_cache(self, batch: int, length: int, dtype) -> dict[str, jax.Array]:
        shape = (batch, length, self.num_kv_heads, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, x, positions, cache, ops):
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        inv_freq = self.config.inv_freq()
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        kv_positions = positions
        if cache is not None:
            cache = {"k": write_cache(cache["k"], k, positions), "v": write_cache(cache["v"], v, positions)}
            k, v, kv_positions = cache["k"], cache["v"], None
        y = ops.gqa(q, k, v, positions, kv_positions, scale=self.head_dim ** -0.5)
        return self.o(y.reshape(b, t, -1)), cache
