"""tools/sweep on this machine: points checked up front, failures reported without stopping the
others, the exit code counting them, reruns that run only what is not done, multi-process points."""
import io
import json
import os
import sys

import pytest

from research.core.config import ConfigError
from tools import sweep
from tools.sweeps import local, points as points_lib
from tools.sweeps.progress import Progress

sys.path.insert(0, os.path.dirname(__file__))
from sweep_fakes import fake_points, runs  # noqa: E402

SMOKE = "configs/train_classifier.py:smoke"


def test_one_point_per_sweep_entry_with_the_common_overrides_first(tmp_path):
    points = points_lib.make_points("train_classifier", SMOKE, str(tmp_path), {"train.steps": "4"})
    assert len(points) == 6  # 3 learning rates x 2 models
    p = points[4]
    assert p.workdir == str(tmp_path / "004") and p.overrides == {"train.steps": "4", "optim.lr": 0.05, "model.name": "mlp"}
    assert p.args[:4] == ("-m", "experiments.train_classifier", "--config", SMOKE)
    assert p.args[4:7] == ("--config.train.steps=4", "--config.optim.lr=0.05", "--config.model.name=mlp")
    assert p.args[-2:] == ("--workdir", p.workdir)


def test_tuple_values_become_the_comma_lists_the_command_line_parses():
    assert points_lib.flag_value((32, 16)) == "32,16" and points_lib.flag_value(("a",)) == "a"


def test_a_bad_point_or_common_override_fails_before_anything_runs(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="train.stepz"):
        points_lib.make_points("train_classifier", SMOKE, str(tmp_path), {"train.stepz": "4"})
    monkeypatch.setattr(points_lib, "load_sweep", lambda spec: [{"optim.lr": 0.1}, {"optim.lrr": 0.2}])
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        points_lib.make_points("train_classifier", SMOKE, str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_an_unknown_experiment_or_set_flag_exits_with_one_line(tmp_path):
    for argv, message in ((["--experiment", "train_clasifier"], "no experiments/train_clasifier.py; one of"),
                          (["--experiment", "train_classifier", "--set", "optim.lr"], "--set 'optim.lr': expected KEY=VALUE")):
        with pytest.raises(SystemExit, match=message):
            sweep.main([*argv, "--config", SMOKE, "--workdir", str(tmp_path)])


def test_a_failed_point_is_reported_with_its_log_and_the_others_finish(tmp_path):
    points = fake_points(tmp_path, 3, marks={1: "fail"})
    out = io.StringIO()
    outcomes = local.run(points, parallel=2, progress=Progress(3, 2, stream=out))
    assert sorted((o.name, o.returncode) for o in outcomes) == [("000", 0), ("001", 3), ("002", 0)]
    assert [p.done for p in points] == [True, False, True]
    report = out.getvalue()
    assert "001 FAILED (exit 3)" in report and "boom" in report and points[1].log in report
    assert "done 2, failed 1, left 0" in report
    assert "boom" in open(points[1].log).read()  # the log stays in the point's workdir
    assert json.load(open(os.path.join(points[1].workdir, "point.json")))["overrides"] == {"value": 0.1}


def test_the_exit_code_counts_failures_and_a_rerun_runs_only_the_failed_point(tmp_path, monkeypatch, capsys):
    points = fake_points(tmp_path, 3, marks={0: "fail", 2: "fail"})
    monkeypatch.setattr(sweep, "make_points", lambda args: points)
    argv = ["--experiment", "x", "--config", SMOKE, "--workdir", str(tmp_path), "--parallel", "2"]
    assert sweep.main(argv) == 2
    assert "2 of 3 points failed: 000, 002" in capsys.readouterr().err
    os.remove(os.path.join(points[2].workdir, "fail"))
    assert sweep.main(argv) == 1  # 000 still fails; 001 is not run again
    assert [runs(p) for p in points] == [2, 1, 2]
    assert "1 of 3 points are done" in capsys.readouterr().out
    first, second = open(points[2].log).read().split(local.RUN_HEADER)[1:]
    assert "boom" in first.splitlines() and "boom" not in second.splitlines()  # each attempt's output is kept
    os.remove(os.path.join(points[0].workdir, "fail"))
    assert sweep.main(argv) == 0
    summary = json.load(open(tmp_path / "sweep.json"))
    assert [row["runs"] for row in summary] == [3, 1, 2]


def test_a_point_runs_as_two_jax_processes_that_join_one_run(tmp_path):
    script = ("import json, os, sys, jax; from research.core.mesh import initialize_distributed; "
              "assert initialize_distributed(); d = sys.argv[1]; "
              "json.dump({'count': jax.process_count(), 'index': jax.process_index()}, "
              "open(os.path.join(d, f'p{jax.process_index()}.json'), 'w'))")
    point = points_lib.Point(0, {}, str(tmp_path / "000"), ("-c", script, str(tmp_path / "000")))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    outcome = local.run_point(point, processes=2, env=env)
    assert outcome.ok, open(point.log).read()[-2000:]
    for i in range(2):
        assert json.load(open(tmp_path / "000" / f"p{i}.json")) == {"count": 2, "index": i}
    assert os.path.exists(tmp_path / "000" / "sweep.p1.log")


def test_a_preempted_point_is_run_again_and_resumes_up_to_the_requeue_limit(tmp_path):
    from research.core import cli

    assert local.PREEMPTED_EXIT == cli.PREEMPTED_EXIT
    twice, always = fake_points(tmp_path, 2)
    open(os.path.join(twice.workdir, "preempt"), "w").write("2")
    open(os.path.join(always.workdir, "preempt"), "w").write("99")
    outcome = local.run_point(twice)
    assert outcome.ok and outcome.attempts == 3 and runs(twice) == 3
    outcome = local.run_point(always, requeues=2)
    assert outcome.returncode == 75 and outcome.attempts == 3 and not always.done


def test_when_one_process_of_a_point_fails_the_other_is_stopped(tmp_path):
    script = ("import os, sys, time; i = int(os.environ['JAX_PROCESS_ID']); "
              "sys.exit(5) if i == 1 else time.sleep(120)")
    point = points_lib.Point(0, {}, str(tmp_path / "000"), ("-c", script))
    outcome = local.run_point(point, processes=2)
    assert outcome.returncode == 5 and outcome.seconds < 60


def test_a_point_does_not_outlive_a_killed_sweep(tmp_path):
    import signal
    import subprocess
    import time

    from sweep_fakes import alive

    point, = fake_points(tmp_path, 1, marks={0: "hang"})
    driver = ("import sys; sys.path[:0] = ['.', sys.argv[1]]; from sweep_fakes import fake_points; "
              "from tools.sweeps import local; local.run(fake_points(sys.argv[2], 1))")
    sweep_proc = subprocess.Popen([sys.executable, "-c", driver, os.path.dirname(__file__), str(tmp_path)])
    child_pid = os.path.join(point.workdir, "child.pid")
    deadline = time.monotonic() + 60
    while not (os.path.exists(child_pid) and os.path.getsize(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(open(child_pid).read())
    sweep_proc.send_signal(signal.SIGKILL)
    sweep_proc.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)  # a rerun will not race a leftover run in the same workdir
