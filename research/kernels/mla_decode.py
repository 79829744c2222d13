"""Absorbed MLA decode as a Pallas Triton kernel (flash-decoding over the latent cache).

One new query per sequence attends over the latent cache with W_UK folded into the query
(DeepSeek-AI 2024, "DeepSeek-V2", section 2.1.3):

    s[b, h, t] = (q_lat[b, h] . c_kv[b, t] + q_pe[b, h] . k_pe[b, t, g(h)]) * scale,  t < L_b
    o_lat[b, h] = sum_t softmax_t(s[b, h, :]) c_kv[b, t]        (W_UV is applied by the caller)

Shapes: q_lat (B, H, r), q_pe (B, H, d_r), c_kv (B, S, r), k_pe (B, S, R, d_r), lengths (B,)
int -> o_lat (B, H, r) in c_kv's dtype. Query head h uses RoPE key g(h) = h // (H / R).

Flash-decoding (``research.kernels.flash_decode``): the grid is (B, head blocks, splits); split j
of sequence b covers slots [j * split_len, (j + 1) * split_len) and walks them in tiles of
``block_t`` slots (a dynamic trip count, cdiv(valid slots, block_t): no work past the length),
loading each c_kv tile once as both key and value. Per split it writes acc / l (float32) and the
lse, merged afterwards by ``combine_splits``.

What keeps the loop memory-bound (read off the compiled kernel by ``tools/bench/kernel_report.py``):
- Tiles are loaded with a mask (slots past the length and columns past r read as 0) and go to
  the dots as loaded; only the scores are masked. Rewriting a loaded tile (``where`` on it) made
  Triton keep one shared-memory buffer and wait for every load before the math.
- The softmax scale times log2(e) is folded into the queries, so the loop uses exp2 and never
  multiplies a score.
- The cache is read in place at any shape: a block wider than r (the next power of 2) or a last
  split that runs past S is cut by the load mask, so r = 56 or S = 200 costs no copy of the cache.
  Only the queries (a few KB) are padded: H to the head block, r and R d_r to powers of 2 >= 16.
- The split count fills the GPU in one wave from the CTAs per SM the launch really gets
  (``LAUNCH_OCCUPANCY``, measured from the compiled kernel), one split when the cells fill it.

The lowering is Pallas on Triton (``jax.experimental.pallas.triton``), whose CompilerParams are
passed explicitly (without them jax 0.10.2 lowers a pallas_call to Mosaic GPU). ``interpret=True``
runs the same kernel on any backend; the tests compare it with ``research.kernels.reference``.
float32 dots follow jax's default matmul precision, as XLA's do: TF32 on an NVIDIA GPU, IEEE under
``jax.default_matmul_precision("highest")`` (which the tests use there).
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from research.kernels.flash_decode import (attend_tile, check_pages, check_queries, choose_splits, combine_splits,
                                           finish_split, init_carry, next_pow2, prepare_queries)

__all__ = ["mla_decode", "mla_decode_paged", "block_dims", "ctas_per_sm", "DEFAULT_LAUNCH", "occupancy_key",
           "occupancy_keys"]

# block_t 32 / 8 warps / 3 stages: no spills, the next tile in flight and 2 CTAs per SM at
# H 16, r 512 (tools/bench/kernel_report.py; the tests check it where ptxas is installed).
DEFAULT_LAUNCH = {"block_t": 32, "num_warps": 8, "num_stages": 3}
MIN_SPLIT_SLOTS = 256  # shorter splits spend more on float32 partials than they gain in parallelism

_OCCUPANCY_FILE = os.path.join(os.path.dirname(__file__), "mla_decode_occupancy.json")


@functools.cache
def _occupancy_table() -> dict[str, int]:
    if not os.path.exists(_OCCUPANCY_FILE):
        return {}
    with open(_OCCUPANCY_FILE) as f:
        return {row["key"]: row["ctas_per_sm"] for row in json.load(f)["launches"]}


def block_dims(heads: int, rank: int, rope_width: int, block_h: int = 64) -> tuple[int, int, int]:
    """(head block bh, r_pad, p_pad): the kernel's block sizes for H heads, rank r and R d_r,
    powers of 2 >= 16 as Triton needs them."""
    return min(next_pow2(heads), next_pow2(block_h)), next_pow2(rank), next_pow2(rope_width)


def occupancy_keys() -> set[str]:
    """The launches the static report measured and accepted (``tools/bench/kernel_report.py``)."""
    return set(_occupancy_table())


def occupancy_key(block_t, num_warps, num_stages, block_h, r_pad, p_pad, dtype) -> str:
    return f"bt{block_t}-w{num_warps}-s{num_stages}-h{block_h}-r{r_pad}-p{p_pad}-{jnp.dtype(dtype).name}"


def ctas_per_sm(block_t, num_warps, num_stages, block_h, r_pad, p_pad, dtype) -> int:
    """CTAs one Hopper SM holds for this launch, as the static report measured it from the
    compiled kernel (shared memory and registers); 1 for a launch it did not measure."""
    return _occupancy_table().get(occupancy_key(block_t, num_warps, num_stages, block_h, r_pad, p_pad, dtype), 1)


def _load(ref, seen, width: int):
    """A (rows, n) tile of ``ref`` with rows past the length and columns >= ``width`` read as 0,
    by the load's own mask: the loaded tile is never rewritten."""
    mask = seen[:, None]
    if width < ref.shape[-1]:
        mask = mask & (jnp.arange(ref.shape[-1]) < width)[None, :]
    return pltriton.load(ref, mask=mask, other=0)


