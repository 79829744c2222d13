"""Seed statistics are the mean and the sample sd, tables are markdown, figures are written atomically."""
import os

import numpy as np
import pytest

from research.core import report


def test_mean_sd_is_the_mean_and_the_sample_standard_deviation():
    assert report.mean_sd([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, np.std([1, 2, 4], ddof=1)))
    assert report.mean_sd([3.5]) == (3.5, 0.0)  # one seed: no spread
    with pytest.raises(ValueError, match="no values"):
        report.mean_sd([])


def test_merge_seeds_keeps_the_first_rows_other_entries_and_adds_sd_and_values():
    rows = [{"acc": 1.0, "info": "a"}, {"acc": 3.0, "info": "b"}]
    merged = report.merge_seeds(rows, ["acc"])
    assert merged == {"acc": 2.0, "acc_sd": pytest.approx(np.sqrt(2)), "acc_values": [1.0, 3.0], "info": "a"}
    assert rows[0] == {"acc": 1.0, "info": "a"}  # the per-seed rows are left as they were


def test_cells_and_tables_are_markdown():
    assert report.cell(1.234, 0.5) == "1.23 ± 0.50" and report.cell(1.234, 0.0) == "1.23"
    assert report.cell(1.234, None, 1) == "1.2"
    assert report.table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |"]


def test_a_figure_is_saved_whole_and_leaves_no_temporary_file(tmp_path):
    fig, axes = report.figure(2, panel=(2, 2))
    assert axes.shape == (1, 2)
    report.bars(axes[0, 0], ["a", "b"], [1.0, 2.0], [0.1, 0.2], [[0.9, 1.1], [1.8, 2.2]], highlight=("b",))
    report.save(fig, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["f.png"]
