"""The classifier experiment end to end (smoke config), and its one-line errors from the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import train_classifier
from research.core.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("overrides", [{}, {"model.name": "vit_tiny", "model.depth": 2, "model.dtype": "bfloat16",
                                        "train.grad_accum_steps": 2}])
def test_smoke_run_writes_a_complete_record_and_resumes(tmp_path, overrides):
    config = load_config("configs/train_classifier.py:smoke", overrides)
    results = train_classifier.main(config, str(tmp_path))
    for key in ("test_accuracy", "train_loss", "steps", "wall_time_s"):
        assert key in results
    assert results["steps"] == 6 and 0 <= results["test_accuracy"] <= 1
    assert results["devices"] == "8 x cpu"  # the mesh the run spanned (tests/conftest.py: 8 CPU devices)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["steps"] == 6 and on_disk["test_accuracy"] == results["test_accuracy"]
    assert {"config.json", "curves.png", "tb", "checkpoints"} <= set(os.listdir(tmp_path))
    # Run again in the same workdir: it resumes from the final checkpoint and trains no more.
    again = train_classifier.main(config, str(tmp_path))
    assert again["steps"] == 6 and again["test_accuracy"] == results["test_accuracy"]
    attempts = json.loads((tmp_path / "attempts.json").read_text())  # wall time counts both attempts
    assert len(attempts) == 2 and again["wall_time_s"] == pytest.approx(sum(a["seconds"] for a in attempts))
    assert again["wall_time_s"] > results["wall_time_s"]


def run_cli(*args, env=None):
    env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "experiments.train_classifier", "--config", "configs/train_classifier.py:smoke",
                           *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--config.train.batch_sise=8"], "error: unknown config key 'train.batch_sise' (did you mean 'train.batch_size'?)"),
    (["--config.train.batch_size=eight"], "error: config key 'train.batch_size' expects int, got 'eight' (str)"),
    (["--config.model.name=resnet21"], "error: config key 'model.name' = 'resnet21' is not allowed; choose one of: mlp, resnet20"),
    (["--config.data.name=imagenet"], "error: config key 'data.name' = 'imagenet' is not allowed; choose one of: digits, mnist"),
    (["--config.data.name=cifar10_sample", "--config.data.source=offline", "--config.data.data_dir=/nonexistent"],
     "error: data.data_dir '/nonexistent' does not exist"),
])
def test_bad_input_gives_one_clear_error_line(tmp_path, args, message):
    proc = run_cli(*args, "--workdir", str(tmp_path), env={"RESEARCH_DATA_DIR": ""})
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(message), lines[0]
    assert not os.path.exists(tmp_path / "results.json")


def test_a_data_dir_that_does_not_exist_never_falls_back_to_the_environment(tmp_path, monkeypatch):
    """With $RESEARCH_DATA_DIR holding the sample, a given data.data_dir that does not exist fails,
    and one that exists without the sample fails too, instead of training on the environment's data."""
    env_data = tmp_path / "env_data" / "cifar"
    env_data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(env_data / "cifar10_subset.npz", x_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(64) % 2, x_test=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(16) % 2, label_names=np.array(["a", "b"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"RESEARCH_DATA_DIR": str(tmp_path / "env_data")}
    common = ["--config.data.name=cifar10_sample", "--config.data.source=auto", "--config.model.name=mlp"]  # mlp: the data path is what is tested
    for data_dir, message in ((tmp_path / "nonexistent", f"error: data.data_dir '{tmp_path / 'nonexistent'}' does not exist"),
                              (empty, f"error: cifar10_sample: cifar/cifar10_subset.npz not found under {empty}")):
        proc = run_cli(*common, f"--config.data.data_dir={data_dir}", "--workdir", str(tmp_path / "run"), env=env)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not os.path.exists(tmp_path / "run" / "results.json")
    # The environment's folder is the default when no path is given: the same config trains.
    monkeypatch.setenv("RESEARCH_DATA_DIR", env["RESEARCH_DATA_DIR"])
    config = load_config("configs/train_classifier.py:smoke",
                         {"data.name": "cifar10_sample", "data.source": "auto", "model.name": "mlp"})
    results = train_classifier.main(config, str(tmp_path / "run"))
    assert results["steps"] == 6
    assert results["num_params"] == 32 * 32 * 3 * 32 + 32 + 32 * 2 + 2  # the MLP on the environment's 2 classes