def _run_split(q_lat_ref, q_pe_ref, o_ref, lse_ref, valid, tile_size, load_tile):
    """Walks the cdiv(valid, tile_size) tiles of one split and writes acc / l and the lse."""
    q_lat, q_pe = q_lat_ref[...], q_pe_ref[...]

    def body(i, carry):
        seen = (i * tile_size + jnp.arange(tile_size)) < valid
        return attend_tile(carry, q_lat, q_pe, *load_tile(i, seen), seen)

    carry = lax.fori_loop(0, pl.cdiv(valid, tile_size), body, init_carry(*q_lat.shape))
    o_ref[...], lse_ref[...] = finish_split(*carry)


def _dense_kernel(lengths_ref, q_lat_ref, q_pe_ref, c_kv_ref, k_pe_ref, o_ref, lse_ref, *,
                  block_t: int, split_len: int, rank: int, rope_width: int):
    """One (sequence, head block, split) cell. Refs: lengths (1,), q_lat (bh, r_pad), q_pe (bh, p_pad),
    c_kv (split_len, r_pad) and k_pe (split_len, p_pad) over arrays r and p wide; outputs o (bh, r_pad)
    float32, lse (bh,) float32."""
    valid = jnp.clip(lengths_ref[0] - pl.program_id(2) * split_len, 0, split_len)

    def load_tile(i, seen):
        rows = pl.ds(i * block_t, block_t)
        return _load(c_kv_ref.at[rows, :], seen, rank), _load(k_pe_ref.at[rows, :], seen, rope_width)

    _run_split(q_lat_ref, q_pe_ref, o_ref, lse_ref, valid, block_t, load_tile)


def _paged_kernel(lengths_ref, table_ref, q_lat_ref, q_pe_ref, c_pool_ref, k_pool_ref, o_ref, lse_ref, *,
                  page: int, pages_per_split: int, rank: int, rope_width: int):
    """As ``_dense_kernel`` over a page pool: table (max_pages,) of this sequence, pools
    (P, page, r_pad) and (P, page, p_pad) whole; tile i of split j is page table[j * pages_per_split + i]."""
    split = pl.program_id(2)
    valid = jnp.clip(lengths_ref[0] - split * pages_per_split * page, 0, pages_per_split * page)

    def load_tile(i, seen):
        pid = table_ref[split * pages_per_split + i]
        return _load(c_pool_ref.at[pid], seen, rank), _load(k_pool_ref.at[pid], seen, rope_width)

    _run_split(q_lat_ref, q_pe_ref, o_ref, lse_ref, valid, page, load_tile)


