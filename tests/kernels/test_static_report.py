"""The Triton decode kernel as Hopper would run it, read off its sm_90 compile on a machine without
a GPU (tools/bench/kernel_report.py): the default launch fits, spills nothing, keeps the next tile
in flight, and the occupancy table the split rule reads is what the compiler says.

The compile needs jax's CUDA plugin and a ptxas (``make sm90-tools``, which ``make test`` runs);
without them those tests skip with the line saying so. The parsers run everywhere."""
import pytest

from research.kernels import mla_decode as kernel_module
from tools.bench import kernel_report
from tools.bench.attention import tune_grid

MISSING = kernel_report.missing_tools()
needs_compiler = pytest.mark.skipif(MISSING is not None, reason=f"static kernel report: {MISSING}")
DEFAULT = tuple(kernel_module.DEFAULT_LAUNCH[k] for k in ("block_t", "num_warps", "num_stages"))

LOOP_PTX = """
	cp.async.wait_group 	0;
$L__BB0_1:
	setp.lt.s32 	%p1, %r1, %r2;
	@%p1 bra 	$L__BB0_3;
	cp.async.wait_group 	{inside};
	bra.uni 	$L__BB0_1;
$L__BB0_3:
	cp.async.wait_group 	0;
"""


def test_wait_groups_and_shared_stores_are_counted_only_inside_a_loop():
    assert kernel_report.loop_wait_groups(LOOP_PTX.format(inside=2)) == (2,)
    ptx = LOOP_PTX.format(inside=2).replace("bra.uni", "st.shared.v4.b32 [%r1], {%r2, %r3, %r4, %r5};\n"
                                            "\tstmatrix.sync.aligned.m8n8.x4.shared.b16 [%r6], {%r7, %r8, %r9, %r10};\n"
                                            "\tst.shared::cta.b16 [%r11], %rs1;\n\tbra.uni")
    assert kernel_report.loop_shared_store_bytes("\tst.shared.v2.b32 [%r1], {%r2, %r3};\n" + ptx) == 16 + 2
    stats = kernel_report.KernelStats(93_184, 101, 0, kernel_report.loop_wait_groups(LOOP_PTX.format(inside=0)), 8)
    assert stats.in_flight == 0 and stats.problems == ["waits for every load each iteration"]


def test_ctas_per_sm_follow_shared_memory_and_registers():
    stats = lambda smem, regs, warps: kernel_report.KernelStats(smem, regs, 0, (2,), warps)
    assert stats(93_184, 101, 8).ctas_per_sm == 2        # 2 x 94,208 B of 233,472
    assert stats(165_888, 255, 4).ctas_per_sm == 1       # the first kernel's default launch
    assert stats(37_376, 128, 8).ctas_per_sm == 2        # registers bind: 8 warps x 4,096 per warp
    assert stats(241_664, 100, 8).problems == ["shared memory 241,664 B > 232,448"]


@needs_compiler
@pytest.mark.filterwarnings("ignore")  # jax 0.11 warns that the Triton backend is deprecated
@pytest.mark.parametrize("shape", list(kernel_report.SHAPES))
def test_default_launch_fits_spills_nothing_and_keeps_a_tile_in_flight(shape):
    stats = kernel_report.decode_stats(shape, *DEFAULT)
    assert stats.problems == []
    assert stats.in_flight >= 1
    if shape == "deepseek_h16":
        assert stats.ctas_per_sm >= 2
    # the split rule sizes one wave from this figure: the committed table must agree with the compiler
    key = kernel_report.occupancy_key(shape, *DEFAULT, "bfloat16")
    assert kernel_module.ctas_per_sm(*_key_args(key)) == stats.ctas_per_sm


@needs_compiler
@pytest.mark.slow  # one sm_90 compile per launch (about 1 s each)
@pytest.mark.filterwarnings("ignore")
def test_every_launch_of_the_tuning_grid_is_accepted_by_the_compiler():
    grid = tune_grid(heads=16, kv_rank=512, rope_dim=64)
    assert DEFAULT in grid and len(grid) >= 4
    for launch in grid:
        stats = kernel_report.decode_stats("deepseek_h16", *launch)
        assert stats.problems == [], (launch, stats.problems)


@needs_compiler
@pytest.mark.filterwarnings("ignore")
def test_rewriting_a_loaded_tile_fails_the_report(monkeypatch):
    """The first kernel's mistake (``where`` on the loaded tile): a tile's worth of shared-memory
    stores per iteration, a second buffer (fewer CTAs per SM) and twice the registers."""
    import jax.numpy as jnp

    clean = kernel_report.decode_stats("deepseek_h16", *DEFAULT)
    monkeypatch.setattr(kernel_module, "_load", lambda ref, seen, width: jnp.where(seen[:, None], ref[...], 0))
    rewritten = kernel_report.decode_stats("deepseek_h16", *DEFAULT)
    assert [p for p in rewritten.problems if p.startswith("rewrites its tiles")]
    assert rewritten.smem > clean.smem and rewritten.ctas_per_sm < clean.ctas_per_sm


def _key_args(key: str):
    """'bt32-w8-s3-h16-r512-p64-bfloat16' -> the arguments of ``ctas_per_sm``."""
    *numbers, dtype = key.split("-")
    return (*(int(part.lstrip("btwshrp")) for part in numbers), dtype)
