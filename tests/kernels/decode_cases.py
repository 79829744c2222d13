"""Inputs and the XLA reference shared by the decode kernels' tests."""
import jax
import jax.numpy as jnp

from research.kernels.reference import mla_absorbed_attention


def reference(q_lat, q_pe, c_kv, k_pe, lengths, scale):
    """research.kernels.reference's absorbed attention for one query at position length - 1."""
    positions = (jnp.asarray(lengths) - 1)[:, None]
    return mla_absorbed_attention(q_lat[:, None], q_pe[:, None], c_kv, k_pe, positions, scale=scale)[:, 0]


def inputs(b, h, r, d_r, rope_heads, s, dtype, seed=0):
    """Random q_lat (B, H, r), q_pe (B, H, d_r), c_kv (B, S, r), k_pe (B, S, R, d_r) in ``dtype``."""
    k = jax.random.split(jax.random.key(seed), 4)
    shapes = [(b, h, r), (b, h, d_r), (b, s, r), (b, s, rope_heads, d_r)]
    return [jax.random.normal(key, shape).astype(dtype) for key, shape in zip(k, shapes)]
