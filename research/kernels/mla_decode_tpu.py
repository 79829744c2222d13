"""Absorbed MLA decode for TPU (Pallas on Mosaic TPU): the same computation and result as
``research.kernels.mla_decode.mla_decode`` (see its docstring for the equations).

The TPU grid is sequential per core, so the tile loop is a grid axis: (B, splits, tiles per split)
with the last one "arbitrary" (a reduction) and float32 m, l, acc kept in VMEM scratch across it.
The lengths are scalar-prefetched into SMEM, and the c_kv / k_pe index maps clamp the tile index
to the sequence's last valid tile: a block index equal to the previous step's is not fetched
again, so tiles past the length cost neither HBM traffic nor compute (``pl.when`` skips them).
Blocks keep TPU's (8, 128) rule: a tile of ``block_t`` slots (a multiple of 8) by the whole
padded rank, all query heads in one block, lse written across 128 lanes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from research.kernels.flash_decode import (MASKED, attend_tile, check_pages, check_queries, combine_splits,
                                           finish_split, next_pow2, pad_to, prepare_queries, zero_unseen)

LANES = 128


def _tpu_kernel(lengths_ref, q_lat_ref, q_pe_ref, c_kv_ref, k_pe_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref, *,
                block_t: int, tiles_per_split: int):
    """Cell (b, split, tile): c_kv (bt, r) and k_pe (bt, p) of that tile; scratch acc (H, r), m, l (H, 1)."""
    b, split, tile = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = (split * tiles_per_split + tile) * block_t
    length = lengths_ref[b]

    @pl.when(tile == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, MASKED)
        l_ref[...] = jnp.zeros_like(l_ref)

    @pl.when(start < length)
    def _attend():
        seen = (start + jnp.arange(block_t)) < length
        carry = (acc_ref[...], m_ref[...][:, 0], l_ref[...][:, 0])
        # a block past the array's end holds garbage, and TPU loads cannot mask: zero unseen rows
        c, k = zero_unseen(c_kv_ref[...], seen), zero_unseen(k_pe_ref[...], seen)
        acc, m, l = attend_tile(carry, q_lat_ref[...], q_pe_ref[...], c, k, seen)
        acc_ref[...], m_ref[...], l_ref[...] = acc, m[:, None], l[:, None]

    @pl.when(tile == tiles_per_split - 1)
    def _finish():
        o, lse = finish_split(acc_ref[...], m_ref[...][:, 0], l_ref[...][:, 0])
        o_ref[...], lse_ref[...] = o, jnp.broadcast_to(lse[:, None], lse_ref.shape)


def _queries(q_lat, q_pe, scale, rope_heads, dtype):
    """All heads in one block: scaled, widened queries padded to (B, H_pad, r_pad), (B, H_pad, p_pad)."""
    h, r = q_lat.shape[1:]
    return prepare_queries(q_lat, q_pe, scale, rope_heads, dtype, h_pad=next_pow2(h), r_pad=next_pow2(r),
                           p_pad=next_pow2(rope_heads * q_pe.shape[-1]))


def _two_splits(tiles: int) -> int:
    """TPU: two splits feed both TensorCores of a megacore chip (the grid is sequential per core)."""
    return 2 if tiles % 2 == 0 else 1


def _tpu_call(kernel, prefetch, q_lat, q_pe, caches, cache_block, rows, splits, per_split, name, interpret):
    """pallas_call over the grid (B, splits, tiles per split) with ``prefetch`` scalar-prefetched;
    ``caches`` are read in blocks of ``rows`` slots at ``cache_block``'s index -> (B, H_pad, r_pad) f32."""
    b, h_pad, r_pad = q_lat.shape
    p_pad = q_pe.shape[-1]
    per_sequence = lambda i, j, t, *prefetched: (i, 0, 0)
    per_split_out = lambda i, j, t, *prefetched: (i, j, 0, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch),
        grid=(b, splits, per_split),
        in_specs=[pl.BlockSpec((None, h_pad, r_pad), per_sequence), pl.BlockSpec((None, h_pad, p_pad), per_sequence),
                  pl.BlockSpec((None, rows, r_pad), cache_block), pl.BlockSpec((None, rows, p_pad), cache_block)],
        out_specs=[pl.BlockSpec((None, None, h_pad, r_pad), per_split_out),
                   pl.BlockSpec((None, None, h_pad, LANES), per_split_out)],
        scratch_shapes=[pltpu.VMEM((h_pad, r_pad), jnp.float32), pltpu.VMEM((h_pad, 1), jnp.float32),
                        pltpu.VMEM((h_pad, 1), jnp.float32)],
    )
    o_parts, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, splits, h_pad, r_pad), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, h_pad, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=name,
    )(*prefetch, q_lat, q_pe, *caches)
    return combine_splits(o_parts, lse[..., 0])


