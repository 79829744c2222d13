"""The absorbed MLA decode kernel equals the XLA reference (interpret mode on CPU), lowers for a
GPU without one, and leaves a whole upcycled model's generated tokens unchanged."""
import dataclasses
import functools
import os
import sys

import numpy as np
import pytest

import jax
import jax.extend.core
import jax.numpy as jnp

from research.attention.ops import attention_ops, mla_absorbed_attention
from research.kernels.flash_decode import choose_splits, combine_splits, gather_pages
from research.kernels.mla_decode import mla_decode, mla_decode_paged
from research.kernels.mla_decode_tpu import mla_decode_paged_tpu, mla_decode_tpu

sys.path.insert(0, os.path.dirname(__file__))
from decode_cases import inputs, reference  # noqa: E402


CASES = {
    # name: (B, H, r, d_r, R, S, lengths, num_splits)
    "length_1_and_a_partial_tile": (2, 16, 64, 16, 1, 256, [1, 131], 0),
    "empty_splits_and_ragged_lengths": (3, 16, 64, 16, 1, 256, [7, 256, 64], 4),  # 4 splits of 64 slots
    "smollm2_ranks_padded_three_rope_keys": (2, 9, 56, 4, 3, 200, [200, 57], 0),
    "more_heads_than_a_block": (1, 32, 32, 8, 1, 128, [100], 2),
}


BACKEND = jax.default_backend()
ON_GPU = BACKEND == "gpu"  # each kernel is compiled on its own platform and interpreted elsewhere
KERNELS = {  # small blocks, so that these sizes take several tiles, splits and head blocks
    "triton": functools.partial(mla_decode, block_t=16, block_h=16, interpret=not ON_GPU),
    "tpu": functools.partial(mla_decode_tpu, block_t=16, interpret=BACKEND != "tpu"),
}
PRECISIONS = [(case, jnp.float32, 2e-5) for case in CASES] + [
    (case, jnp.bfloat16, 3e-2) for case in ("empty_splits_and_ragged_lengths", "smollm2_ranks_padded_three_rope_keys")]


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case, dtype, atol", PRECISIONS, ids=[f"{c}-{jnp.dtype(d).name}" for c, d, _ in PRECISIONS])
def test_kernel_equals_the_xla_reference(kernel, case, dtype, atol):
    b, h, r, d_r, rope_heads, s, lengths, splits = CASES[case]
    q_lat, q_pe, c_kv, k_pe = inputs(b, h, r, d_r, rope_heads, s, dtype)
    lengths = jnp.asarray(lengths)
    got = KERNELS[kernel](q_lat, q_pe, c_kv, k_pe, lengths, scale=0.125, num_splits=splits)
    want = reference(*(x.astype(jnp.float32) for x in (q_lat, q_pe, c_kv, k_pe)), lengths, 0.125)
    assert got.shape == (b, h, r) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=atol, rtol=0)


PAGED_KERNELS = {
    "triton": functools.partial(mla_decode_paged, block_h=16, interpret=not ON_GPU),
    "tpu": functools.partial(mla_decode_paged_tpu, interpret=BACKEND != "tpu"),
}


