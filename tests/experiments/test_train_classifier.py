"""The classifier experiment end to end (smoke config), and its one-line errors from the CLI."""
import json
import os
import subprocess
import sys

import pytest

from experiments import train_classifier
from research.core.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("overrides", [{}, {"model.name": "vit_tiny", "model.dtype": "bfloat16", "train.grad_accum_steps": 2}])
def test_smoke_run_writes_a_complete_record_and_resumes(tmp_path, overrides):
    config = load_config("configs/train_classifier.py:smoke", overrides)
    results = train_classifier.main(config, str(tmp_path))
    for key in ("test_accuracy", "train_loss", "steps", "wall_time_s"):
        assert key in results
    assert results["steps"] == 6 and 0 <= results["test_accuracy"] <= 1
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["steps"] == 6 and on_disk["test_accuracy"] == results["test_accuracy"]
    assert {"config.json", "curves.png", "tb", "checkpoints"} <= set(os.listdir(tmp_path))
    # Run again in the same workdir: it resumes from the final checkpoint and trains no more.
    again = train_classifier.main(config, str(tmp_path))
    assert again["steps"] == 6 and again["test_accuracy"] == results["test_accuracy"]


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
     "error: cifar10_sample: cifar/cifar10_subset.npz not found under /nonexistent"),
])
def test_bad_input_gives_one_clear_error_line(tmp_path, args, message):
    proc = run_cli(*args, "--workdir", str(tmp_path), env={"RESEARCH_DATA_DIR": ""})
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(message), lines[0]
    assert not os.path.exists(tmp_path / "results.json")
