"""The attention benchmark on CPU: both paths timed on the same inputs, bytes counted once, and the
emulated kernel agrees with the XLA reference."""
import json

import pytest

from tools.bench import attention


def test_decode_row_times_every_path_on_the_same_inputs_and_counts_the_cache_bytes_once():
    row = attention.decode_row(batch=2, context=64, heads=4, kv_rank=32, rope_dim=16, repeats=1)
    assert row["timer"] == "wall"  # a CPU: no CUPTI, and the kernel is emulated
    assert row["triton_max_abs_error"] < 3e-2  # bfloat16 outputs
    gigabytes = 2 * 64 * (32 + 16) * 2 / 1e9
    for name in ("xla", "read", "triton"):
        assert abs(row[f"{name}_gb_per_s"] * row[f"{name}_ms"] / 1e3 - gigabytes) < 1e-12
    assert row["triton_vs_xla"] == row["xla_ms"] / row["triton_ms"]
    assert row["triton_pct_roofline"] == 100 * row["read_ms"] / row["triton_ms"]


def test_prefill_row_reports_xla_and_says_when_there_is_no_kernel():
    row = attention.prefill_row(length=32, heads=2, repeats=1)
    assert row["xla_forward_tflops"] > 0 and row["xla_backward_tflops"] > 0
    assert row["kernel"].startswith("none (") and "tokamax_forward_tflops" not in row  # CPU


def test_kernel_options_parse_and_a_bad_one_is_named():
    assert attention.parse_options("block_t=128,num_warps=8") == {"block_t": 128, "num_warps": 8}
    assert attention.parse_options("") == {}
    with pytest.raises(ValueError, match="'warps=8' is not KEY=INT with KEY one of block_t"):
        attention.parse_options("block_t=32,warps=8")


def test_tuning_times_each_accepted_launch_and_reports_one_the_kernel_rejects(monkeypatch):
    monkeypatch.setattr(attention, "tune_grid", lambda *a: [(24, 4, 3), (16, 4, 3), (32, 8, 3)])  # 24: not a power of 2
    rows = attention.tune_rows(batch=1, context=64, heads=4, kv_rank=32, rope_dim=16, repeats=1)
    assert rows[-1]["kernel_options"]["block_t"] == 24 and "power of 2" in rows[-1]["error"]
    assert all(r["triton_ms"] > 0 and r["triton_max_abs_error"] < 3e-2 for r in rows[:2])
    assert rows[0]["triton_ms"] <= rows[1]["triton_ms"]
    assert rows[0]["xla_ms"] == rows[1]["xla_ms"]  # XLA and the roofline are timed once per cell


def test_the_best_launch_is_the_fastest_over_every_cell_and_a_missing_file_means_the_default(tmp_path):
    rows = [{"batch": b, "context": 64, "kernel_options": {"block_t": bt}, "triton_ms": ms}
            for b, bt, ms in [(1, 16, 1.0), (1, 32, 2.0), (2, 16, 5.0), (2, 32, 2.5), (2, 64, 0.1)]]
    (tmp_path / "tune.json").write_text(json.dumps(rows))
    assert attention.best_launch(str(tmp_path / "tune.json"))[0] == {"block_t": 32}  # 64 ran on one cell only
    launch, why = attention.best_launch(str(tmp_path / "absent.json"))  # the tuning step timed out
    assert launch == {} and why.startswith("the default launch: cannot read") and "absent.json" in why


def test_dispatch_rows_come_only_from_device_time_and_keep_the_timed_launch(tmp_path):
    row = {"batch": 8, "context": 4096, "heads": 16, "kv_rank": 512, "xla_ms": 0.2, "triton_ms": 0.1,
           "kernel_options": {"block_t": 16, "num_warps": 4, "num_stages": 3}}
    path = str(tmp_path / "dispatch.json")
    attention.write_dispatch([{**row, "timer": "wall"}], path, "cpu")
    assert json.loads(open(path).read())["devices"] == {}
    attention.write_dispatch([{**row, "timer": "cupti"}], path, "NVIDIA H100 80GB HBM3")
    attention.write_dispatch([{**row, "timer": "cupti", "triton_ms": 0.3}], path, "NVIDIA H200")
    attention.write_dispatch([{**row, "timer": "cupti", "heads": 9, "kv_rank": 56}], path, "NVIDIA H200")
    table = json.loads(open(path).read())["devices"]
    h100 = table["NVIDIA H100 80GB HBM3"][0]
    assert h100["ms"] == {"xla": 0.2, "triton": 0.1, "mosaic_gpu": None}
    assert h100["triton_options"] == row["kernel_options"]   # auto runs the launch that was timed
    assert [(r["heads"], r["ms"]["triton"]) for r in table["NVIDIA H200"]] == [(9, 0.1), (16, 0.3)]  # cells merge
