"""What every absorbed-MLA decode kernel shares: queries, one online-softmax step, splits, combine.

The kernels (``mla_decode`` on Triton, ``mla_decode_tpu`` on Mosaic TPU, ``mla_decode_mgpu`` on
Mosaic GPU) compute, for one new query per sequence over a latent cache (DeepSeek-AI 2024,
"DeepSeek-V2", section 2.1.3, W_UK folded into the query):

    s[b, h, t] = (q_lat[b, h] . c_kv[b, t] + q_pe[b, h] . k_pe[b, t, g(h)]) * scale,  t < L_b
    o_lat[b, h] = sum_t softmax_t(s[b, h, :]) c_kv[b, t]

by flash-decoding (Dao et al. 2023): split j of sequence b covers a chunk of cache slots, walks it
in tiles with FlashAttention-2's online softmax (m, l, acc in float32) and writes acc / l and
lse = m + log l; ``combine_splits`` merges the splits by log-sum-exp.

Base 2 (as FlashAttention's kernels): ``prepare_queries`` multiplies the queries by
scale * log2(e), so a tile's scores come out of the dots as s * log2(e) and the step uses exp2,
with no multiply per score; ``finish_split`` turns the base-2 lse back into natural units.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

MASKED = -1e30  # finite: exp2(MASKED - m) is 0 and an empty split stays NaN-free
LOG2E = math.log2(math.e)
HOPPER_SMS = 132  # H100 and H200


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def check_queries(q_lat, q_pe, cache_rank: int, rope_heads: int, d_r: int, where: str) -> None:
    b, h, r = q_lat.shape
    if q_pe.shape != (b, h, d_r) or cache_rank != r:
        raise ValueError(f"{where}: shapes disagree: q_lat {q_lat.shape}, q_pe {q_pe.shape}, "
                         f"cache rank {cache_rank}, RoPE keys of {d_r}")
    if h % rope_heads:
        raise ValueError(f"{where}: {h} query heads do not group over {rope_heads} RoPE keys")


def check_pages(q_lat, q_pe, c_kv_pages, k_pe_pages, block_table, where: str):
    """Checks a page pool against the queries -> (num_pages, page, R, d_r)."""
    num_pages, page, rope_heads, d_r = k_pe_pages.shape
    if c_kv_pages.shape[:2] != (num_pages, page) or block_table.shape[0] != q_lat.shape[0]:
        raise ValueError(f"{where}: pools {c_kv_pages.shape} / {k_pe_pages.shape} and block table "
                         f"{block_table.shape} disagree")
    check_queries(q_lat, q_pe, c_kv_pages.shape[2], rope_heads, d_r, where)
    return num_pages, page, rope_heads, d_r


def widen_rope_query(q_pe: jax.Array, rope_heads: int) -> jax.Array:
    """q_pe (B, H, d_r) -> (B, H, R d_r) with head h's values in block g(h) = h // (H / R), zeros elsewhere.

    Then q_pe_wide . k_pe.reshape(S, R d_r) = q_pe[h] . k_pe[g(h)]: R > 1 RoPE keys need no second code path."""
    b, h, d = q_pe.shape
    group = jnp.arange(h) // (h // rope_heads)
    onehot = jax.nn.one_hot(group, rope_heads, dtype=q_pe.dtype)  # (H, R)
    return (onehot[None, :, :, None] * q_pe[:, :, None, :]).reshape(b, h, rope_heads * d)


def pad_to(x: jax.Array, *shape: int) -> jax.Array:
    """Zero-pads x at the end of each axis to ``shape`` (no copy when it already has it)."""
    return x if x.shape == shape else jnp.pad(x, [(0, w - n) for w, n in zip(shape, x.shape)])


def prepare_queries(q_lat, q_pe, scale: float, rope_heads: int, dtype, h_pad: int, r_pad: int, p_pad: int):
    """The kernels' queries (a few KB; the cache is never touched here): both multiplied by
    scale * log2(e) in float32, q_pe widened to the R RoPE keys, cast to the cache's dtype and
    zero-padded -> q_lat (B, h_pad, r_pad), q_pe (B, h_pad, p_pad)."""
    b = q_lat.shape[0]
    fold = scale * LOG2E
    q_lat = (q_lat.astype(jnp.float32) * fold).astype(dtype)
    q_pe = (widen_rope_query(q_pe.astype(jnp.float32), rope_heads) * fold).astype(dtype)
    return pad_to(q_lat, b, h_pad, r_pad), pad_to(q_pe, b, h_pad, p_pad)


def init_carry(heads: int, rank: int):
    """(acc (heads, rank), m (heads,), l (heads,)) before the first tile, float32."""
    return (jnp.zeros((heads, rank), jnp.float32), jnp.full((heads,), MASKED, jnp.float32),
            jnp.zeros((heads,), jnp.float32))


def attend_tile(carry, q_lat, q_pe, c_tile, k_tile, seen):
    """One online-softmax step in base 2 over a tile: carry (acc (bh, r), m (bh,), l (bh,)) f32;
    queries from ``prepare_queries``; c_tile (bt, r) is key and value; k_tile (bt, p); seen (bt,)
    marks slots below the length. Only the scores are masked: the tiles go to the dots as loaded
    (rewriting a loaded tile stops Triton from keeping the next one in flight), so slots past the
    length must hold finite numbers (a masked load's zeros; ``zero_unseen`` where loads cannot mask)."""
    acc, m, l = carry
    s = lax.dot_general(q_lat, c_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s += lax.dot_general(q_pe, k_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = jnp.where(seen[None, :], s, MASKED)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp2(s - m_new[:, None])
    correction = jnp.exp2(m - m_new)
    acc = acc * correction[:, None] + jnp.dot(p.astype(c_tile.dtype), c_tile, preferred_element_type=jnp.float32)
    return acc, m_new, l * correction + p.sum(axis=1)


def zero_unseen(tile: jax.Array, seen: jax.Array) -> jax.Array:
    """tile (bt, n) with the rows past the length zeroed, for kernels whose loads cannot mask
    (TPU blocks): 0 * NaN in the value dot would otherwise reach the output."""
    return jnp.where(seen[:, None], tile, 0)


def finish_split(acc, m, l):
    """-> (acc / l, lse in natural units); lse = MASKED for a split with no slot below the length."""
    nonempty = l > 0
    safe_l = jnp.where(nonempty, l, 1.0)
    return acc / safe_l[:, None], jnp.where(nonempty, (m + jnp.log2(safe_l)) / LOG2E, MASKED)


def combine_splits(o_parts: jax.Array, lse: jax.Array) -> jax.Array:
    """Log-sum-exp merge of per-split results: o_parts (B, N, H, r), lse (B, N, H) -> (B, H, r) f32.

        o = sum_j exp(lse_j - M) o_j / sum_j exp(lse_j - M),   M = max_j lse_j
    """
    top = lse.max(axis=1, keepdims=True)
    w = jnp.exp(lse - top)                                      # an empty split weighs 0
    return (w[..., None] * o_parts).sum(axis=1) / w.sum(axis=1)[..., None]


def gather_pages(pages: jax.Array, block_table: jax.Array) -> jax.Array:
    """The dense cache of a page pool: pages (P, page, ...), block_table (B, max_pages)
    -> (B, max_pages * page, ...). The XLA twin of a paged kernel reads through this."""
    dense = pages[block_table]                                   # (B, max_pages, page, ...)
    return dense.reshape(block_table.shape[0], -1, *pages.shape[2:])


def choose_splits(cells: int, tiles: int, ctas_per_sm: int, min_tiles: int, sms: int = HOPPER_SMS) -> int:
    """Splits per (sequence, head block) cell so that the grid fills the GPU in one wave.

    ``cells`` sequences x head blocks, ``tiles`` tiles in the cache, ``ctas_per_sm`` programs one
    SM holds at once for the chosen launch (its shared memory and registers). One split when the
    cells alone fill the SMs; otherwise the most splits that keep cells x splits within one wave
    of sms x ctas_per_sm, each split at least ``min_tiles`` tiles long (float32 partials cost about
    H r / (split_len (r + d_r)) of the cache's bytes).
    """
    wave = sms * max(ctas_per_sm, 1)
    return max(1, min(wave // max(cells, 1), tiles // max(min_tiles, 1)))