@pytest.mark.parametrize("kernel", list(PAGED_KERNELS))
@pytest.mark.parametrize("rope_heads", [1, 3])
def test_paged_kernel_with_a_shuffled_block_table_equals_the_dense_reference(rope_heads, kernel):
    b, h, r, d_r, page, max_pages = 3, 12, 40, 8, 16, 6
    q_lat, q_pe, _, _ = inputs(b, h, r, d_r, rope_heads, 1, jnp.float32)
    num_pages = b * max_pages + 5                      # a pool with pages no sequence uses
    _, _, c_pool, k_pool = inputs(1, 1, r, d_r, rope_heads, num_pages * page, jnp.float32, seed=1)
    c_pool, k_pool = c_pool.reshape(num_pages, page, r), k_pool.reshape(num_pages, page, rope_heads, d_r)
    table = jnp.asarray(np.random.default_rng(0).permutation(num_pages)[:b * max_pages].reshape(b, max_pages))
    lengths = jnp.asarray([1, 37, 96])                 # one slot, a partial page, every page
    got = PAGED_KERNELS[kernel](q_lat, q_pe, c_pool, k_pool, table, lengths, scale=0.2, pages_per_split=4)
    want = reference(q_lat, q_pe, gather_pages(c_pool, table), gather_pages(k_pool, table), lengths, 0.2)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_slots_past_the_length_do_not_reach_the_output():
    q_lat, q_pe, c_kv, k_pe = inputs(2, 16, 32, 16, 1, 128, jnp.float32)
    lengths = jnp.asarray([5, 70])
    poisoned = c_kv.at[0, 5:].set(jnp.nan).at[1, 70:].set(jnp.inf)
    got = KERNELS["triton"](q_lat, q_pe, poisoned, k_pe, lengths, scale=0.1, num_splits=4)
    np.testing.assert_allclose(got, reference(q_lat, q_pe, c_kv, k_pe, lengths, 0.1), atol=2e-5, rtol=0)


def test_combine_ignores_an_empty_split_and_equals_one_softmax():
    rng = np.random.default_rng(0)
    scores, values = rng.normal(size=(1, 8)), rng.normal(size=(8, 3))
    parts, lses = [], []
    for chunk in (slice(0, 3), slice(3, 8)):
        w = np.exp(scores[:, chunk] - scores[:, chunk].max())
        parts.append(w @ values[chunk] / w.sum())
        lses.append(np.full(1, np.log(w.sum()) + scores[:, chunk].max()))
    parts.append(np.zeros((1, 3))); lses.append(np.full(1, -1e30))  # an empty split
    got = combine_splits(jnp.asarray(np.stack(parts)[None]), jnp.asarray(np.stack(lses)[None]))
    w = np.exp(scores - scores.max())
    np.testing.assert_allclose(got[0], w @ values / w.sum(), rtol=1e-6)


def test_split_choice_fills_the_gpu_in_one_wave_with_long_splits():
    assert choose_splits(cells=32, tiles=512, ctas_per_sm=2, min_tiles=8) == 8     # 256 of 264 slots
    assert choose_splits(cells=32, tiles=512, ctas_per_sm=1, min_tiles=8) == 4     # 128 of 132
    assert choose_splits(cells=128, tiles=512, ctas_per_sm=2, min_tiles=8) == 2
    assert choose_splits(cells=300, tiles=512, ctas_per_sm=2, min_tiles=8) == 1    # the cells fill it
    assert choose_splits(cells=1, tiles=32, ctas_per_sm=2, min_tiles=8) == 4       # splits of >= 8 tiles
    assert choose_splits(cells=1, tiles=7, ctas_per_sm=2, min_tiles=8) == 1
    for cells in range(1, 300, 7):
        for tiles in (1, 13, 64, 2048):
            n = choose_splits(cells=cells, tiles=tiles, ctas_per_sm=2, min_tiles=8)
            assert n == 1 or (cells * n <= 264 and n * 8 <= tiles)


def test_splits_and_a_cache_length_that_do_not_divide_read_the_cache_in_place():
    """S = 200 is not a multiple of the 16-slot tile and 3 splits do not divide its 13 tiles: the
    last split's block runs past S, and the load mask keeps it out."""
    q_lat, q_pe, c_kv, k_pe = inputs(2, 16, 64, 16, 1, 200, jnp.float32)
    lengths = jnp.asarray([200, 161])
    got = KERNELS["triton"](q_lat, q_pe, c_kv, k_pe, lengths, scale=0.125, num_splits=3)
    np.testing.assert_allclose(got, reference(q_lat, q_pe, c_kv, k_pe, lengths, 0.125), atol=2e-5, rtol=0)


