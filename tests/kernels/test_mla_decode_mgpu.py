"""The Mosaic GPU (Hopper) absorbed-MLA decode kernel lowers for CUDA without a GPU, fits Hopper's
shared memory at DeepSeek shapes, and equals the XLA reference: compiled on a GPU, in Mosaic GPU's
interpreter elsewhere.

jax 0.10.2's Mosaic GPU interpreter (private ``jax._src.pallas.mosaic_gpu.interpret``) does not
implement five things the kernel uses: ``layout_cast`` (no CPU rule), ``run_state`` (the wgmma
accumulator initialised with a value: "Higher-order primitive run_state"), transposed refs
(``plgpu.transpose_ref``: its ``to_range`` reads only indexers) in wgmma operands and in loads /
stores, and wgmma's A in registers (it reads every operand as an allocation). For the interpreted
tests only (pytest's monkeypatch; the kernel and jax are unchanged), ``_supply_missing_interpreter_ops``
adds them: layout_cast is the identity, run_state allocates its accumulator as a REGS buffer
holding the value, a trailing TransposeTransform transposes the data, and wgmma takes A as a value.
The rest (TMA copies into the ring, the barriers between producer and consumer warpgroups, wgmma's
arithmetic, softmax, masking, outputs) runs in the stock interpreter, with its race detector on in
three tests. Where these private names are missing, the interpreted tests skip and say so.
"""
import contextlib
import functools
import inspect
import os
import re
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from research.kernels import mla_decode_mgpu as kernel_module
from research.kernels.mla_decode_mgpu import SMEM_BUDGET, make_plan, mla_decode_mgpu

sys.path.insert(0, os.path.dirname(__file__))
from decode_cases import inputs, reference  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"   # compiled there; interpreted (with the ops above) elsewhere
MISSING_OPS = ("jax 0.10.2's Mosaic GPU interpreter lacks layout_cast, run_state, transposed refs "
               "(TransposeTransform) in wgmma operands and loads / stores, and wgmma's A in registers")


