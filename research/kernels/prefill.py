"""Prefill / training attention through tokamax (the JAX team's kernel library), for GQA and for
MLA's naive path, whose value head dim differs from the query/key dim (d_qk = d_n + d_r, d_v).

tokamax's ``dot_product_attention`` picks a kernel for the device (Mosaic on Hopper, Triton,
cuDNN, or XLA) with a forward and a backward, and takes d_v != d_qk; jax's own
``jax.nn.dot_product_attention`` does not. tokamax is an optional dependency (the ``kernels``
extra): where it is missing, or the device is a CPU, ``research.attention.ops`` keeps the XLA
reference and says so once in the log.

The visibility rule of ``research.kernels.reference`` is passed as a boolean mask (B, 1, T, S): key s
is visible from query t when kv_positions[b, s] <= q_positions[b, t]. Shapes as in ops:
q (B, T, H, D), k (B, S, K, D), v (B, S, K, Dv) -> (B, T, H, Dv); MLA's RoPE keys (B, S, R, d_r)
are repeated to the H query heads (head h uses key h // (H / R)).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from research.kernels.reference import visible_keys


@functools.cache
def unavailable_reason() -> str | None:
    """None when tokamax kernels can run here, else why not (logged once by the caller)."""
    try:
        import tokamax  # noqa: F401
    except ImportError:
        return "tokamax is not installed (pip install -e '.[kernels]')"
    if jax.default_backend() not in ("gpu", "tpu"):
        return f"tokamax's attention kernels need a GPU or TPU, not {jax.default_backend()}"
    return None


def _tokamax():
    """The tokamax module, with absl flags marked parsed: tokamax reads its options from absl flags and
    would otherwise parse sys.argv (a notebook's, pytest's or our CLI's) and fail on foreign flags."""
    from absl import flags
    import tokamax

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # defaults; a later absl app still parses its own argv
    return tokamax


def gqa_attention(q, k, v, q_positions, kv_positions=None, *, scale: float, implementation=None):
    """``research.attention.ops.gqa_attention`` through tokamax: (B, T, H, Dv) in v's dtype."""
    mask = visible_keys(q_positions, kv_positions, k.shape[1])
    out = _tokamax().dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)
    return out.astype(v.dtype)


def mla_attention(q_nope, q_pe, k_nope, k_pe, v, q_positions, kv_positions=None, *, scale: float,
                  implementation=None):
    """``research.attention.ops.mla_attention`` through tokamax: q = [q_nope ; q_pe] and
    k = [k_nope ; k_pe of the head's group] (d_n + d_r), v (d_v) -> (B, T, H, d_v)."""
    heads, rope_heads = q_nope.shape[2], k_pe.shape[2]
    k_pe = jnp.repeat(k_pe, heads // rope_heads, axis=2)
    q = jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1)
    k = jnp.concatenate([k_nope, k_pe.astype(k_nope.dtype)], axis=-1)
    return gqa_attention(q, k, v, q_positions, kv_positions, scale=scale, implementation=implementation)
