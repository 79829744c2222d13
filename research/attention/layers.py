"""Building blocks the attention layers share with the decoder that holds them: a bias-free linear
layer with logical axis names, head-shaped projections, RMSNorm, and the slot-indexed KV-cache write.

Projections into and out of attention heads keep the head axis in the kernel, (D, H, Dh) and
(H, Dh, D), named ``("embed", "q_heads" | "kv_heads", "head_dim")``, so a mesh axis that splits
``q_heads`` / ``kv_heads`` places whole heads on each device (as maxtext and Gemma do). Hugging
Face, GGUF and earlier checkpoints store these kernels with the head axes flattened, (D, H*Dh) and
(H*Dh, D), in the same row-major order; ``research.core.params.set_param`` splits them on load.

Attention layers take the decoder's architecture as a ``config`` with the fields ``dim``,
``num_heads``, ``num_kv_heads``, ``head_dim``, ``rms_eps``, ``rope_theta``, ``rope_scaling``,
``compute_dtype`` and ``inv_freq()`` (``research.models.llama.LlamaConfig`` is one); they import
no model, so a decoder imports attention and never the other way round.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.core.mesh import logical

_init = nnx.initializers.normal(0.02)


def linear(in_f: int, out_f: int, names: tuple, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """x (..., in_f) -> (..., out_f), no bias, N(0, 0.02) kernel (in_f, out_f) named ``names``;
    computes in ``dtype``, keeps the kernel float32."""
    return nnx.Linear(in_f, out_f, use_bias=False, kernel_init=logical(_init, names), dtype=dtype,
                      param_dtype=jnp.float32, rngs=rngs)


def head_projection(in_f: int, heads: int, head_dim: int, names: tuple, dtype, rngs: nnx.Rngs) -> nnx.Einsum:
    """x (B, T, in_f) -> (B, T, heads, head_dim) with a kernel (in_f, heads, head_dim) named
    ``names``, no bias, N(0, 0.02), computed in ``dtype`` and kept float32."""
    return nnx.Einsum("btd,dhk->bthk", (in_f, heads, head_dim), kernel_init=logical(_init, names), dtype=dtype,
                      param_dtype=jnp.float32, rngs=rngs)


def head_output(heads: int, head_dim: int, out_f: int, names: tuple, dtype, rngs: nnx.Rngs) -> nnx.Einsum:
    """y (B, T, heads, head_dim) -> (B, T, out_f) with a kernel (heads, head_dim, out_f): the sum
    over heads of each head's output projection."""
    return nnx.Einsum("bthk,hkd->btd", (heads, head_dim, out_f), kernel_init=logical(_init, names), dtype=dtype,
                      param_dtype=jnp.float32, rngs=rngs)


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale, normalised in float32 (as HF Llama)."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("embed",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * normed.astype(x.dtype)).astype(x.dtype)


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """cache (B, S, ...) with new (B, T, ...) written at slots ``positions`` (B, T)."""
    rows = jnp.arange(cache.shape[0])[:, None]
    return cache.at[rows, positions].set(new.astype(cache.dtype), mode="drop")
