"""The attention benchmark on CPU: both paths timed on the same inputs, bytes counted once, and the
emulated kernel agrees with the XLA reference."""
import pytest

from tools.bench import attention


def test_decode_row_times_both_paths_and_counts_the_cache_bytes_once():
    row = attention.decode_row(batch=2, context=64, heads=4, kv_rank=32, rope_dim=16, repeats=1)
    assert row["kernel"].startswith("pallas-interpret")
    assert row["max_abs_error"] < 3e-2  # bfloat16 outputs
    gigabytes = 2 * 64 * (32 + 16) * 2 / 1e9
    for name in ("xla", "pallas"):
        assert abs(row[f"{name}_gb_per_s"] * row[f"{name}_ms"] / 1e3 - gigabytes) < 1e-12
    assert row["speedup"] == row["xla_ms"] / row["pallas_ms"]


def test_prefill_row_reports_xla_and_says_when_there_is_no_kernel():
    row = attention.prefill_row(length=32, heads=2, repeats=1)
    assert row["xla_forward_tflops"] > 0 and row["xla_backward_tflops"] > 0
    assert row["kernel"].startswith("none (") and "tokamax_forward_tflops" not in row  # CPU


def test_kernel_options_parse_and_a_bad_one_is_named():
    assert attention.parse_options("block_t=128,num_warps=8") == {"block_t": 128, "num_warps": 8}
    assert attention.parse_options("") == {}
    with pytest.raises(ValueError, match="'warps=8' is not KEY=INT with KEY one of block_t"):
        attention.parse_options("block_t=32,warps=8")


def test_tuning_times_each_setting_and_reports_one_the_kernel_rejects(monkeypatch):
    monkeypatch.setattr(attention, "TUNE_GRID", {"block_t": (24, 16, 32)})  # 24: not a power of 2
    rows = attention.tune_rows(batch=1, context=64, heads=4, kv_rank=32, rope_dim=16, repeats=1)
    assert [r["kernel_options"]["block_t"] for r in rows][-1] == 24 and "power of 2" in rows[-1]["error"]
    assert all(r["pallas_ms"] > 0 and r["max_abs_error"] < 3e-2 for r in rows[:2])
    assert rows[0]["pallas_ms"] <= rows[1]["pallas_ms"]
