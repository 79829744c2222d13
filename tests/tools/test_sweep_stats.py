"""tools/sweep_stats: mean and spread of results.json numbers across a sweep's runs."""
import json

import numpy as np
import pytest

from tools import sweep_stats


def write_runs(tmp_path, runs):
    for i, results in enumerate(runs):
        (tmp_path / f"{i:03d}").mkdir()
        (tmp_path / f"{i:03d}" / "results.json").write_text(json.dumps(results))


def test_wildcards_and_negative_indices_expand_to_every_concrete_path(tmp_path, capsys):
    runs = [{"methods": {"a": {"by_eps": [{"x": 1.0}, {"x": 2.0 + i}]}, "b": {"by_eps": [{"x": 10.0 * i}]}},
             "flag": True} for i in range(3)]
    write_runs(tmp_path, runs)
    rows = dict(sweep_stats.stats(sweep_stats.load_runs(str(tmp_path)), ["methods.*.by_eps.-1.x"]))
    assert set(rows) == {"methods.a.by_eps.1.x", "methods.b.by_eps.0.x"}
    np.testing.assert_array_equal(rows["methods.a.by_eps.1.x"], [2.0, 3.0, 4.0])
    sweep_stats.main([str(tmp_path), "methods.a.by_eps.*.x"])
    lines = capsys.readouterr().out.splitlines()
    # x at index 1 over the runs: 2, 3, 4 -> mean 3, sample std 1.
    assert lines[2].split() == ["methods.a.by_eps.1.x", "3", "1", "2", "4", "3"]
    assert lines[1].split()[1:] == ["1", "0", "1", "1", "3"]


def test_a_key_no_run_has_and_an_empty_directory_fail_with_one_line(tmp_path):
    write_runs(tmp_path, [{"a": 1.0, "flag": True}])
    with pytest.raises(SystemExit, match="no run's results.json has a number at 'b'"):
        sweep_stats.main([str(tmp_path), "b"])
    with pytest.raises(SystemExit, match="no run's results.json has a number at 'flag'"):
        sweep_stats.main([str(tmp_path), "flag"])  # booleans are not figures
    with pytest.raises(SystemExit, match=r"no \*/results.json"):
        sweep_stats.main([str(tmp_path / "missing"), "a"])
