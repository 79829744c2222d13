"""tools/tips_proposition at a tiny size: its report, plot and the unknown-init error."""
import json

import pytest

from tools import tips_proposition


def test_a_tiny_run_writes_the_correlations_and_every_path(tmp_path, capsys):
    tips_proposition.main(["--out", str(tmp_path), "--init", "he", "--depths", "2,3", "--per_mix", "1",
                           "--images", "16"])
    report = json.loads((tmp_path / "proposition.json").read_text())
    assert set(report) == {"he"} and len(report["he"]["paths"]) == 3 + 4  # c = 0..depth, one path each
    assert -1 <= report["he"]["correlations"]["spearman_sum"] <= 1
    assert (tmp_path / "proposition.png").stat().st_size > 0
    assert capsys.readouterr().out.startswith("he: 7 paths; spearman_sum ")


def test_an_unknown_init_is_named(tmp_path):
    with pytest.raises(SystemExit):
        tips_proposition.main(["--out", str(tmp_path), "--init", "xavier"])
