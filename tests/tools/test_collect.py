"""tools/collect: one table of a sweep (overrides + results numbers), its plot and the TensorBoard
hparams summary, read back with TensorBoard's own loader."""
import csv
import json

import pytest

from tools import collect


def write_sweep(tmp_path):
    points = [({"optim.lr": lr, "model.name": m}, {"test_accuracy": acc, "mesh": {"data": 8}, "model": m, "ok": True})
              for (lr, m, acc) in [(0.02, "mlp", 0.5), (0.05, "mlp", 0.6), (0.02, "resnet20", 0.7), (0.05, "resnet20", 0.9)]]
    for i, (overrides, results) in enumerate(points):
        d = tmp_path / f"{i:03d}"
        d.mkdir()
        (d / "point.json").write_text(json.dumps({"index": i, "overrides": overrides}))
        (d / "results.json").write_text(json.dumps(results))
    failed = tmp_path / "004"
    failed.mkdir()
    (failed / "point.json").write_text(json.dumps({"index": 4, "overrides": {"optim.lr": 0.1, "model.name": "mlp"}}))
    (failed / "sweep.log").write_text("boom\n")
    return tmp_path


def test_the_table_has_every_point_its_overrides_and_numeric_results(tmp_path, capsys):
    sweep_dir = write_sweep(tmp_path)
    assert collect.main([str(sweep_dir), "--x", "optim.lr", "--y", "test_accuracy", "--group", "model.name"]) == 0
    rows = list(csv.reader(open(sweep_dir / "collect.csv")))
    assert rows[0] == ["point", "state", "optim.lr", "model.name", "test_accuracy", "mesh.data"]
    assert rows[3] == ["002", "done", "0.02", "resnet20", "0.7", "8"]
    assert rows[5] == ["004", "failed or running", "0.1", "mlp", "", ""]
    md = (sweep_dir / "collect.md").read_text()
    assert md.splitlines()[0] == "| point | state | optim.lr | model.name | test_accuracy | mesh.data |"
    assert (sweep_dir / "collect_test_accuracy.png").stat().st_size > 5000
    assert "| 003 | done | 0.05 | resnet20 | 0.9 | 8 |" in capsys.readouterr().out


def test_the_tensorboard_hparams_summary_holds_each_points_values_and_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    sweep_dir = write_sweep(tmp_path)
    collect.main([str(sweep_dir), "--metrics", "test_*"])
    top = EventAccumulator(str(sweep_dir / "tensorboard")).Reload()
    experiment = metadata.parse_experiment_plugin_data(
        top.SummaryMetadata(metadata.EXPERIMENT_TAG).plugin_data.content)
    assert [h.name for h in experiment.hparam_infos] == ["optim.lr", "model.name"]
    assert [m.name.tag for m in experiment.metric_infos] == ["test_accuracy"]
    run = EventAccumulator(str(sweep_dir / "tensorboard" / "003")).Reload()
    start = metadata.parse_session_start_info_plugin_data(
        run.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content)
    assert start.hparams["optim.lr"].number_value == 0.05 and start.hparams["model.name"].string_value == "resnet20"
    assert run.Scalars("test_accuracy")[0].value == pytest.approx(0.9)
    assert not (sweep_dir / "tensorboard" / "004").exists()  # a point without results has no session


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "test_acc"], "matching 'test_acc'"),
    (["--x", "optim.lrr", "--y", "test_accuracy"], "'optim.lrr' is neither an override nor a metric"),
])
def test_a_column_no_point_has_fails_with_one_line(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        collect.main([str(write_sweep(tmp_path)), *argv])


def test_a_missing_or_empty_folder_fails_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        collect.main([str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no points"):
        collect.main([str(tmp_path)])
