"""The sweep launcher turns get_sweep() points into experiment commands, checked up front."""
import pytest

from research.core.config import ConfigError
from tools import sweep


def test_one_command_per_point_with_its_overrides(tmp_path):
    runs = sweep.commands("train_classifier", "configs/train_classifier.py:smoke", str(tmp_path))
    assert len(runs) == 4
    run_dir, cmd = runs[1]
    assert run_dir == str(tmp_path / "001")
    assert cmd[1:5] == ["-m", "experiments.train_classifier", "--config", "configs/train_classifier.py:smoke"]
    assert "--config.optim.lr=0.1" in cmd and "--config.model.name=resnet20" in cmd
    assert cmd[-2:] == ["--workdir", run_dir]


def test_a_bad_point_fails_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "load_sweep", lambda spec: [{"optim.lr": 0.1}, {"optim.lrr": 0.2}])
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        sweep.commands("train_classifier", "configs/train_classifier.py:smoke", str(tmp_path))
