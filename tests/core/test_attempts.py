"""A run's wall time over its attempts: a killed attempt counts until its last write."""
import json
import os
import time

import pytest

from research.core import experiment


def test_a_killed_attempt_counts_until_its_last_write_and_the_resumed_one_adds_its_own(tmp_path):
    experiment.record_attempt(str(tmp_path))
    first = json.loads((tmp_path / "attempts.json").read_text())[0]
    (tmp_path / "ckpt").write_text("x")                             # the killed attempt's last write,
    os.utime(tmp_path / "ckpt", (first["started"] + 30, first["started"] + 30))  # 30 s after its start
    experiment.record_attempt(str(tmp_path))                        # resumed; wall_time_s never ran before
    time.sleep(0.05)
    total = experiment.wall_time_s(str(tmp_path))
    attempts = json.loads((tmp_path / "attempts.json").read_text())
    assert attempts[0]["seconds"] == pytest.approx(30, abs=0.01) and 0.05 <= attempts[1]["seconds"] < 5
    assert total == pytest.approx(30 + attempts[1]["seconds"], abs=1e-6)
