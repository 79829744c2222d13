"""tools/anytime_table: mean ± sd per sampler and budget over a seed sweep, and the TPS - uniform rows
(across runs, and within each run)."""
import json

import pytest

from tools import anytime_table


def write_run(folder, uniform, tps, budgets=(0.5, 1.0)):
    folder.mkdir()
    curve = lambda accs: [{"test_accuracy": a} for a in accs]  # noqa: E731
    (folder / "results.json").write_text(json.dumps({"budgets": list(budgets), "samplers": {
        "tps": {"curve": curve(tps), "train_seconds": 20.0}, "uniform": {"curve": curve(uniform), "train_seconds": 10.0}}}))


def test_the_table_gives_mean_sd_and_the_difference_in_sd_units(tmp_path, capsys):
    write_run(tmp_path / "000", (0.50, 0.80), (0.60, 0.80))
    write_run(tmp_path / "001", (0.60, 0.90), (0.70, 0.90))
    anytime_table.main([str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[4] == "| uniform | 0.550 ± 0.071 | 0.850 ± 0.071 | 10 ± 0 |"  # the baseline first
    assert lines[5] == "| tps | 0.650 ± 0.071 | 0.850 ± 0.071 | 20 ± 0 |"
    assert lines[6] == "| tps - uniform | +0.100 (+1.4 sd) | +0.000 (+0.0 sd) | |"
    assert lines[7] == "| tps - uniform, within each run | +0.100 ± 0.000 (2/2 ahead) | +0.000 ± 0.000 (0/2 ahead) | |"
    assert (tmp_path / "anytime_seeds.png").stat().st_size > 5000


def test_runs_with_other_budgets_or_none_fail_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no DIR/\\*/results.json"):
        anytime_table.main([str(tmp_path)])
    write_run(tmp_path / "000", (0.5, 0.8), (0.6, 0.8))
    write_run(tmp_path / "001", (0.5, 0.8, 0.9), (0.6, 0.8, 0.9), budgets=(0.3, 0.5, 1.0))
    with pytest.raises(SystemExit, match="budgets .* differ"):
        anytime_table.main([str(tmp_path)])


def test_the_within_run_difference_pairs_the_samplers_of_the_same_run(tmp_path):
    write_run(tmp_path / "000", (0.50, 0.80), (0.60, 0.80))
    write_run(tmp_path / "001", (0.60, 0.90), (0.90, 0.90))
    one_sampler = json.loads((tmp_path / "000" / "results.json").read_text())
    del one_sampler["samplers"]["tps"]  # run 000 trained uniform only
    (tmp_path / "000" / "results.json").write_text(json.dumps(one_sampler))
    text = anytime_table.table(*anytime_table.load(str(tmp_path)))
    assert "| tps - uniform, within each run | +0.300 ± 0.000 (1/1 ahead) | +0.000 ± 0.000 (0/1 ahead) | |" in text
