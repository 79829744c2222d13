"""The workdir lease for gcsfuse buckets: a fresh lease of another run refuses, a stale one is taken
over, the holder renews it and removes it on release, and a run whose write is overwritten backs off."""
import json
import time

import pytest

from research.core import experiment, lease
from research.core.config import ConfigError


def _write(tmp_path, holder, age_s):
    (tmp_path / lease.LEASE_FILE).write_text(json.dumps({"holder": holder, "renewed": time.time() - age_s}))


def test_a_fresh_lease_of_another_run_refuses_naming_it(tmp_path):
    _write(tmp_path, "vm-7:4242", age_s=10)
    with pytest.raises(ConfigError, match=r"in use by another run \(vm-7:4242, lease renewed 1\d s ago\)"):
        lease.take_lease(str(tmp_path), settle_s=0)
    assert json.loads((tmp_path / lease.LEASE_FILE).read_text())["holder"] == "vm-7:4242"  # untouched


def test_a_stale_lease_is_taken_over_renewed_and_released(tmp_path):
    _write(tmp_path, "vm-7:4242", age_s=lease.LEASE_S + 1)
    lease.take_lease(str(tmp_path), settle_s=0, lease_s=0.4)  # renews every 0.1 s
    held = json.loads((tmp_path / lease.LEASE_FILE).read_text())
    assert held["holder"] == lease.holder_name()
    time.sleep(0.35)
    assert lease.read_lease(str(tmp_path / lease.LEASE_FILE))["renewed"] > held["renewed"]
    lease.take_lease(str(tmp_path), settle_s=0)  # the holder may start again
    lease.release_lease(str(tmp_path))
    assert not (tmp_path / lease.LEASE_FILE).exists()


def test_of_two_runs_starting_together_the_later_write_wins(tmp_path, monkeypatch):
    # Another machine writes its lease while this run settles: this run backs off.
    monkeypatch.setattr(lease.time, "sleep", lambda s: _write(tmp_path, "vm-9:77", age_s=0))
    with pytest.raises(ConfigError, match=r"vm-9:77"):
        lease.take_lease(str(tmp_path))
    assert str(tmp_path / lease.LEASE_FILE) not in lease._HELD


def test_start_takes_the_lease_on_gcsfuse_only(tmp_path, monkeypatch):
    from research.core.config import load_config

    monkeypatch.setattr(lease, "SETTLE_S", 0)
    taken = []
    monkeypatch.setattr(experiment, "take_lease", lambda workdir: taken.append(workdir))
    monkeypatch.setattr(experiment, "needs_commit_file", lambda d: d.endswith("bucket"))
    experiment.start(load_config("configs/train_classifier.py:smoke"), str(tmp_path / "disk"))
    experiment.start(load_config("configs/train_classifier.py:smoke"), str(tmp_path / "bucket"))
    assert taken == [str(tmp_path / "bucket")]
