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


def _decode_kernel(lengths_ref, q_lat_ref, q_pe_ref, c_kv_ref, k_pe_ref, o_ref, lse_ref, *,
                   scale: float, block_t: int, split_len: int):
    """One (sequence, head block, split) cell. Refs: lengths (1,), q_lat (bh, r), q_pe (bh, p),
    c_kv (split_len, r), k_pe (split_len, p); outputs o (bh, r) float32, lse (bh,) float32."""
    split = pl.program_id(2)
    start = split * split_len
    valid = jnp.clip(lengths_ref[0] - start, 0, split_len)  # slots of this split below the length
    q_lat, q_pe = q_lat_ref[...], q_pe_ref[...]
    bh, r = q_lat.shape

    def tile(i, carry):
        acc, m, l = carry
        rows = pl.ds(i * block_t, block_t)
        seen = (i * block_t + jnp.arange(block_t)) < valid
        # slots past the length in the last tile: zeroed, so stale NaN / inf there cannot leak in
        c = jnp.where(seen[:, None], c_kv_ref[rows, :], 0)   # (bt, r): key and value
        k = jnp.where(seen[:, None], k_pe_ref[rows, :], 0)   # (bt, p)
        s = lax.dot_general(q_lat, c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s += lax.dot_general(q_pe, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * scale
        s = jnp.where(seen[None, :], s, MASKED)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        acc = acc * correction[:, None] + jnp.dot(p.astype(c.dtype), c, preferred_element_type=jnp.float32)
        return acc, m_new, l * correction + p.sum(axis=1)

    init = (jnp.zeros((bh, r), jnp.float32), jnp.full((bh,), MASKED, jnp.float32), jnp.zeros((bh,), jnp.float32))
    acc, m, l = lax.fori_loop(0, pl.cdiv(valid, block_t), tile, init)  # dynamic trip count: empty tails skipped
    nonempty = l > 0
    o_ref[...] = acc / jnp.where(nonempty, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), MASKED)


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


@functools.partial(jax.jit, static_argnames=("scale", "block_t", "block_h", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
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
    if c_kv.shape[:2] != (b, s) or q_pe.shape != (b, h, d_r) or c_kv.shape[2] != r:
        raise ValueError(f"mla_decode shapes disagree: q_lat {q_lat.shape}, q_pe {q_pe.shape}, "
                         f"c_kv {c_kv.shape}, k_pe {k_pe.shape}")
    if h % rope_heads:
        raise ValueError(f"mla_decode: {h} query heads do not group over {rope_heads} RoPE keys")
    if block_t & (block_t - 1) or block_t < 16:
        raise ValueError(f"mla_decode: block_t must be a power of 2 >= 16, got {block_t}")
    dtype = c_kv.dtype
    q_pe = widen_rope_query(q_pe, rope_heads)
    k_pe = k_pe.reshape(b, s, rope_heads * d_r)
    bh = min(_next_pow2(h), _next_pow2(block_h))
    h_pad, r_pad, p_pad, s_pad = -(-h // bh) * bh, _next_pow2(r), _next_pow2(rope_heads * d_r), -(-s // block_t) * block_t
    pad = lambda x, *widths: jnp.pad(x, [(0, w - n) for w, n in zip(widths, x.shape)]) if widths != x.shape else x
    q_lat, q_pe = pad(q_lat.astype(dtype), b, h_pad, r_pad), pad(q_pe.astype(dtype), b, h_pad, p_pad)
    c_kv, k_pe = pad(c_kv, b, s_pad, r_pad), pad(k_pe.astype(dtype), b, s_pad, p_pad)
    tiles = s_pad // block_t
    splits = num_splits or choose_splits(b * (h_pad // bh), tiles)
    if tiles % splits:
        raise ValueError(f"mla_decode: num_splits {splits} does not divide the cache's {tiles} tiles of {block_t}")
    split_len = s_pad // splits
    kernel = functools.partial(_decode_kernel, scale=scale, block_t=block_t, split_len=split_len)
    o_parts, lse = pl.pallas_call(
        kernel,
        grid=(b, h_pad // bh, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, g, j: (i,)),
            pl.BlockSpec((None, bh, r_pad), lambda i, g, j: (i, g, 0)),
            pl.BlockSpec((None, bh, p_pad), lambda i, g, j: (i, g, 0)),
            pl.BlockSpec((None, split_len, r_pad), lambda i, g, j: (i, j, 0)),
            pl.BlockSpec((None, split_len, p_pad), lambda i, g, j: (i, j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bh, r_pad), lambda i, g, j: (i, j, g, 0)),
            pl.BlockSpec((None, None, bh), lambda i, g, j: (i, j, g)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, splits, h_pad, r_pad), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, h_pad), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="mla_decode",
    )(lengths.astype(jnp.int32), q_lat, q_pe, c_kv, k_pe)
    return combine_splits(o_parts, lse)[:, :h, :r].astype(dtype)