def _primitives_touching(closed_jaxpr, sources):
    """Names of the primitives that take ``sources`` or a reshape of them as an operand (nested jaxprs included)."""
    touched, derived = [], set(sources)

    def walk(jaxpr, derived):
        for eqn in jaxpr.eqns:
            ins = [v for v in eqn.invars if isinstance(v, jax.extend.core.Var) and v in derived]
            if not ins:
                continue
            if eqn.primitive.name == "reshape":
                derived.update(eqn.outvars)
                continue
            inner = eqn.params.get("jaxpr")
            if eqn.primitive.name == "pallas_call" or inner is None:
                touched.append(eqn.primitive.name)
                continue
            inner = getattr(inner, "jaxpr", inner)  # a nested jit: follow the cache inside it
            walk(inner, {inner.invars[eqn.invars.index(v)] for v in ins})

    walk(closed_jaxpr.jaxpr, derived)
    return touched


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_the_cache_reaches_the_kernel_uncopied_at_smollm2_ranks(paged):
    """r 56 and R d_r = 12 are not powers of 2, and S = 200 no multiple of a tile: the cache still
    goes to the pallas_call as it is (no pad, slice or copy of it), only reshaped."""
    b, h, r, d_r, rope_heads, s = 2, 9, 56, 4, 3, 200
    q_lat, q_pe, c_kv, k_pe = inputs(b, h, r, d_r, rope_heads, s, jnp.bfloat16)
    lengths = jnp.asarray([200, 57])
    if paged:
        c_kv, k_pe = c_kv.reshape(-1, 16, r)[:20], k_pe.reshape(-1, 16, rope_heads, d_r)[:20]
        table = jnp.arange(20).reshape(2, 10)
        f = functools.partial(mla_decode_paged, scale=0.2, interpret=True)
        jaxpr = jax.make_jaxpr(f)(q_lat, q_pe, c_kv, k_pe, table, lengths)
        cache = jaxpr.jaxpr.invars[2:4]
    else:
        f = functools.partial(mla_decode, scale=0.2, interpret=True)
        jaxpr = jax.make_jaxpr(f)(q_lat, q_pe, c_kv, k_pe, lengths)
        cache = jaxpr.jaxpr.invars[2:4]
    assert set(_primitives_touching(jaxpr, cache)) == {"pallas_call"}


def test_pallas_ops_use_the_kernel_for_one_query_and_the_reference_otherwise():
    q_lat, q_pe, c_kv, k_pe = inputs(2, 4, 16, 8, 2, 40, jnp.float32)
    ops = attention_ops("pallas")
    positions = jnp.asarray([[9], [39]])
    got = ops.mla_absorbed(q_lat[:, None], q_pe[:, None], c_kv, k_pe, positions, scale=0.2)
    want = mla_absorbed_attention(q_lat[:, None], q_pe[:, None], c_kv, k_pe, positions, scale=0.2)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    prefill = jnp.broadcast_to(jnp.arange(3), (2, 3))
    q3 = jnp.repeat(q_lat[:, None], 3, 1), jnp.repeat(q_pe[:, None], 3, 1)
    np.testing.assert_array_equal(ops.mla_absorbed(*q3, c_kv, k_pe, prefill, scale=0.2),
                                  mla_absorbed_attention(*q3, c_kv, k_pe, prefill, scale=0.2))
    if BACKEND == "cpu":
        assert attention_ops("auto") is attention_ops("xla")
    with pytest.raises(ValueError, match="unknown attention_impl 'triton'; choose one of: xla, pallas, auto"):
        attention_ops("triton")


def test_bad_shapes_and_blocks_name_what_is_wrong():
    q_lat, q_pe, c_kv, k_pe = inputs(2, 6, 16, 8, 4, 32, jnp.float32)
    with pytest.raises(ValueError, match="6 query heads do not group over 4 RoPE keys"):
        mla_decode(q_lat, q_pe, c_kv, k_pe, jnp.asarray([1, 2]), scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="block_t must be a power of 2 >= 16, got 48"):
        mla_decode(q_lat, q_pe, c_kv, k_pe[:, :, :2], jnp.asarray([1, 2]), scale=1.0, block_t=48, interpret=True)
    with pytest.raises(ValueError, match="num_splits 3 exceeds the cache's 2 tiles of 16"):
        mla_decode(q_lat, q_pe, c_kv, k_pe[:, :, :2], jnp.asarray([1, 2]), scale=1.0, block_t=16,
                   num_splits=3, interpret=True)