def _supply_missing_interpreter_ops(monkeypatch):
    """Adds layout_cast, run_state, transposed refs and wgmma's A in registers to jax 0.10.2's Mosaic
    GPU interpreter (see the module docstring); returns its gpu_callbacks module."""
    from jax._src import core as jax_core
    from jax._src.callback import io_callback
    from jax._src.pallas.mosaic.interpret import utils as interpret_utils
    from jax._src.pallas.mosaic_gpu import core as mgpu_core
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as cb
    from jax._src.pallas.mosaic_gpu.interpret import jaxpr_interpret as ji
    from jax._src.state import discharge
    from jax._src.state import types as state_types

    orig_get, orig_swap, orig_interpret = cb._get, cb._swap, ji.JaxprInterpreter.interpret
    needed = {cb: ("call_make_allocation_request_array", "call_allocate_buffer", "call_deallocate_buffer",
                   "call_get", "get_memory_space_idx", "_remove_noop_transforms", "_get_shared_memory",
                   "HostAllocationKey", "TOKEN_SHAPE_DTYPE", "get_races", "reset_gpu_interpret_mode_state"),
              ji.JaxprInterpreter: ("_interpret_wgmma_ref_p",), interpret_utils: ("to_range",)}
    for owner, names in needed.items():
        for name in names:
            getattr(owner, name)   # an AttributeError (a skip) where this jax's interpreter differs

    def peel(transforms):  # -> (transforms without a trailing transpose, its permutation or None)
        transforms = tuple(transforms)
        if transforms and isinstance(transforms[-1], state_types.TransposeTransform):
            return transforms[:-1], tuple(transforms[-1].permutation)
        return transforms, None

    def get(*args, **kwargs):
        call = inspect.signature(orig_get).bind(*args, **kwargs)
        call.arguments["transforms"], perm = peel(call.arguments["transforms"])
        token, val = orig_get(*call.args, **call.kwargs)
        return token, val if perm is None else jnp.transpose(val, perm)

    def swap(*args, **kwargs):
        call = inspect.signature(orig_swap).bind(*args, **kwargs)
        call.arguments["transforms"], perm = peel(call.arguments["transforms"])
        if perm is not None:
            inverse = tuple(int(i) for i in np.argsort(perm))
            for name in ("val", "mask"):
                if call.arguments.get(name) is not None:
                    call.arguments[name] = np.transpose(np.asarray(call.arguments[name]), inverse)
        token, old = orig_swap(*call.args, **call.kwargs)
        return token, old if perm is None else jnp.transpose(old, perm)

    def wgmma(*, token, device_id, grid_point_coords, thread_id, acc, acc_transforms, acc_dtype, a, a_transforms,
              b, b_transforms, a_in_registers, source_info=None):
        """cb.wgmma (acc += a @ b on the simulated memory) with transposed operands and A in registers."""
        memory = cb._get_shared_memory()
        thread = memory.get_global_thread_id(int(device_id), int(thread_id))
        info = interpret_utils.GPULoggingInfo(device_id=int(device_id), thread_id=int(thread_id),
                                              grid_point_coords=tuple(int(x) for x in grid_point_coords),
                                              source_info=source_info)

        def read(key, transforms):
            transforms, perm = peel(cb._remove_noop_transforms(transforms))
            where = interpret_utils.to_range(jax.tree.map(int, transforms))
            key = cb.HostAllocationKey.from_array(key)
            val, _, clock = memory.get_buffer_content(key, where, thread, logging_info=info)
            if memory.detect_races:  # as cb._get does: a read racing with a write is reported
                cb.get_races().check_read(int(device_id), int(thread_id), clock, key, where, source_info=source_info)
            return (val if perm is None else np.transpose(val, perm)), where

        a = np.asarray(a) if a_in_registers else read(a, a_transforms)[0]
        b, _ = read(b, b_transforms)
        acc_val, where = read(acc, acc_transforms)
        with np.errstate(invalid="ignore"):  # NaN / inf in slots past a length: masked after the dot
            out = acc_val + np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(acc_dtype)
        memory.store_buffer_content(cb.HostAllocationKey.from_array(acc), where, out, thread, logging_info=info)
        return token

    def interpret_wgmma(self, eqn, token, get_invals):
        """As the interpreter's rule, with the host function above (A may be a register value)."""
        acc, a, b, *leaves = get_invals()
        trees = [eqn.params[f"{x}_transforms_tree"] or jax.tree.structure([]) for x in ("acc", "a", "b")]
        transforms = jax.tree.unflatten(jax.tree_util.treedef_tuple(trees), leaves)
        host = functools.partial(wgmma, acc_dtype=eqn.invars[0].aval.dtype, source_info=eqn.source_info,
                                 a_in_registers=not isinstance(eqn.invars[1].aval, state_types.AbstractRef))
        token = io_callback(host, cb.TOKEN_SHAPE_DTYPE, token=token, device_id=self.device_info.device_id,
                            grid_point_coords=self.grid_point_coords, thread_id=self.thread_id, acc=acc, a=a, b=b,
                            acc_transforms=transforms[0], a_transforms=transforms[1], b_transforms=transforms[2],
                            ordered=True)
        return token, []

    def run_state(self, eqn, token, invals):
        """Accumulators (values) become REGS buffers holding them; refs closed over pass through."""
        device = jnp.int32(self.device_info.device_id)
        regs = cb.get_memory_space_idx(mgpu_core.MemorySpace.REGS)
        args, owned = list(invals), []
        for i, out in enumerate(eqn.outvars):
            if isinstance(out.aval, state_types.AbstractRef):
                continue
            token, request = cb.call_make_allocation_request_array(
                token=token, device_id=device, memory_space_id=regs, thread_id=jnp.int32(self.thread_id))
            token, args[i] = cb.call_allocate_buffer(token, device, self.grid_point_coords, self.thread_id,
                                                     request, invals[i], source_info=eqn.source_info)
            owned.append(i)
        token, _ = self.interpret(eqn.params["jaxpr"], token, *args)
        outs = list(args)
        for i in owned:
            token, outs[i] = cb.call_get(
                token=token, result_shape_and_dtype=eqn.outvars[i].aval, device_id=device,
                grid_point_coords=self.grid_point_coords, thread_id=self.thread_id,
                allocation_key_as_array=args[i], transforms=(), source_info=eqn.source_info)
            token = cb.call_deallocate_buffer(token, device, self.grid_point_coords, self.thread_id, args[i],
                                              source_info=eqn.source_info)
        return token, outs

    debug_info = jax_core.DebugInfo("mosaic_gpu_interpret", "<segment>", None, None)
    rules = {mgpu_core.layout_cast_p: lambda self, eqn, token, invals: (token, invals[:1]),
             discharge.run_state_p: run_state}

    def interpret(self, jaxpr, token, *args):
        """The stock interpreter on the runs of equations between those in ``rules``."""
        if not any(e.primitive in rules for e in jaxpr.eqns):
            return orig_interpret(self, jaxpr, token, *args)
        env = dict(zip(jaxpr.constvars + jaxpr.invars, args))
        read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
        eqns, i = jaxpr.eqns, 0
        while i < len(eqns):
            if eqns[i].primitive in rules:
                eqn = eqns[i]
                token, outs = rules[eqn.primitive](self, eqn, token, [read(v) for v in eqn.invars])
                env.update((v, o) for v, o in zip(eqn.outvars, outs) if not isinstance(v, jax_core.DropVar))
                i += 1
                continue
            j = i
            while j < len(eqns) and eqns[j].primitive not in rules:
                j += 1
            defined, free = set(), []
            for eqn in eqns[i:j]:
                free += [v for v in eqn.invars if isinstance(v, jax_core.Var) and v not in defined and v not in free]
                defined.update(eqn.outvars)
            outs = [v for eqn in eqns[i:j] for v in eqn.outvars if not isinstance(v, jax_core.DropVar)]
            segment = jax_core.Jaxpr([], free, outs, eqns[i:j], debug_info=debug_info)
            token, vals = orig_interpret(self, segment, token, *map(env.get, free))
            env.update(zip(outs, vals))
            i = j
        return token, [read(v) for v in jaxpr.outvars]

    monkeypatch.setattr(cb, "_get", get)
    monkeypatch.setattr(cb, "_swap", swap)
    monkeypatch.setattr(ji.JaxprInterpreter, "_interpret_wgmma_ref_p", interpret_wgmma)
    monkeypatch.setattr(ji.JaxprInterpreter, "interpret", interpret)
    return cb


