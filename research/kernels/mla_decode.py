"""Absorbed MLA decode as a Pallas kernel (flash-decoding over the latent cache).

One new query per sequence attends over the latent cache with W_UK folded into the query
(DeepSeek-AI 2024, "DeepSeek-V2", section 2.1.3):

    s[b, h, t] = (q_lat[b, h] . c_kv[b, t] + q_pe[b, h] . k_pe[b, t, g(h)]) * scale,  t < L_b
    o_lat[b, h] = sum_t softmax_t(s[b, h, :]) c_kv[b, t]        (W_UV is applied by the caller)

Shapes: q_lat (B, H, r), q_pe (B, H, d_r), c_kv (B, S, r), k_pe (B, S, R, d_r), lengths (B,)
int -> o_lat (B, H, r) in c_kv's dtype. Query head h uses RoPE key g(h) = h // (H / R).

Flash-decoding (Dao et al. 2023): the grid is (B, head blocks, splits); split j of sequence b
covers cache slots [j * split_len, (j + 1) * split_len) and walks them in tiles of ``block_t``
slots with an online softmax in float32 (FlashAttention-2's m, l, acc). Each c_kv tile is loaded
once and used as both key and value. The loop runs cdiv(valid slots, block_t) times, so a split
that lies past a sequence's length does no work and reports lse = -1e30. Per split the kernel
writes acc / l (float32) and lse = m + log l; ``combine_splits`` merges them by log-sum-exp:

    o = sum_j exp(lse_j - M) o_j / sum_j exp(lse_j - M),   M = max_j lse_j.

R > 1 RoPE keys are handled without a second code path: the wrapper places q_pe of head h in
block g(h) of a (H, R d_r) query whose other blocks are zero and flattens k_pe to (S, R d_r), so
q_pe_wide . k_pe_flat = q_pe[h] . k_pe[g(h)]. The wrapper pads H, r and R d_r to the block sizes
the GPU compiler accepts (powers of 2, at least 16) and S to a multiple of ``block_t``; zero
padding changes no score. Padding r or S copies the cache at every call: for speed choose a
kernel-friendly rank (r_kv + d_r a multiple of 64) and a cache length that is a multiple of 64.

The lowering is Pallas on Triton (``jax.experimental.pallas.triton``), whose CompilerParams are
passed explicitly (without them jax 0.10.2 lowers a pallas_call to Mosaic GPU). ``interpret=True``
runs the same kernel on any backend; the tests compare it with ``research.attention.ops``.
float32 dots follow jax's default matmul precision, as XLA's do: TF32 on an NVIDIA GPU, IEEE under
``jax.default_matmul_precision("highest")`` (which the tests use there).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MASKED = -1e30  # finite: exp(MASKED - m) is 0 and an empty split stays NaN-free


def _next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _attend_tile(carry, q_lat, q_pe, c_tile, k_tile, seen, scale):
    """One online-softmax step over a tile of slots: carry (acc (bh, r), m (bh,), l (bh,)) in f32;
    c_tile (bt, r) serves as key and value; k_tile (bt, p); seen (bt,) marks slots below the length."""
    acc, m, l = carry
    # slots past the length in the last tile: zeroed, so stale NaN / inf there cannot leak in
    c = jnp.where(seen[:, None], c_tile, 0)
    k = jnp.where(seen[:, None], k_tile, 0)
    s = lax.dot_general(q_lat, c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s += lax.dot_general(q_pe, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = jnp.where(seen[None, :], s * scale, MASKED)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp(s - m_new[:, None])
    correction = jnp.exp(m - m_new)
    acc = acc * correction[:, None] + jnp.dot(p.astype(c.dtype), c, preferred_element_type=jnp.float32)
    return acc, m_new, l * correction + p.sum(axis=1)


def _run_split(q_lat_ref, q_pe_ref, o_ref, lse_ref, valid, tile_size, load_tile, scale):
    """Walks the cdiv(valid, tile_size) tiles of one split (a dynamic trip count: no work past the
    length) and writes acc / l and lse = m + log l (MASKED for an empty split)."""
    q_lat, q_pe = q_lat_ref[...], q_pe_ref[...]
    bh, r = q_lat.shape

    def body(i, carry):
        c_tile, k_tile = load_tile(i)
        seen = (i * tile_size + jnp.arange(tile_size)) < valid
        return _attend_tile(carry, q_lat, q_pe, c_tile, k_tile, seen, scale)

    init = (jnp.zeros((bh, r), jnp.float32), jnp.full((bh,), MASKED, jnp.float32), jnp.zeros((bh,), jnp.float32))
    acc, m, l = lax.fori_loop(0, pl.cdiv(valid, tile_size), body, init)
    nonempty = l > 0
    safe_l = jnp.where(nonempty, l, 1.0)
    o_ref[...] = acc / safe_l[:, None]
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(safe_l), MASKED)


def _dense_kernel(lengths_ref, q_lat_ref, q_pe_ref, c_kv_ref, k_pe_ref, o_ref, lse_ref, *,
                  scale: float, block_t: int, split_len: int):
    """One (sequence, head block, split) cell. Refs: lengths (1,), q_lat (bh, r), q_pe (bh, p),
    c_kv (split_len, r), k_pe (split_len, p); outputs o (bh, r) float32, lse (bh,) float32."""
    valid = jnp.clip(lengths_ref[0] - pl.program_id(2) * split_len, 0, split_len)

    def load_tile(i):
        rows = pl.ds(i * block_t, block_t)
        return c_kv_ref[rows, :], k_pe_ref[rows, :]

    _run_split(q_lat_ref, q_pe_ref, o_ref, lse_ref, valid, block_t, load_tile, scale)


def _paged_kernel(lengths_ref, table_ref, q_lat_ref, q_pe_ref, c_pool_ref, k_pool_ref, o_ref, lse_ref, *,
                  scale: float, page: int, pages_per_split: int):
    """As ``_dense_kernel`` over a page pool: table (max_pages,) of this sequence, pools
    (P, page, r) and (P, page, p) whole; tile i of split j is page table[j * pages_per_split + i]."""
    split = pl.program_id(2)
    valid = jnp.clip(lengths_ref[0] - split * pages_per_split * page, 0, pages_per_split * page)

    def load_tile(i):
        pid = table_ref[split * pages_per_split + i]
        return c_pool_ref[pid], k_pool_ref[pid]

    _run_split(q_lat_ref, q_pe_ref, o_ref, lse_ref, valid, page, load_tile, scale)


def combine_splits(o_parts: jax.Array, lse: jax.Array) -> jax.Array:
    """Log-sum-exp merge of per-split results: o_parts (B, N, H, r), lse (B, N, H) -> (B, H, r) f32."""
    top = lse.max(axis=1, keepdims=True)
    w = jnp.exp(lse - top)                                      # an empty split weighs 0
    return (w[..., None] * o_parts).sum(axis=1) / w.sum(axis=1)[..., None]


def choose_splits(batch: int, tiles: int, target_cells: int = 264, min_tiles: int = 8) -> int:
    """Number of splits: a divisor of ``tiles`` (the cache's block_t tiles) giving about
    ``target_cells`` grid cells (2 per SM of an H200 / H100), each split at least ``min_tiles``
    tiles long (f32 partials cost about (H r) / (split_len (r + d_r)) of the cache's bytes)."""
    want = max(1, min(-(-target_cells // max(batch, 1)), tiles // min_tiles))
    return max(d for d in range(1, want + 1) if tiles % d == 0)


def widen_rope_query(q_pe: jax.Array, rope_heads: int) -> jax.Array:
    """q_pe (B, H, d_r) -> (B, H, R d_r) with head h's values in block g(h) = h // (H / R), zeros elsewhere."""
    b, h, d = q_pe.shape
    group = jnp.arange(h) // (h // rope_heads)
    onehot = jax.nn.one_hot(group, rope_heads, dtype=q_pe.dtype)  # (H, R)
    return (onehot[None, :, :, None] * q_pe[:, :, None, :]).reshape(b, h, rope_heads * d)


def _pad_to(x: jax.Array, *shape: int) -> jax.Array:
    """Zero-pads x at the end of each axis to ``shape`` (no copy when it already has it)."""
    return x if x.shape == shape else jnp.pad(x, [(0, w - n) for w, n in zip(shape, x.shape)])


def _check(q_lat, q_pe, cache_rank, rope_heads, d_r, where):
    b, h, r = q_lat.shape
    if q_pe.shape != (b, h, d_r) or cache_rank != r:
        raise ValueError(f"{where}: shapes disagree: q_lat {q_lat.shape}, q_pe {q_pe.shape}, "
                         f"cache rank {cache_rank}, RoPE keys of {d_r}")
    if h % rope_heads:
        raise ValueError(f"{where}: {h} query heads do not group over {rope_heads} RoPE keys")


def _check_pages(q_lat, q_pe, c_kv_pages, k_pe_pages, block_table, where):
    """Checks a page pool against the queries -> (num_pages, page, R, d_r)."""
    num_pages, page, rope_heads, d_r = k_pe_pages.shape
    if c_kv_pages.shape[:2] != (num_pages, page) or block_table.shape[0] != q_lat.shape[0]:
        raise ValueError(f"{where}: pools {c_kv_pages.shape} / {k_pe_pages.shape} and block table "
                         f"{block_table.shape} disagree")
    _check(q_lat, q_pe, c_kv_pages.shape[2], rope_heads, d_r, where)
    return num_pages, page, rope_heads, d_r


def _queries(q_lat, q_pe, rope_heads, dtype, block_h):
    """Padded queries and the head block: q_lat (B, H_pad, r_pad), widened q_pe (B, H_pad, p_pad), bh."""
    b, h, r = q_lat.shape
    q_pe = widen_rope_query(q_pe, rope_heads)
    bh = min(_next_pow2(h), _next_pow2(block_h))
    h_pad = -(-h // bh) * bh
    return (_pad_to(q_lat.astype(dtype), b, h_pad, _next_pow2(r)),
            _pad_to(q_pe.astype(dtype), b, h_pad, _next_pow2(q_pe.shape[-1])), bh)


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


_LENGTH_SPEC = pl.BlockSpec((1,), lambda i, g, j: (i,))
_STATIC = ("scale", "block_h", "num_splits", "num_warps", "num_stages", "interpret")


@functools.partial(jax.jit, static_argnames=(*_STATIC, "block_t"))
def mla_decode(q_lat: jax.Array, q_pe: jax.Array, c_kv: jax.Array, k_pe: jax.Array, lengths: jax.Array,
               *, scale: float, block_t: int = 64, block_h: int = 64, num_splits: int = 0,
               num_warps: int = 4, num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """Absorbed MLA decode (see the module docstring): q_lat (B, H, r), q_pe (B, H, d_r),
    c_kv (B, S, r), k_pe (B, S, R, d_r), lengths (B,) in [1, S] -> o_lat (B, H, r), c_kv's dtype.

    ``num_splits`` 0 picks ``choose_splits``; otherwise it must divide the number of block_t tiles.
    ``block_h`` caps the query heads per cell (heads beyond it take more cells, each re-reading c_kv).
    """
    b, h, r = q_lat.shape
    _, s, rope_heads, d_r = k_pe.shape
    if c_kv.shape[:2] != (b, s):
        raise ValueError(f"mla_decode: c_kv {c_kv.shape} and k_pe {k_pe.shape} disagree on (B, S)")
    _check(q_lat, q_pe, c_kv.shape[2], rope_heads, d_r, "mla_decode")
    if block_t & (block_t - 1) or block_t < 16:
        raise ValueError(f"mla_decode: block_t must be a power of 2 >= 16, got {block_t}")
    dtype = c_kv.dtype
    q_lat, q_pe, bh = _queries(q_lat, q_pe, rope_heads, dtype, block_h)
    s_pad = -(-s // block_t) * block_t
    c_kv = _pad_to(c_kv, b, s_pad, q_lat.shape[-1])
    k_pe = _pad_to(k_pe.reshape(b, s, rope_heads * d_r).astype(dtype), b, s_pad, q_pe.shape[-1])
    tiles = s_pad // block_t
    splits = num_splits or choose_splits(b * (q_lat.shape[1] // bh), tiles)
    if tiles % splits:
        raise ValueError(f"mla_decode: num_splits {splits} does not divide the cache's {tiles} tiles of {block_t}")
    split_len = s_pad // splits
    kernel = functools.partial(_dense_kernel, scale=scale, block_t=block_t, split_len=split_len)
    cache_specs = [pl.BlockSpec((None, split_len, x.shape[-1]), lambda i, g, j: (i, j, 0)) for x in (c_kv, k_pe)]
    o_parts, lse = _split_call(kernel, q_lat, q_pe, bh, splits, (c_kv, k_pe), cache_specs,
                               (lengths.astype(jnp.int32),), (_LENGTH_SPEC,), num_warps, num_stages, interpret)
    return combine_splits(o_parts, lse)[:, :h, :r].astype(dtype)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "pages_per_split"))
def mla_decode_paged(q_lat: jax.Array, q_pe: jax.Array, c_kv_pages: jax.Array, k_pe_pages: jax.Array,
                     block_table: jax.Array, lengths: jax.Array, *, scale: float, pages_per_split: int = 0,
                     block_h: int = 64, num_splits: int = 0, num_warps: int = 4, num_stages: int = 2,
                     interpret: bool = False) -> jax.Array:
    """Absorbed MLA decode over a paged latent cache, as FlashMLA and vLLM serve it.

    c_kv_pages (P, page, r) and k_pe_pages (P, page, R, d_r) are the page pool; block_table
    (B, max_pages) int lists sequence b's pages in order (slot t of b lies in page
    block_table[b, t // page], row t % page); entries past a sequence's length are never read.
    lengths (B,) in [1, max_pages * page] -> o_lat (B, H, r). The page size must be a power of 2
    >= 16 (it is the tile). A split covers ``pages_per_split`` pages (0: from ``choose_splits``).
    """
    b, h, r = q_lat.shape
    num_pages, page, rope_heads, d_r = _check_pages(q_lat, q_pe, c_kv_pages, k_pe_pages, block_table,
                                                    "mla_decode_paged")
    if page & (page - 1) or page < 16:
        raise ValueError(f"mla_decode_paged: the page size must be a power of 2 >= 16, got {page}")
    dtype = c_kv_pages.dtype
    q_lat, q_pe, bh = _queries(q_lat, q_pe, rope_heads, dtype, block_h)
    c_pool = _pad_to(c_kv_pages, num_pages, page, q_lat.shape[-1])
    k_pool = _pad_to(k_pe_pages.reshape(num_pages, page, rope_heads * d_r).astype(dtype), num_pages, page,
                     q_pe.shape[-1])
    max_pages = block_table.shape[1]
    per_split = pages_per_split or max_pages // choose_splits(b * (q_lat.shape[1] // bh), max_pages, min_tiles=8)
    splits = -(-max_pages // per_split)
    table = _pad_to(block_table.astype(jnp.int32), b, _next_pow2(splits * per_split, 1))
    kernel = functools.partial(_paged_kernel, scale=scale, page=page, pages_per_split=per_split)
    table_spec = pl.BlockSpec((None, table.shape[1]), lambda i, g, j: (i, 0))
    pool_specs = [pl.BlockSpec(x.shape, lambda i, g, j: (0, 0, 0)) for x in (c_pool, k_pool)]
    o_parts, lse = _split_call(kernel, q_lat, q_pe, bh, splits, (c_pool, k_pool), pool_specs,
                               (lengths.astype(jnp.int32), table), (_LENGTH_SPEC, table_spec),
                               num_warps, num_stages, interpret)
    return combine_splits(o_parts, lse)[:, :h, :r].astype(dtype)


def gather_pages(pages: jax.Array, block_table: jax.Array) -> jax.Array:
    """The dense cache of a page pool: pages (P, page, ...), block_table (B, max_pages)
    -> (B, max_pages * page, ...). The XLA twin of the paged kernel reads through this."""
    dense = pages[block_table]                                   # (B, max_pages, page, ...)
    return dense.reshape(block_table.shape[0], -1, *pages.shape[2:])
