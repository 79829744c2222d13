"""TensorBoard event files (without TensorFlow), atomic JSON and plots."""
import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from research.core import report
from research.core.records import (MetricWriter, image_grid, read_signed, temp_dir_beside,
                                   write_json_atomic, write_npy_atomic, write_npz_atomic, write_signed)


def test_scalars_and_images_are_readable_by_tensorboard(tmp_path):
    writer = MetricWriter(str(tmp_path))
    for step in range(1, 4):
        writer.scalars(step, {"train/loss": 1.0 / step, "test/accuracy": 0.5 + 0.1 * step})
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    writer.images(3, {"inputs": image_grid(images, columns=4)})
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in loss], [1.0, 0.5, 1 / 3], rtol=1e-6)
    (image,) = events.Images("inputs")
    assert (image.height, image.width) == (16, 32)
    assert writer.history["test/accuracy"][-1] == (3, 0.8)


def test_a_resumed_runs_history_holds_every_step_once(tmp_path):
    first = MetricWriter(str(tmp_path))
    for step in range(1, 6):  # checkpointed at step 3, killed after step 5
        first.scalars(step, {"train/loss": float(step)})
    first.close()
    resumed = MetricWriter(str(tmp_path))
    for step in range(4, 8):  # resumes after step 3
        resumed.scalars(step, {"train/loss": 10.0 * step})
    resumed.close()
    assert resumed.history["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0), (7, 70.0)]


def test_json_is_replaced_atomically_and_plots_are_written(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(str(path), {"a": np.float32(1.5), "b": (1, 2)})
    write_json_atomic(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
    report.curves({"train/loss": [(1, 1.0), (2, 0.5)], "test/accuracy": [(2, 0.9)]}, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_arrays_are_written_atomically_and_a_failed_write_keeps_the_old_file(tmp_path):
    write_npy_atomic(str(tmp_path / "a.npy"), np.arange(3.0))
    write_npz_atomic(str(tmp_path / "b.npz"), theta=np.ones(2), signature=np.asarray("s"))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3.0))
    with np.load(tmp_path / "b.npz") as saved:
        assert str(saved["signature"]) == "s" and saved["theta"].tolist() == [1.0, 1.0]
    write_json_atomic(str(tmp_path / "results.json"), {"a": 1})
    with pytest.raises(TypeError):  # not JSON serialisable: fails inside the write
        write_json_atomic(str(tmp_path / "results.json"), {"a": object()})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "b.npz", "results.json"]  # no temporary file left


def test_atomic_writes_and_temporary_folders_get_the_permissions_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(str(tmp_path / "r.json"), {"a": 1})
        write_npz_atomic(str(tmp_path / "r.npz"), a=np.ones(1))
        with open(tmp_path / "plain", "w"):
            pass
        folder = temp_dir_beside(str(tmp_path / "converted"))
    finally:
        os.umask(old)
    assert os.path.dirname(folder) == str(tmp_path) and os.listdir(folder) == []
    assert os.stat(folder).st_mode & 0o777 == 0o755
    os.rmdir(folder)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"r.json": 0o644, "r.npz": 0o644, "plain": 0o644}


def test_a_signed_record_is_read_back_only_under_an_equal_signature(tmp_path):
    path = str(tmp_path / "sub" / "done.json")
    signature = {"lr": 0.1, "classes": (0, 1), "data": {"name": "digits"}}
    assert read_signed(path, signature) is None  # nothing saved yet
    write_signed(path, signature, {"acc": 0.5})
    assert read_signed(path, {"data": {"name": "digits"}, "classes": [0, 1], "lr": 0.1}) == {"acc": 0.5}
    assert read_signed(path, {**signature, "lr": 0.2}) is None
    assert read_signed(path, {**signature, "classes": (0, 2)}) is None
    assert read_signed(path, {k: v for k, v in signature.items() if k != "lr"}) is None
