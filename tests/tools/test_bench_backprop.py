"""The backprop benchmark: paper figures reproduced analytically, and a small measured run."""
import pytest

from tools.bench import backprop


def test_table2_matches_the_paper_for_mobilenet_v2_last_two_layers():
    rows = {row["rows"]: row for row in backprop.table2_rows(224)}
    for name in ("vanilla BP, last 2 layers", "gradient filter R=2, last 2 layers"):
        row = rows[name]
        assert row["activation_kb"] == pytest.approx(row["paper_activation_kb"])  # 245 KB and 80 KB exactly
        assert row["mflops"] == pytest.approx(row["paper_mflops"], rel=0.1)  # we count conv matmuls only


def test_measured_rows_on_small_inputs():
    rows = backprop.measured_rows("mobilenet_v2", (32, 32, 3), (15, 16), "conv",
                                  [("exact", None), ("filter R=2", 2)], batch=2, repeats=1)
    exact, filtered = rows
    assert exact["speedup"] == 1.0 and filtered["seconds"] > 0
    assert filtered["flops"] < exact["flops"] and filtered["analytic_flops"] < exact["analytic_flops"]
    assert filtered["analytic_activation_saving"] == pytest.approx(1 - 1 / 4)  # 4x4 grid, R = 2