def _queries(q_lat, q_pe, scale, rope_heads, dtype, block_h):
    """Scaled, widened, padded queries -> q_lat (B, H_pad, r_pad), q_pe (B, H_pad, p_pad), head block bh."""
    b, h, r = q_lat.shape
    bh, r_pad, p_pad = block_dims(h, r, rope_heads * q_pe.shape[-1], block_h)
    q_lat, q_pe = prepare_queries(q_lat, q_pe, scale, rope_heads, dtype, h_pad=-(-h // bh) * bh, r_pad=r_pad,
                                  p_pad=p_pad)
    return q_lat, q_pe, bh


def _split_call(kernel, q_lat, q_pe, bh, splits, cache_inputs, cache_specs, prefix_inputs, prefix_specs,
                num_warps, num_stages, interpret):
    """pallas_call over the grid (B, head blocks, splits) -> per-split o (B, N, H_pad, r_pad), lse (B, N, H_pad)."""
    b, h_pad, r_pad = q_lat.shape
    p_pad = q_pe.shape[-1]
    return pl.pallas_call(
        kernel,
        grid=(b, h_pad // bh, splits),
        in_specs=[*prefix_specs,
                  pl.BlockSpec((None, bh, r_pad), lambda i, g, j: (i, g, 0)),
                  pl.BlockSpec((None, bh, p_pad), lambda i, g, j: (i, g, 0)),
                  *cache_specs],
        out_specs=[pl.BlockSpec((None, None, bh, r_pad), lambda i, g, j: (i, j, g, 0)),
                   pl.BlockSpec((None, None, bh), lambda i, g, j: (i, j, g))],
        out_shape=[jax.ShapeDtypeStruct((b, splits, h_pad, r_pad), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, h_pad), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=kernel.func.__name__.strip("_"),
    )(*prefix_inputs, q_lat, q_pe, *cache_inputs)


def _splits(batch, bh, h_pad, tiles, tile_size, launch, r_pad, p_pad, dtype) -> int:
    ctas = ctas_per_sm(tile_size, launch["num_warps"], launch["num_stages"], bh, r_pad, p_pad, dtype)
    return choose_splits(batch * (h_pad // bh), tiles, ctas, min_tiles=-(-MIN_SPLIT_SLOTS // tile_size))


_LENGTH_SPEC = pl.BlockSpec((1,), lambda i, g, j: (i,))
_STATIC = ("scale", "block_h", "num_splits", "num_warps", "num_stages", "interpret")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "block_t"))
def mla_decode(q_lat: jax.Array, q_pe: jax.Array, c_kv: jax.Array, k_pe: jax.Array, lengths: jax.Array,
               *, scale: float, block_t: int = DEFAULT_LAUNCH["block_t"], block_h: int = 64, num_splits: int = 0,
               num_warps: int = DEFAULT_LAUNCH["num_warps"], num_stages: int = DEFAULT_LAUNCH["num_stages"],
               interpret: bool = False) -> jax.Array:
    """Absorbed MLA decode (see the module docstring): q_lat (B, H, r), q_pe (B, H, d_r),
    c_kv (B, S, r), k_pe (B, S, R, d_r), lengths (B,) in [1, S] -> o_lat (B, H, r), c_kv's dtype.

    ``num_splits`` 0 fills the GPU in one wave (see ``choose_splits``); otherwise at most the number
    of block_t tiles. ``block_h`` caps the query heads per cell (more heads take more cells, each
    re-reading c_kv). The cache is read where it lies, whatever r, R d_r and S are.
    """
    b, h, r = q_lat.shape
    _, s, rope_heads, d_r = k_pe.shape
    if c_kv.shape[:2] != (b, s):
        raise ValueError(f"mla_decode: c_kv {c_kv.shape} and k_pe {k_pe.shape} disagree on (B, S)")
    check_queries(q_lat, q_pe, c_kv.shape[2], rope_heads, d_r, "mla_decode")
    if block_t & (block_t - 1) or block_t < 16:
        raise ValueError(f"mla_decode: block_t must be a power of 2 >= 16, got {block_t}")
    dtype = c_kv.dtype
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)  # a length past S must not read past the cache
    q_lat, q_pe, bh = _queries(q_lat, q_pe, scale, rope_heads, dtype, block_h)
    r_pad, p_pad = q_lat.shape[-1], q_pe.shape[-1]
    k_pe = k_pe.reshape(b, s, rope_heads * d_r).astype(dtype)  # merges trailing axes: no copy
    tiles = -(-s // block_t)
    launch = {"num_warps": num_warps, "num_stages": num_stages}
    splits = num_splits or _splits(b, bh, q_lat.shape[1], tiles, block_t, launch, r_pad, p_pad, dtype)
    if splits > tiles:
        raise ValueError(f"mla_decode: num_splits {splits} exceeds the cache's {tiles} tiles of {block_t}")
    split_len = -(-tiles // splits) * block_t
    splits = -(-s // split_len)  # a ragged count can leave the last split empty: drop it
    kernel = functools.partial(_dense_kernel, block_t=block_t, split_len=split_len, rank=r, rope_width=rope_heads * d_r)
    cache_specs = [pl.BlockSpec((None, split_len, width), lambda i, g, j: (i, j, 0)) for width in (r_pad, p_pad)]
    o_parts, lse = _split_call(kernel, q_lat, q_pe, bh, splits, (c_kv, k_pe), cache_specs,
                               (lengths,), (_LENGTH_SPEC,), num_warps, num_stages, interpret)
    return combine_splits(o_parts, lse)[:, :h, :r].astype(dtype)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "pages_per_split"))
def mla_decode_paged(q_lat: jax.Array, q_pe: jax.Array, c_kv_pages: jax.Array, k_pe_pages: jax.Array,
                     block_table: jax.Array, lengths: jax.Array, *, scale: float, pages_per_split: int = 0,
                     block_h: int = 64, num_splits: int = 0, num_warps: int = DEFAULT_LAUNCH["num_warps"],
                     num_stages: int = DEFAULT_LAUNCH["num_stages"], interpret: bool = False) -> jax.Array:
    """Absorbed MLA decode over a paged latent cache, as FlashMLA and vLLM serve it.

    c_kv_pages (P, page, r) and k_pe_pages (P, page, R, d_r) are the page pool; block_table
    (B, max_pages) int lists sequence b's pages in order (slot t of b lies in page
    block_table[b, t // page], row t % page); entries past a sequence's length are never read.
    lengths (B,) in [1, max_pages * page] -> o_lat (B, H, r). The page size must be a power of 2
    >= 16 (it is the tile). A split covers ``pages_per_split`` pages (0: one wave, as ``mla_decode``).
    """
    b, h, r = q_lat.shape
    num_pages, page, rope_heads, d_r = check_pages(q_lat, q_pe, c_kv_pages, k_pe_pages, block_table,
                                                   "mla_decode_paged")
    if page & (page - 1) or page < 16:
        raise ValueError(f"mla_decode_paged: the page size must be a power of 2 >= 16, got {page}")
    dtype = c_kv_pages.dtype
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, block_table.shape[1] * page)
    q_lat, q_pe, bh = _queries(q_lat, q_pe, scale, rope_heads, dtype, block_h)
    r_pad, p_pad = q_lat.shape[-1], q_pe.shape[-1]
    k_pool = k_pe_pages.reshape(num_pages, page, rope_heads * d_r).astype(dtype)
    max_pages = block_table.shape[1]
    launch = {"num_warps": num_warps, "num_stages": num_stages}
    splits = num_splits or _splits(b, bh, q_lat.shape[1], max_pages, page, launch, r_pad, p_pad, dtype)
    per_split = pages_per_split or -(-max_pages // splits)
    splits = -(-max_pages // per_split)
    table = jnp.pad(block_table.astype(jnp.int32), ((0, 0), (0, next_pow2(splits * per_split, 1) - max_pages)))
    kernel = functools.partial(_paged_kernel, page=page, pages_per_split=per_split, rank=r,
                               rope_width=rope_heads * d_r)
    table_spec = pl.BlockSpec((None, table.shape[1]), lambda i, g, j: (i, 0))
    pool_specs = [pl.BlockSpec((num_pages, page, width), lambda i, g, j: (0, 0, 0)) for width in (r_pad, p_pad)]
    o_parts, lse = _split_call(kernel, q_lat, q_pe, bh, splits, (c_kv_pages, k_pool), pool_specs,
                               (lengths, table), (_LENGTH_SPEC, table_spec),
                               num_warps, num_stages, interpret)
    return combine_splits(o_parts, lse)[:, :h, :r].astype(dtype)
