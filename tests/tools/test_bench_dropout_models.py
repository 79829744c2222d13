"""The dropout-model benchmark measures both ways on a small model and reports their ratio."""
import json

from tools.bench import dropout_models


def test_measured_row_on_a_small_mlp(tmp_path, capsys):
    out = tmp_path / "row.json"
    row = dropout_models.main(["--model", "mlp", "--models", "4", "--chunk", "2", "--points", "16",
                               "--out", str(out)])
    assert row["serial_models_per_s"] > 0 and row["vmapped_models_per_s"] > 0
    assert row["vmapped_over_serial"] == row["vmapped_models_per_s"] / row["serial_models_per_s"]
    assert json.loads(out.read_text()) == row
    assert "ratio" in capsys.readouterr().out
