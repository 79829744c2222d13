"""Absorbed MLA decode in Pallas Mosaic GPU (Hopper: TMA loads, wgmma, warp specialization).

One new query per sequence attends over the latent cache with W_UK folded into the query
(DeepSeek-AI 2024, "DeepSeek-V2", section 2.1.3), as ``research.kernels.mla_decode`` does in Triton:

    s[b, h, t] = (q_lat[b, h] . c_kv[b, t] + q_pe[b, h] . k_pe[b, t]) * scale,   t < lengths[b]
    o_lat[b, h] = sum_t softmax_t(s[b, h, :]) c_kv[b, t]          (W_UV is applied by the caller)

Shapes: q_lat (B, H, r), q_pe (B, H, d_r), c_kv (B, S, r), k_pe (B, S, R, d_r), lengths (B,) int in
[1, S] -> o_lat (B, H, r) in c_kv's dtype (bfloat16 or float16). DeepSeek-V2: r 512, d_r 64,
H 16 or 128, R 1. R > 1 RoPE keys go through ``widen_rope_query`` as in the Triton wrapper (q_pe of
head h in block g(h) = h // (H / R) of a zero (H, R d_r) query; k_pe flattened to (S, R d_r)).

Design
------
* Grid (B, head blocks, splits) of CTAs (flash-decoding, Dao et al. 2023). Split j of sequence b
  owns cache slots [j L, (j + 1) L) (L a multiple of 64) and walks its ``cdiv(valid, 64)`` tiles of
  64 slots, valid = clip(lengths[b] - j L, 0, L): a dynamic trip count, so slots past a sequence's
  length are never loaded except in the last, partial tile, whose rows >= valid are zeroed in
  shared memory before the value matmul and masked (-1e30) in the scores. A split past the length
  does no work and reports lse = -1e30. The split count fills 132 SMs (H100 / H200) in one wave with
  at least 4 tiles (256 slots) per split; the per-split float32 (o, lse) are merged by
  ``research.kernels.flash_decode.combine_splits`` (log-sum-exp).
* Warp specialization (as jax's FlashAttention-3 kernel, ``attention_mgpu.py``): the last warpgroup
  is a producer that only issues TMA copies (``plgpu.copy_gmem_to_smem``) of c_kv (64, r) and k_pe
  (64, d_r) tiles into a ring of 2-3 shared-memory stages, each stage guarded by a "loaded" barrier
  (both copies) and a "consumed" barrier that every consumer warpgroup arrives on; the producer
  waits on it before refilling the slot (and, at the end, for the last tiles' consumption). The
  stage count is the most (<= 3) that fits 227 KB: a 64 x 512 bf16 tile is 64 KB, so DeepSeek
  shapes get 2 stages: 170,032 bytes of shared memory in all at H 16, 223,280 at H 128 (the
  figures Mosaic GPU's lowering allocates; ``make_plan`` computes them).
* H <= 32: tokens on wgmma's M side (M = 64 per warpgroup), one consumer warpgroup holding the
  h = H rounded up to 8, 16 or 32 heads:
      S^T (64, h) = C (64, r) @ Q^T + K_pe (64, d_r) @ Q_pe^T             (C as A, K-major)
      O^T (r, h) += C^T (r, 64) @ P^T (64, h)                             (C^T as A, MN-major)
  C is the same shared-memory tile as key and value (``plgpu.transpose_ref``: an MN-major A, which
  wgmma allows for 16-bit types); O^T needs r h / 128 <= 128 registers per thread, and no MMA row
  is spent on padded heads. P^T goes back to shared memory through a transposed store (layout
  WGMMA_TRANSPOSED): Mosaic requires wgmma's B to share A's 128-byte swizzle, so it is kept as P
  (h, 64) and read through a transposed view. The per-head softmax statistics reduce over tokens,
  across the 4 warps, through Mosaic's reduction scratch in shared memory.
* H > 32: 64 heads per CTA on wgmma's M side (as FlashMLA; H padded to a multiple of 64, each
  further 64 heads a head block that reads the cache again), two consumer warpgroups that split r:
  each computes S (64, 64) = Q C^T + Q_pe K_pe^T and the softmax (identical values, nothing
  exchanged) and O[:, half] += P C[:, half] with P in registers (as FlashAttention-3), 128
  registers of accumulator per thread where one warpgroup holding O (64, 512) would need 256. Not
  tokens on M with two warpgroups: Mosaic GPU's cross-warp reductions (axis 0 of a WGMMA-layout
  array) use one shared scratch buffer for the whole CTA, indexed by the thread's position within
  its warpgroup, so two warpgroups reducing at once would race; axis-1 reductions stay in a warp.
* A split whose tiles lie past the length does no work; the last, partial tile of a split has its
  rows >= valid zeroed in shared memory (each consumer zeroes its share of the columns, then the
  consumers meet at a barrier) before any wgmma reads it, since P = 0 does not cancel a stale
  NaN or inf (0 * NaN = NaN); its scores there are masked to -1e30.
* Online softmax in float32 (FlashAttention-2's m, l, acc) with exp2: scale * log2(e) multiplies
  the float32 scores (one FMA-able multiply per score; folding it into the bfloat16 query instead
  would round the query a second time). lse is returned in natural log.

Restrictions (each raises a ValueError naming the argument): r a multiple of 64 (TMA / 128-byte
swizzle of the C tile), R d_r a multiple of 16, S a multiple of 64 (the tile), bfloat16 or float16
(wgmma reads float32 operands only K-major, and one C tile cannot be K-major both as key and as
value: use ``research.kernels.mla_decode`` for float32).

``interpret=True`` (or ``interpret_params(...)``) runs the kernel in Mosaic GPU's interpreter
(``InterpretGPUParams``: private ``jax._src.pallas.mosaic_gpu.interpret`` in jax 0.10.2 and 0.11.1).
jax 0.10.2's interpreter does not implement several ops this kernel uses (``layout_cast``,
``run_state``, transposed wgmma operands and stores, wgmma's A in registers), so there it fails
unless they are supplied, as ``tests/kernels/test_mla_decode_mgpu.py`` does to check values on CPU.
Status: lowered for CUDA and value-checked in that interpreter only; not yet compiled by ptxas,
run or timed on a GPU.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from research.kernels.flash_decode import LOG2E, MASKED, choose_splits, combine_splits, widen_rope_query

TILE = 64                 # cache slots per tile: wgmma's M per warpgroup
SMEM_BUDGET = 232_448     # bytes of shared memory per block on Hopper (227 KB, with the opt-in)
MIN_SPLIT_TILES = 4       # f32 partials cost ~ H r / (split_len (r + d_r)) of the cache's bytes
_REDUCTION_SCRATCH = 128 * 4 * 4  # plgpu.CompilerParams' default reduction_scratch_bytes
_LN2 = math.log(2.0)

# jax 0.11 renamed plgpu.kernel's out_shape / scratch_shapes to out_type / scratch_types
# (0.10.2 accepts both, warning on the old names).
_KERNEL_PARAMS = inspect.signature(plgpu.kernel).parameters
_OUT_KW = "out_type" if "out_type" in _KERNEL_PARAMS else "out_shape"
_SCRATCH_KW = "scratch_types" if "scratch_types" in _KERNEL_PARAMS else "scratch_shapes"


def interpret_params(**kwargs):
    """Mosaic GPU interpreter parameters, e.g. ``detect_races=True`` (``plgpu.InterpretGPUParams``
    where jax exports it, else the private class); pass them as ``interpret=``."""
    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static launch plan. ``tokens_on_m`` (H <= 32): one consumer warpgroup holding O^T (r, heads);
    else two consumer warpgroups on the same 64 heads, each holding O[:, its half of r]. ``heads``
    per CTA (a head block), ``stages`` ring slots of one c_kv and one k_pe tile, ``splits`` of
    ``split_len`` slots, ``smem_bytes`` as Mosaic GPU allocates them."""
    tokens_on_m: bool
    heads: int
    consumers: int
    head_blocks: int
    stages: int
    splits: int
    split_len: int
    smem_bytes: int