@pytest.fixture
def run_kernel(monkeypatch):
    """mla_decode_mgpu compiled on a GPU, else interpreted (with the missing ops supplied);
    ``races=True`` turns on the interpreter's race detector and fails on a race."""
    if ON_GPU:
        yield lambda *args, races=False, **kwargs: mla_decode_mgpu(*args, **kwargs)
        return
    try:
        cb = _supply_missing_interpreter_ops(monkeypatch)
        cb.reset_gpu_interpret_mode_state()
    except (ImportError, AttributeError) as err:
        pytest.skip(f"{MISSING_OPS}, and this jax's interpreter cannot be given them: {err!r}")

    def run(*args, races=False, **kwargs):
        params = kernel_module.interpret_params(detect_races=races)
        out = jax.block_until_ready(mla_decode_mgpu(*args, interpret=params, **kwargs))
        if races:
            found = cb.get_races().races_found
            assert not found, "the interpreter found a data race (see the log)"
        return out

    yield run
    cb.reset_gpu_interpret_mode_state()


CASES = {
    # name: (B, H, r, d_r, R, S, lengths, num_splits, num_stages)
    "length_1_and_a_partial_tile": (2, 16, 64, 16, 1, 256, [1, 131], 0, 0),
    "empty_splits_and_ragged_lengths": (3, 16, 64, 16, 1, 192, [7, 192, 64], 3, 0),    # splits of 64 slots
    "heads_on_m_two_head_blocks": (1, 80, 128, 64, 1, 320, [300], 2, 2),               # 64 heads per CTA
    "three_rope_keys_eight_heads_per_warpgroup": (2, 6, 64, 16, 3, 192, [192, 70], 1, 2),
}
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
# On a CPU the interpreter takes 2-8 s a case: two run in the slow suite there (on a GPU, where
# gpu_check runs every kernel test, all of them run).
SLOW_ON_CPU = {("empty_splits_and_ragged_lengths", jnp.bfloat16), ("length_1_and_a_partial_tile", jnp.float16)}
PRECISIONS = [pytest.param(case, dtype, id=f"{case}-{jnp.dtype(dtype).name}",
                           marks=[pytest.mark.slow] if (case, dtype) in SLOW_ON_CPU and not ON_GPU else [])
              for case, dtype in [(c, jnp.bfloat16) for c in CASES] + [("length_1_and_a_partial_tile", jnp.float16)]]


