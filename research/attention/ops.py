"""Attention arithmetic for GQA and MLA, prefill and decode, behind one dispatcher.

Every layer calls these functions and nothing else for the score/softmax/value part, so a kernel
(Pallas) can replace them by name: ``attention_ops(impl)`` returns the set chosen by a config's
``attention_impl``:
  xla     the references (``research.kernels.reference``);
  pallas  research.kernels: the Pallas absorbed-MLA decode kernel (Triton on a GPU, Mosaic on a
          TPU, interpret mode elsewhere: slow, exact, for tests), and tokamax's attention kernels
          for prefill and training where tokamax is installed and the device is a GPU or TPU (the
          reference otherwise, said once in the log);
  auto    absorbed decode: the implementation that ``research.kernels.dispatch``'s committed table
          measured fastest on this device kind at the nearest (B, S, H, r) cell, and xla wherever
          the table has no entry; prefill and training: tokamax's kernels on a GPU or TPU (measured
          2.5-6x XLA on an H200), xla on a CPU.
A kernel implementation keeps these signatures and agrees with ``xla`` on values (and gradients
where it is differentiated).

The references, their shapes and the visibility rule (positions, not lengths) are in
``research.kernels.reference``, below the kernels that must equal them; ops sits above both.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import jax
import jax.numpy as jnp

from research.kernels.reference import (gqa_attention, mla_absorbed_attention, mla_attention,  # noqa: F401
                                          visible_keys)


def mla_absorbed_pallas(q_latent: jax.Array, q_pe: jax.Array, c_kv: jax.Array, k_pe: jax.Array,
                        q_positions: jax.Array, kv_positions: jax.Array | None = None,
                        *, scale: float, launch: dict | None = None) -> jax.Array:
    """``mla_absorbed_attention`` with the Pallas decode kernel for one query per sequence over a
    cache whose slot s holds position s (kv_positions None): the query at position p sees slots
    0..p, i.e. a length of p + 1. Other calls (prefill, explicit kv_positions) take the reference.
    ``launch``: the Triton kernel's launch settings (block_t, num_warps, ...; its defaults when None)."""
    if q_latent.shape[1] != 1 or kv_positions is not None:
        return mla_absorbed_attention(q_latent, q_pe, c_kv, k_pe, q_positions, kv_positions, scale=scale)
    from research.kernels import mla_decode, mla_decode_tpu  # Pallas is imported only when used

    args = _decode_arguments(q_latent, q_pe, c_kv, k_pe, q_positions)
    backend = jax.default_backend()
    if backend == "tpu":
        return mla_decode_tpu.mla_decode_tpu(*args, scale=scale)[:, None]
    return mla_decode.mla_decode(*args, scale=scale, interpret=backend != "gpu", **(launch or {}))[:, None]


def mla_absorbed_auto(q_latent: jax.Array, q_pe: jax.Array, c_kv: jax.Array, k_pe: jax.Array,
                      q_positions: jax.Array, kv_positions: jax.Array | None = None, *, scale: float) -> jax.Array:
    """``mla_absorbed_attention`` through whichever implementation the dispatch table measured
    fastest for this decode shape on this device (chosen at trace time, from static shapes)."""
    args = (q_latent, q_pe, c_kv, k_pe, q_positions, kv_positions)
    if q_latent.shape[1] != 1 or kv_positions is not None or jax.default_backend() == "cpu":
        return mla_absorbed_attention(*args, scale=scale)
    from research.kernels import dispatch

    b, _, h, r = q_latent.shape
    cell = (jax.devices()[0].device_kind, b, c_kv.shape[1], h, r)
    impl, options = dispatch.choose_with_options(*cell)
    if impl == "mosaic_gpu" and _mosaic_gpu_unsupported(*args):  # e.g. S not a multiple of its tile
        impl, options = dispatch.choose_with_options(*cell, exclude=("mosaic_gpu",))
    if impl == "triton":  # with the launch the table timed
        return mla_absorbed_pallas(*args, scale=scale, launch=options)
    if impl == "mosaic_gpu":
        return _mla_absorbed_mosaic_gpu(*args, scale=scale)
    return mla_absorbed_attention(*args, scale=scale)


def _decode_arguments(q_latent, q_pe, c_kv, k_pe, q_positions):
    """The decode kernels' arguments for one query per sequence at position p (it sees slots 0..p)."""
    lengths = jnp.clip(q_positions[:, 0] + 1, 1, c_kv.shape[1])
    return q_latent[:, 0], q_pe[:, 0], c_kv, k_pe, lengths


def _mosaic_gpu_unsupported(q_latent, q_pe, c_kv, k_pe, q_positions, kv_positions=None) -> str | None:
    from research.kernels import mla_decode_mgpu

    return mla_decode_mgpu.unsupported_reason(*_decode_arguments(q_latent, q_pe, c_kv, k_pe, q_positions))


def _mla_absorbed_mosaic_gpu(q_latent, q_pe, c_kv, k_pe, q_positions, kv_positions=None, *, scale: float):
    from research.kernels import mla_decode_mgpu

    args = _decode_arguments(q_latent, q_pe, c_kv, k_pe, q_positions)
    return mla_decode_mgpu.mla_decode_mgpu(*args, scale=scale)[:, None]


def _prefill_kernel(name: str):
    """The tokamax version of ``name`` (gqa | mla) where it runs, else None after one log line."""
    from research.kernels import prefill

    reason = prefill.unavailable_reason()
    if reason is None:
        return getattr(prefill, f"{name}_attention")
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        logging.getLogger(__name__).warning("attention_impl=pallas: prefill attention falls back to xla: %s", reason)
    return None


_LOGGED: set[str] = set()


def gqa_attention_pallas(q, k, v, q_positions, kv_positions=None, *, scale: float):
    """``gqa_attention`` through tokamax's kernels where they run, the reference otherwise."""
    kernel = _prefill_kernel("gqa") or gqa_attention
    return kernel(q, k, v, q_positions, kv_positions, scale=scale)


def mla_attention_pallas(q_nope, q_pe, k_nope, k_pe, v, q_positions, kv_positions=None, *, scale: float):
    """``mla_attention`` (d_v != d_qk) through tokamax's kernels where they run, the reference otherwise."""
    kernel = _prefill_kernel("mla") or mla_attention
    return kernel(q_nope, q_pe, k_nope, k_pe, v, q_positions, kv_positions, scale=scale)


_IMPLS = {
    "xla": SimpleNamespace(gqa=gqa_attention, mla=mla_attention, mla_absorbed=mla_absorbed_attention),
    "pallas": SimpleNamespace(gqa=gqa_attention_pallas, mla=mla_attention_pallas, mla_absorbed=mla_absorbed_pallas),
}
ATTENTION_IMPLS = (*_IMPLS, "auto")


def attention_ops(impl: str) -> SimpleNamespace:
    """The functions ``gqa``, ``mla`` and ``mla_absorbed`` of implementation ``impl`` (see the
    module docstring for what ``auto`` picks)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose one of: {', '.join(ATTENTION_IMPLS)}")
    if impl == "auto":
        if jax.default_backend() == "cpu":
            return _IMPLS["xla"]
        return SimpleNamespace(gqa=gqa_attention_pallas, mla=mla_attention_pallas, mla_absorbed=mla_absorbed_auto)
    return _IMPLS[impl]