def _smem_bytes(r: int, p: int, heads: int, tokens_on_m: bool, stages: int, itemsize: int) -> int:
    """Shared memory of the kernel as Mosaic GPU lays it out: each buffer aligned to 1024 bytes
    (queries, P^T for tokens on M, the c_kv and k_pe rings), then 8-byte barriers (q, loaded x
    stages, consumed x stages, zeroed) and the reduction scratch."""
    align = lambda n: -(-n // 1024) * 1024
    buffers = [heads * r, heads * p, heads * TILE if tokens_on_m else 0, stages * TILE * r, stages * TILE * p]
    return sum(align(n * itemsize) for n in buffers) + 8 * (2 * stages + 2) + _REDUCTION_SCRATCH


def make_plan(batch: int, heads: int, r: int, p: int, s: int, itemsize: int,
              num_splits: int = 0, num_stages: int = 0) -> Plan:
    """The heads' layout, the most stages (<= 3) that fit 227 KB, and splits filling 132 SMs."""
    tokens_on_m = heads <= 32
    per_block = (8 if heads <= 8 else 16 if heads <= 16 else 32) if tokens_on_m else 64
    fits = [n for n in (2, 3) if _smem_bytes(r, p, per_block, tokens_on_m, n, itemsize) <= SMEM_BUDGET]
    if not fits:
        raise ValueError(f"mla_decode_mgpu: a cache rank r = {r} with d_r = {p} needs "
                         f"{_smem_bytes(r, p, per_block, tokens_on_m, 2, itemsize):,} bytes of shared memory "
                         f"for 2 stages of 64-slot tiles, more than {SMEM_BUDGET:,}; use r <= 512")
    stages = num_stages or max(fits)
    if stages not in fits:
        raise ValueError(f"mla_decode_mgpu: num_stages = {num_stages} does not fit {SMEM_BUDGET:,} bytes "
                         f"of shared memory (choose from {fits})")
    head_blocks, tiles = -(-heads // per_block), s // TILE
    # one CTA per SM: over 113 KB of shared memory at r 512, and registers not yet read off a compile
    splits = num_splits or choose_splits(batch * head_blocks, tiles, ctas_per_sm=1, min_tiles=MIN_SPLIT_TILES)
    per_split = -(-tiles // splits)
    if not num_splits:
        splits = -(-tiles // per_split)       # no split that lies wholly past S
    return Plan(tokens_on_m, per_block, 1 if tokens_on_m else 2, head_blocks, stages, splits,
                per_split * TILE, _smem_bytes(r, p, per_block, tokens_on_m, stages, itemsize))


def _swizzled(minor: int, itemsize: int):
    """Tiling + swizzle transforms for a shared-memory buffer whose rows have ``minor`` elements."""
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _zero_rows_from(tile_ref, first: jax.Array, r: int, part: jax.Array | int, parts: int):
    """tile_ref (64, r) in shared memory: rows >= first set to 0 in the 64-column blocks k with
    k % parts == part (one warpgroup's share; 64 x 64 values in registers at a time)."""
    row = plgpu.broadcasted_iota(jnp.int32, (TILE, 64), 0, layout=plgpu.Layout.WGMMA)
    keep = row < first
    for k in range(r // 64):
        @pl.when(part == k % parts)
        def _():
            block = tile_ref.at[:, pl.ds(k * 64, 64)]
            block[...] = jnp.where(keep, block[...], jnp.zeros((), block.dtype))


def _finish(m, l):
    """1 / l (0 for an empty split) and lse = ln 2 * m + ln l (MASKED for an empty split)."""
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    return jnp.where(seen, 1.0 / safe_l, 0.0), jnp.where(seen, m * _LN2 + jnp.log(safe_l), MASKED)


def _kernel(lengths_ref, q_ref, qpe_ref, c_ref, k_ref, o_ref, lse_ref, *,
            q_smem, qpe_smem, c_ring, k_ring, q_bar, loaded, consumed, zeroed, p_smem=None,
            plan: Plan, r: int, scale_log2: float):
    """One (sequence, head block, split) CTA; warpgroups 0..nc-1 consume, warpgroup nc produces.
    Refs (GMEM): lengths (B,), q (B, Hpad, r), qpe (B, Hpad, p), c (B, S, r), k (B, S, p); out
    lse (B, N, HB, heads) f32 and o f32: (B, N, HB, r, heads) (O^T) for tokens on M, else
    (B, N, HB, heads, r). Scratch (SMEM): q (heads, r), qpe (heads, p), p (heads, 64) for tokens
    on M, rings (stages, 64, r) and (stages, 64, p); barriers q (2 copies), loaded (stages, 2 copies
    each), consumed (stages, nc arrivals each), zeroed (nc arrivals)."""
    nc, stages, split_len = plan.consumers, plan.stages, plan.split_len
    b, hb, j = lax.axis_index("b"), lax.axis_index("hb"), lax.axis_index("split")
    wg = lax.axis_index("wg")
    start = j * split_len
    valid = jnp.clip(lengths_ref[b] - start, 0, split_len)
    n_tiles = lax.div(valid + (TILE - 1), TILE)

    @pl.when(wg == nc)
    def _producer():
        if nc > 1:
            plgpu.set_max_registers(40, action="decrease")

        def load(i, slot):
            rows = pl.ds(start + i * TILE, TILE)
            plgpu.copy_gmem_to_smem(c_ref.at[b, rows], c_ring.at[slot], loaded.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows], k_ring.at[slot], loaded.at[slot])

        for i in range(stages):
            pl.when(i < n_tiles)(functools.partial(load, i, i))

        @pl.loop(stages, n_tiles + stages)   # past n_tiles: only drain the last consumptions
        def _refill(i):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(consumed.at[slot])   # tile i - stages is done with this slot
            pl.when(i < n_tiles)(functools.partial(load, i, slot))

    @pl.when(wg < nc)
    def _consumer():
        if nc > 1:
            plgpu.set_max_registers(232, action="increase")
        heads = pl.ds(hb * plan.heads, plan.heads)

        @pl.when(wg == 0)
        def _():
            plgpu.copy_gmem_to_smem(q_ref.at[b, heads], q_smem, q_bar)
            plgpu.copy_gmem_to_smem(qpe_ref.at[b, heads], qpe_smem, q_bar)

        plgpu.barrier_wait(q_bar)

        def tile(i):
            """Waits for tile i; zeroes its rows past the length if it is the partial last one."""
            slot = lax.rem(i, stages)
            rows_left = valid - i * TILE
            plgpu.barrier_wait(loaded.at[slot])

            @pl.when(rows_left < TILE)  # stale slots must not reach O (0 * NaN): zero them
            def _():
                _zero_rows_from(c_ring.at[slot], rows_left, r, wg, nc)   # each consumer its share
                plgpu.commit_smem()
                if nc > 1:  # ... and every share is written before any consumer reads the tile
                    plgpu.barrier_arrive(zeroed)
                    plgpu.barrier_wait(zeroed)

            return slot, c_ring.at[slot], k_ring.at[slot], rows_left

        if plan.tokens_on_m:
            _consume_tokens_on_m(tile, n_tiles, q_smem, qpe_smem, p_smem, consumed, o_ref.at[b, j, hb],
                                 lse_ref.at[b, j, hb], plan, r, scale_log2)
        else:
            _consume_heads_on_m(tile, n_tiles, q_smem, qpe_smem, consumed, o_ref.at[b, j, hb],
                                lse_ref.at[b, j, hb], wg, plan, r, scale_log2)


def _consume_tokens_on_m(tile, n_tiles, q_smem, qpe_smem, p_smem, consumed, o_ref, lse_ref,
                         plan: Plan, r: int, scale_log2: float):
    """H <= 32, one consumer warpgroup: S^T (64, h) = C Q^T + K_pe Q_pe^T, O^T (r, h) += C^T P^T.
    Per-head statistics reduce over tokens (axis 0, across the 4 warps, through shared scratch)."""
    h = plan.heads
    q_t, qpe_t, p_t = (plgpu.transpose_ref(x, (1, 0)) for x in (q_smem, qpe_smem, p_smem))
    col = plgpu.Layout.WGMMA.reduce(0)
    m = plgpu.layout_cast(jnp.full((h,), MASKED, jnp.float32), col)
    l = plgpu.layout_cast(jnp.full((h,), 0.0, jnp.float32), col)
    acc = plgpu.layout_cast(jnp.full((r, h), 0.0, jnp.float32), plgpu.Layout.WGMMA)

    def step(i, carry):
        acc, m, l = carry
        slot, c_tile, k_tile, rows_left = tile(i)

        def scores(s_ref):
            plgpu.wgmma(s_ref, c_tile, q_t)
            plgpu.wgmma(s_ref, k_tile, qpe_t)
            return s_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((TILE, h), jnp.float32))
        row = plgpu.broadcasted_iota(jnp.int32, (TILE, h), 0, layout=plgpu.Layout.WGMMA)
        s = jnp.where(row < rows_left, s * scale_log2, MASKED)
        m_new = jnp.maximum(m, s.max(axis=0))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [1]))
        l = l * alpha + p.sum(axis=0)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
        # wgmma's B must share A's 128-byte swizzle: P^T is stored transposed, as P (h, 64)
        p_t[...] = plgpu.layout_cast(p.astype(p_smem.dtype), plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.commit_smem()

        def values(o_acc):
            plgpu.wgmma(o_acc, plgpu.transpose_ref(c_tile, (1, 0)), p_t)

        acc = pl.run_state(values)(plgpu.ACC.init(acc))   # returns once the wgmma is done
        plgpu.barrier_arrive(consumed.at[slot])
        return acc, m_new, l

    acc, m, l = lax.fori_loop(0, n_tiles, step, (acc, m, l))
    inv, lse = _finish(m, l)
    o_ref[...] = acc * lax.broadcast_in_dim(inv, acc.shape, [1])
    lse_ref[...] = lse


def _consume_heads_on_m(tile, n_tiles, q_smem, qpe_smem, consumed, o_ref, lse_ref, wg,
                        plan: Plan, r: int, scale_log2: float):
    """H > 32, two consumer warpgroups on the same 64 heads (as FlashMLA): each computes
    S (64, 64) = Q C^T + Q_pe K_pe^T and the softmax (the same values, no exchange), and
    O[:, half] += P C[:, half] with P in registers. Statistics reduce within warps (axis 1)."""
    h, half = plan.heads, r // 2
    cols = pl.ds(wg * half, half)
    row_stat = plgpu.Layout.WGMMA.reduce(1)
    m = plgpu.layout_cast(jnp.full((h,), MASKED, jnp.float32), row_stat)
    l = plgpu.layout_cast(jnp.full((h,), 0.0, jnp.float32), row_stat)
    acc = plgpu.layout_cast(jnp.full((h, half), 0.0, jnp.float32), plgpu.Layout.WGMMA)

    def step(i, carry):
        acc, m, l = carry
        slot, c_tile, k_tile, rows_left = tile(i)

        def scores(s_ref):
            plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(c_tile, (1, 0)))
            plgpu.wgmma(s_ref, qpe_smem, plgpu.transpose_ref(k_tile, (1, 0)))
            return s_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((h, TILE), jnp.float32))
        slot_ids = plgpu.broadcasted_iota(jnp.int32, (h, TILE), 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(slot_ids < rows_left, s * scale_log2, MASKED)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(c_tile.dtype)

        def values(o_acc):
            plgpu.wgmma(o_acc, p16, c_tile.at[:, cols])

        acc = pl.run_state(values)(plgpu.ACC.init(acc))   # returns once the wgmma is done
        plgpu.barrier_arrive(consumed.at[slot])
        return acc, m_new, l

    acc, m, l = lax.fori_loop(0, n_tiles, step, (acc, m, l))
    inv, lse = _finish(m, l)
    o_ref.at[:, cols][...] = acc * lax.broadcast_in_dim(inv, acc.shape, [0])

    @pl.when(wg == 0)
    def _():
        lse_ref[...] = lse


def _check(q_lat, q_pe, c_kv, k_pe, lengths):
    if q_lat.ndim != 3 or q_pe.ndim != 3 or c_kv.ndim != 3 or k_pe.ndim != 4 or lengths.ndim != 1:
        raise ValueError(f"mla_decode_mgpu: expected q_lat (B, H, r), q_pe (B, H, d_r), c_kv (B, S, r), "
                         f"k_pe (B, S, R, d_r), lengths (B,); got {q_lat.shape}, {q_pe.shape}, "
                         f"{c_kv.shape}, {k_pe.shape}, {lengths.shape}")
    b, h, r = q_lat.shape
    _, s, rope_heads, d_r = k_pe.shape
    if c_kv.shape != (b, s, r) or q_pe.shape != (b, h, d_r) or k_pe.shape[0] != b or lengths.shape != (b,):
        raise ValueError(f"mla_decode_mgpu: shapes disagree: q_lat {q_lat.shape}, q_pe {q_pe.shape}, "
                         f"c_kv {c_kv.shape}, k_pe {k_pe.shape}, lengths {lengths.shape}")
    if h % rope_heads:
        raise ValueError(f"mla_decode_mgpu: {h} query heads do not group over {rope_heads} RoPE keys (k_pe)")
    if jnp.dtype(c_kv.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"mla_decode_mgpu: c_kv must be bfloat16 or float16, got {c_kv.dtype}: wgmma reads "
                         "float32 operands only K-major, and one c_kv tile cannot be K-major both as key "
                         "and as value; cast the cache or use research.kernels.mla_decode.mla_decode")
    if r % 64:
        raise ValueError(f"mla_decode_mgpu: the cache rank r (c_kv.shape[-1]) must be a multiple of 64 for "
                         f"the 128-byte swizzled TMA tiles, got {r}; pad c_kv and q_lat with zeros")
    if (rope_heads * d_r) % 16:
        raise ValueError(f"mla_decode_mgpu: the RoPE width R * d_r (k_pe) must be a multiple of 16 "
                         f"(32-byte swizzled TMA rows), got {rope_heads} * {d_r}; pad k_pe and q_pe with zeros")
    if s % TILE:
        raise ValueError(f"mla_decode_mgpu: the cache length S (c_kv.shape[1]) must be a multiple of the "
                         f"{TILE}-slot tile, got {s}; allocate the cache in multiples of {TILE}")


def unsupported_reason(q_lat, q_pe, c_kv, k_pe, lengths) -> str | None:
    """None when ``mla_decode_mgpu`` takes these shapes and dtypes, else the ValueError's message."""
    try:
        _check(q_lat, q_pe, c_kv, k_pe, lengths)
    except ValueError as e:
        return str(e)
    return None


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "num_stages", "interpret"))
def mla_decode_mgpu(q_lat: jax.Array, q_pe: jax.Array, c_kv: jax.Array, k_pe: jax.Array, lengths: jax.Array,
                    *, scale: float, num_splits: int = 0, num_stages: int = 0,
                    interpret=False) -> jax.Array:
    """Absorbed MLA decode (see the module docstring): q_lat (B, H, r), q_pe (B, H, d_r),
    c_kv (B, S, r), k_pe (B, S, R, d_r), lengths (B,) in [1, S] -> o_lat (B, H, r), c_kv's dtype.

    ``num_splits`` 0 fills 132 SMs in one wave; ``num_stages`` 0 takes the most (<= 3) shared-memory
    stages that fit. ``interpret`` (True or ``interpret_params(...)``) runs Mosaic GPU's interpreter
    instead of compiling for Hopper.
    """
    _check(q_lat, q_pe, c_kv, k_pe, lengths)
    b, h, r = q_lat.shape
    _, s, rope_heads, d_r = k_pe.shape
    dtype = c_kv.dtype
    p = rope_heads * d_r
    if rope_heads > 1:
        q_pe = widen_rope_query(q_pe, rope_heads)
    k_pe = k_pe.reshape(b, s, p).astype(dtype)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)   # no tile past S is ever loaded
    plan = make_plan(b, h, r, p, s, jnp.dtype(dtype).itemsize, num_splits, num_stages)
    heads, hb = plan.heads, plan.head_blocks
    h_pad = hb * heads
    q_lat = jnp.pad(q_lat.astype(dtype), ((0, 0), (0, h_pad - h), (0, 0)))
    q_pe = jnp.pad(q_pe.astype(dtype), ((0, 0), (0, h_pad - h), (0, 0)))

    itemsize = jnp.dtype(dtype).itemsize
    wide, narrow = _swizzled(r, itemsize), _swizzled(p, itemsize)
    scratch = dict(
        q_smem=plgpu.SMEM((heads, r), dtype, transforms=wide),
        qpe_smem=plgpu.SMEM((heads, p), dtype, transforms=narrow),
        c_ring=plgpu.SMEM((plan.stages, TILE, r), dtype, transforms=wide),
        k_ring=plgpu.SMEM((plan.stages, TILE, p), dtype, transforms=narrow),
        q_bar=plgpu.Barrier(num_arrivals=2),                                   # q and q_pe loaded
        loaded=plgpu.Barrier(num_arrivals=2, num_barriers=plan.stages),        # c and k_pe tiles
        consumed=plgpu.Barrier(num_arrivals=plan.consumers, num_barriers=plan.stages),
        zeroed=plgpu.Barrier(num_arrivals=plan.consumers),                     # partial tile zeroed
    )
    if plan.tokens_on_m:
        scratch["p_smem"] = plgpu.SMEM((heads, TILE), dtype, transforms=_swizzled(TILE, itemsize))
    o_shape = (r, heads) if plan.tokens_on_m else (heads, r)
    out_type = [jax.ShapeDtypeStruct((b, plan.splits, hb, *o_shape), jnp.float32),
                jax.ShapeDtypeStruct((b, plan.splits, hb, heads), jnp.float32)]
    body = functools.partial(_kernel, plan=plan, r=r, scale_log2=float(scale) * LOG2E)
    body.__name__ = "mla_decode_mgpu"
    o_parts, lse = plgpu.kernel(
        body,
        **{_OUT_KW: out_type, _SCRATCH_KW: scratch},
        grid=(b, hb, plan.splits),
        grid_names=("b", "hb", "split"),
        num_threads=plan.consumers + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({"interpret": interpret_params() if interpret is True else interpret} if interpret else {}),
    )(lengths, q_lat, q_pe, c_kv, k_pe)
    if plan.tokens_on_m:
        o_parts = jnp.swapaxes(o_parts, -1, -2)
    o_parts = o_parts.reshape(b, plan.splits, h_pad, r)
    lse = lse.reshape(b, plan.splits, h_pad)
    return combine_splits(o_parts, lse)[:, :h].astype(dtype)