@pytest.mark.parametrize("case, dtype", PRECISIONS)
def test_kernel_equals_the_xla_reference(run_kernel, case, dtype):
    b, h, r, d_r, rope_heads, s, lengths, splits, stages = CASES[case]
    q_lat, q_pe, c_kv, k_pe = inputs(b, h, r, d_r, rope_heads, s, dtype)
    lengths = jnp.asarray(lengths)
    got = run_kernel(q_lat, q_pe, c_kv, k_pe, lengths, scale=0.125, num_splits=splits, num_stages=stages,
                     races=case == "heads_on_m_two_head_blocks")
    want = reference(*(x.astype(jnp.float32) for x in (q_lat, q_pe, c_kv, k_pe)), lengths, 0.125)
    assert got.shape == (b, h, r) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("heads", [16, 40], ids=["tokens_on_m", "heads_on_m"])
def test_slots_past_the_length_do_not_reach_the_output(run_kernel, heads):
    q_lat, q_pe, c_kv, k_pe = inputs(2, heads, 64, 16, 1, 128, jnp.bfloat16)
    lengths = jnp.asarray([5, 70])                 # splits of 64: partial + empty, full + partial
    poisoned_c = c_kv.at[0, 5:].set(jnp.nan).at[1, 70:].set(jnp.inf)
    poisoned_k = k_pe.at[0, 5:].set(jnp.inf).at[1, 70:].set(jnp.nan)
    got = run_kernel(q_lat, q_pe, poisoned_c, poisoned_k, lengths, scale=0.1, num_splits=2, races=True)
    want = reference(*(x.astype(jnp.float32) for x in (q_lat, q_pe, c_kv, k_pe)), lengths, 0.1)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=1e-2, rtol=0)


