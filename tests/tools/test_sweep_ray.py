"""tools/sweep on Ray: a real local Ray instance (started and stopped here) runs the points; a
point whose worker is killed is retried to completion; a point that fails is reported, not retried."""
import io
import os
import signal
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from tools.sweeps import ray_engine  # noqa: E402
from tools.sweeps.progress import Progress  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from sweep_fakes import alive, fake_points, runs  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def wait_for(predicate, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.1)


def test_points_run_as_ray_tasks_failures_are_reported_not_retried_and_done_points_skipped(tmp_path, local_ray):
    points = fake_points(tmp_path, 4, marks={2: "fail"})
    open(os.path.join(points[3].workdir, "results.json"), "w").write("{}")  # done before the sweep
    out = io.StringIO()
    outcomes = ray_engine.run(points, max_retries=2, progress=Progress(3, 2, stream=out))
    assert sorted((o.name, o.returncode, o.attempts) for o in outcomes) == [("000", 0, 1), ("001", 0, 1), ("002", 3, 1)]
    assert [runs(p) for p in points] == [1, 1, 1, 0]
    assert "002 FAILED (exit 3)" in out.getvalue() and "boom" in out.getvalue()
    assert ray.is_initialized()  # an instance the caller started is left running


def kill_the_worker_when_the_point_hangs(point, killed):
    parent_pid = os.path.join(point.workdir, "parent.pid")

    def kill():
        wait_for(lambda: os.path.exists(parent_pid) and os.path.getsize(parent_pid) > 0)
        killed["worker"] = int(open(parent_pid).read())
        killed["point"] = int(open(os.path.join(point.workdir, "child.pid")).read())
        assert killed["worker"] != os.getpid()  # the Ray worker, not this test process
        os.kill(killed["worker"], signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    return killer


def test_a_point_whose_ray_worker_is_killed_is_retried_to_completion(tmp_path, local_ray):
    point, = fake_points(tmp_path, 1, marks={0: "hang"})
    killed = {}
    killer = kill_the_worker_when_the_point_hangs(point, killed)
    out = io.StringIO()
    outcome, = ray_engine.run([point], max_retries=2, progress=Progress(1, stream=out))
    killer.join()
    assert outcome.ok and outcome.attempts == 2 and runs(point) == 2, out.getvalue()
    assert point.done and "after 2 attempts" in out.getvalue()
    # The first attempt's process died with its worker: it cannot write the workdir the retry owns.
    wait_for(lambda: not alive(killed["point"]), 10)


def test_a_point_whose_worker_dies_more_often_than_max_retries_is_reported_failed(tmp_path, local_ray):
    point, = fake_points(tmp_path, 1, marks={0: "hang"})
    killer = kill_the_worker_when_the_point_hangs(point, {})
    out = io.StringIO()
    outcome, = ray_engine.run([point], max_retries=0, progress=Progress(1, stream=out))
    killer.join()
    assert outcome.returncode == -1 and not point.done and runs(point) == 1
    assert "000 FAILED" in out.getvalue() and "failed with 0 retries" in open(point.log).read()