@functools.partial(jax.jit, static_argnames=("scale", "block_t", "num_splits", "interpret"))
def mla_decode_tpu(q_lat: jax.Array, q_pe: jax.Array, c_kv: jax.Array, k_pe: jax.Array, lengths: jax.Array,
                   *, scale: float, block_t: int = 128, num_splits: int = 0, interpret: bool = False) -> jax.Array:
    """q_lat (B, H, r), q_pe (B, H, d_r), c_kv (B, S, r), k_pe (B, S, R, d_r), lengths (B,) in [1, S]
    -> o_lat (B, H, r) in c_kv's dtype. ``block_t``: slots per tile (a multiple of 8)."""
    b, h, r = q_lat.shape
    _, s, rope_heads, d_r = k_pe.shape
    if c_kv.shape[:2] != (b, s):
        raise ValueError(f"mla_decode_tpu: c_kv {c_kv.shape} and k_pe {k_pe.shape} disagree on (B, S)")
    check_queries(q_lat, q_pe, c_kv.shape[2], rope_heads, d_r, "mla_decode_tpu")
    if block_t % 8:
        raise ValueError(f"mla_decode_tpu: block_t must be a multiple of 8, got {block_t}")
    dtype = c_kv.dtype
    q_lat, q_pe = _queries(q_lat, q_pe, scale, rope_heads, dtype)
    r_pad, p_pad = q_lat.shape[2], q_pe.shape[2]
    s_pad = -(-s // block_t) * block_t
    c_kv = pad_to(c_kv, b, s_pad, r_pad)
    k_pe = pad_to(k_pe.reshape(b, s, rope_heads * d_r).astype(dtype), b, s_pad, p_pad)
    tiles = s_pad // block_t
    splits = num_splits or _two_splits(tiles)
    if tiles % splits:
        raise ValueError(f"mla_decode_tpu: num_splits {splits} does not divide the cache's {tiles} tiles of {block_t}")
    per_split = tiles // splits

    def cache_block(i, j, t, lengths_ref):  # past the length: repeat the last valid tile (not re-fetched)
        last = jnp.maximum(pl.cdiv(lengths_ref[i], block_t) - 1, 0)
        return i, jnp.minimum(j * per_split + t, last), 0

    kernel = functools.partial(_tpu_kernel, block_t=block_t, tiles_per_split=per_split)
    out = _tpu_call(kernel, (lengths.astype(jnp.int32),), q_lat, q_pe, (c_kv, k_pe), cache_block, block_t,
                    splits, per_split, "mla_decode_tpu", interpret)
    return out[:, :h, :r].astype(dtype)


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_split", "interpret"))
def mla_decode_paged_tpu(q_lat: jax.Array, q_pe: jax.Array, c_kv_pages: jax.Array, k_pe_pages: jax.Array,
                         block_table: jax.Array, lengths: jax.Array, *, scale: float, pages_per_split: int = 0,
                         interpret: bool = False) -> jax.Array:
    """``research.kernels.mla_decode.mla_decode_paged`` on TPU: pools (P, page, r) and (P, page, R, d_r),
    block_table (B, max_pages), lengths (B,) -> o_lat (B, H, r). The block table is scalar-prefetched
    with the lengths; the page index map clamps to the sequence's last valid page, so pages past
    the length are not fetched. The page size (the tile) must be a multiple of 8."""
    b, h, r = q_lat.shape
    num_pages, page, rope_heads, d_r = check_pages(q_lat, q_pe, c_kv_pages, k_pe_pages, block_table,
                                                    "mla_decode_paged_tpu")
    if page % 8:
        raise ValueError(f"mla_decode_paged_tpu: the page size must be a multiple of 8, got {page}")
    dtype = c_kv_pages.dtype
    q_lat, q_pe = _queries(q_lat, q_pe, scale, rope_heads, dtype)
    r_pad, p_pad = q_lat.shape[2], q_pe.shape[2]
    c_pool = pad_to(c_kv_pages, num_pages, page, r_pad)
    k_pool = pad_to(k_pe_pages.reshape(num_pages, page, rope_heads * d_r).astype(dtype), num_pages, page, p_pad)
    max_pages = block_table.shape[1]
    per_split = pages_per_split or max_pages // _two_splits(max_pages)
    splits = -(-max_pages // per_split)
    table = block_table.astype(jnp.int32).reshape(-1)

    def page_block(i, j, t, lengths_ref, table_ref):  # past the length: the last valid page again (not re-fetched)
        last = jnp.maximum(pl.cdiv(lengths_ref[i], page) - 1, 0)
        return table_ref[i * max_pages + jnp.minimum(j * per_split + t, last)], 0, 0

    def kernel(lengths_ref, table_ref, *refs):  # the table only steers the index maps
        _tpu_kernel(lengths_ref, *refs, block_t=page, tiles_per_split=per_split)

    out = _tpu_call(kernel, (lengths.astype(jnp.int32), table), q_lat, q_pe, (c_pool, k_pool), page_block, page,
                    splits, per_split, "mla_decode_paged_tpu", interpret)
    return out[:, :h, :r].astype(dtype)