# DeepSeek-V2's absorbed decode: r_kv 512, d_r 64, 16 or 128 heads, bfloat16.
LOWERING_SHAPES = {
    "deepseek_h16": (8, 16, 512, 64, 1, 4096),
    "deepseek_h128": (2, 128, 512, 64, 1, 2048),
    "three_rope_keys": (4, 12, 128, 16, 3, 1024),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("shape", list(LOWERING_SHAPES), ids=list(LOWERING_SHAPES))
def test_kernel_lowers_for_hopper_within_its_shared_memory_plan(shape, monkeypatch):
    """The Mosaic GPU lowering runs on CPU: it emits the mosaic_gpu custom call and rejects a kernel
    over Hopper's 227 KB of shared memory; the bytes it allocates are the plan's."""
    b, h, r, d_r, rope_heads, s = LOWERING_SHAPES[shape]
    allocated = []
    with contextlib.suppress(ImportError, AttributeError):
        import jax.experimental.mosaic.gpu.core as mosaic_core
        size = mosaic_core._smem_tree_size
        monkeypatch.setattr(mosaic_core, "_smem_tree_size", lambda tree: allocated.append(size(tree)) or allocated[-1])
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    f = functools.partial(mla_decode_mgpu, scale=(128 + d_r) ** -0.5)
    args = spec(b, h, r), spec(b, h, d_r), spec(b, s, r), spec(b, s, rope_heads, d_r), spec(b, dtype=jnp.int32)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert re.search(r"custom_call @mosaic_gpu", text)
    plan = make_plan(b, h, r, rope_heads * d_r, s, 2)
    assert plan.smem_bytes <= SMEM_BUDGET
    if allocated:  # the kernel's total (the largest size asked for)
        assert max(allocated) == plan.smem_bytes


def test_deepseek_plans_fill_the_gpu_in_one_wave_with_two_stages():
    h16 = make_plan(batch=8, heads=16, r=512, p=64, s=4096, itemsize=2)
    assert (h16.tokens_on_m, h16.heads, h16.consumers, h16.head_blocks, h16.stages) == (True, 16, 1, 1, 2)
    assert (h16.splits, h16.split_len) == (16, 256)                  # 8 x 16 = 128 CTAs <= 132 SMs
    assert h16.smem_bytes == 170_032                                 # 2 x 72 KB ring + Q, Q_pe, P
    h128 = make_plan(batch=2, heads=128, r=512, p=64, s=8192, itemsize=2)
    assert (h128.tokens_on_m, h128.heads, h128.consumers, h128.head_blocks) == (False, 64, 2, 2)
    assert h128.splits == 32                                         # 2 x 2 x 32 = 128 CTAs
    assert h128.smem_bytes == 223_280 <= SMEM_BUDGET                 # 2 x 72 KB ring + Q, Q_pe of 64 heads
    assert make_plan(batch=256, heads=16, r=512, p=64, s=4096, itemsize=2).splits == 1
    assert make_plan(batch=1, heads=16, r=512, p=64, s=512, itemsize=2).splits == 2   # >= 4 tiles each
    assert make_plan(batch=1, heads=16, r=64, p=16, s=512, itemsize=2).stages == 3


def test_unsupported_shapes_and_dtypes_name_the_argument_and_the_fix():
    q_lat, q_pe, c_kv, k_pe = inputs(2, 6, 64, 16, 1, 128, jnp.bfloat16)
    lengths = jnp.asarray([1, 2])
    call = functools.partial(mla_decode_mgpu, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match=r"cache rank r \(c_kv.shape\[-1\]\) must be a multiple of 64.*got 48"):
        call(q_lat[..., :48], q_pe, c_kv[..., :48], k_pe, lengths)
    with pytest.raises(ValueError, match=r"cache length S \(c_kv.shape\[1\]\) must be a multiple of the 64-slot tile, "
                                         r"got 100"):
        call(q_lat, q_pe, c_kv[:, :100], k_pe[:, :100], lengths)
    with pytest.raises(ValueError, match="c_kv must be bfloat16 or float16, got float32.*research.kernels.mla_decode"):
        call(q_lat, q_pe, c_kv.astype(jnp.float32), k_pe, lengths)
    with pytest.raises(ValueError, match=r"RoPE width R \* d_r \(k_pe\) must be a multiple of 16.*got 1 \* 8"):
        call(q_lat, q_pe[..., :8], c_kv, k_pe[..., :8], lengths)
    with pytest.raises(ValueError, match=r"6 query heads do not group over 4 RoPE keys"):
        call(q_lat, q_pe, c_kv, jnp.repeat(k_pe, 4, axis=2), lengths)
    with pytest.raises(ValueError, match=r"r = 1024 with d_r = 64 needs .* bytes of shared memory"):
        make_plan(batch=1, heads=16, r=1024, p=64, s=256, itemsize=2)