# The real shapes: DeepSeek-V2 (r_kv 512, d_r 64, 16 or 128 heads) and SmolLM2 upcycled at 6.4x.
LOWERING_SHAPES = {
    "deepseek_h16": (8, 16, 512, 64, 1, 4096),
    "deepseek_h128": (2, 128, 512, 64, 1, 2048),
    "smollm2_mla": (4, 9, 56, 4, 3, 1024),
}


@pytest.mark.filterwarnings("ignore")  # jax 0.11 warns that the Triton backend is deprecated
@pytest.mark.parametrize("kernel", ["triton", "triton_paged", "tpu", "tpu_paged"])
@pytest.mark.parametrize("shape", list(LOWERING_SHAPES), ids=list(LOWERING_SHAPES))
def test_kernel_lowers_for_a_gpu_and_a_tpu_without_one(shape, kernel):
    """The Pallas lowerings (Triton for CUDA, Mosaic for TPU) run on CPU and reject the blocks
    that the GPU or TPU compiler would reject (Triton: powers of 2; TPU: the (8, 128) rule)."""
    b, h, r, d_r, rope_heads, s = LOWERING_SHAPES[shape]
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    queries, scale = (spec(b, h, r), spec(b, h, d_r)), (128 + d_r) ** -0.5
    dense_cache = spec(b, s, r), spec(b, s, rope_heads, d_r)
    if kernel.endswith("paged"):  # pages of 64 slots (FlashMLA's block), a pool larger than the batch needs
        pages = b * s // 64 + 7
        f = functools.partial(mla_decode_paged if kernel == "triton_paged" else mla_decode_paged_tpu, scale=scale)
        args = (*queries, spec(pages, 64, r), spec(pages, 64, rope_heads, d_r), spec(b, s // 64, dtype=jnp.int32))
    else:
        f = functools.partial(mla_decode if kernel == "triton" else mla_decode_tpu, scale=scale)
        args = (*queries, *dense_cache)
    platform, call = ("tpu", "tpu_custom_call") if kernel.startswith("tpu") else ("cuda", "__gpu$xla.gpu.triton")
    lowered = jax.jit(f).trace(*args, spec(b, dtype=jnp.int32)).lower(lowering_platforms=(platform,))
    assert call in lowered.as_text()


def test_upcycled_smollm2_generates_the_same_tokens_with_the_pallas_kernel(smollm2, smollm2_tokenizer, monkeypatch):
    from research.upcycling.upcycle import UpcycleConfig, upcycle_gqa_to_mla
    from research.kernels import mla_decode as kernel_module
    from research.models.generate import generate

    traced = []  # the kernel must really be in the decode step, once per scanned segment
    monkeypatch.setattr(kernel_module, "mla_decode", lambda *a, **k: traced.append(a[2].shape) or mla_decode(*a, **k))

    _, teacher = smollm2
    # 6.4x KV compression: r_kv 56 and d_r 4 per former KV head (R = 3), both padded by the kernel
    student, _ = upcycle_gqa_to_mla(teacher, UpcycleConfig(kv_rank=56, rope_dim=4, rope_mode="uniform", rope_key="per_kv_head"))
    prompts = [smollm2_tokenizer.encode(p) for p in ("In the beginning God created", "And the earth was")]
    tokens = {}
    for impl in ("xla", "pallas"):
        student.config = dataclasses.replace(student.config, attention_impl=impl)
        tokens[impl] = generate(student, prompts, 6)
    assert traced and all(shape[-1] == 56 for shape in traced)
    np.testing.assert_array_equal(tokens["pallas"], tokens["xla"])
