"""The command line's contract: a user error is one line on stderr naming the key, file or folder,
and exit status 2; without --workdir the first line says where the run goes. Run in this process
(``cli.run`` with a stand-in experiment) so each case costs no interpreter start."""
import os
import sys

import pytest
from absl import flags

from research.core import cli

CONFIG = "configs/train_classifier.py:smoke"


def ran(config, workdir):
    ran.calls.append((config, workdir))


def run(monkeypatch, capsys, *args) -> tuple[int | None, list[str]]:
    """(exit status, stderr lines) of the command line ``args`` with the stand-in experiment."""
    ran.calls = []
    flags.FLAGS.unparse_flags()
    monkeypatch.setattr(sys, "argv", ["experiment", *args])
    try:
        cli.run(ran)
        status = None
    except SystemExit as e:
        status = e.code
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/train_classifier.py:smok"],
     "error: unknown preset(s) ['smok'] for configs/train_classifier.py; choose from: smoke"),
    (["--config", "configs/nope.py"], "error: config file 'configs/nope.py' does not exist"),
    (["--config", CONFIG, "--config.train.batch_sise=8"], "error: unknown config key 'train.batch_sise'"),
    (["--workdir", "w"], "error: --config is required"),
])
def test_a_user_error_is_one_line_and_exit_status_2(monkeypatch, capsys, tmp_path, args, message):
    status, lines = run(monkeypatch, capsys, *args, *([] if "--workdir" in args else ["--workdir", str(tmp_path)]))
    assert status == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert ran.calls == []


def test_a_workdir_that_cannot_be_written_is_one_line_before_the_run(monkeypatch, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    status, lines = run(monkeypatch, capsys, "--config", CONFIG, "--workdir", str(locked / "run"))
    assert status == 2 and len(lines) == 1 and "cannot be written" in lines[0] and str(locked) in lines[0], lines
    assert ran.calls == [] and not os.path.exists(locked / "run")  # nothing created


def test_without_workdir_the_first_line_names_the_default(monkeypatch, capsys):
    status, lines = run(monkeypatch, capsys, "--config", CONFIG)
    assert status in (None, 0) and lines == ["workdir: runs/test_cli (the default; set --workdir DIR for another)"]
    (config, workdir), = ran.calls
    assert workdir == "runs/test_cli" and config.train.steps == 6


def test_a_workdir_that_cannot_be_created_is_a_config_error_naming_it(tmp_path):
    from research.core import experiment
    from research.core.config import ConfigError, load_config

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"workdir '.*file/run': cannot create .* choose a folder you can write"):
        experiment.start(load_config(CONFIG), str(tmp_path / "file" / "run"))


def test_a_second_run_in_a_workdir_held_by_another_process_stops_at_once(tmp_path):
    import subprocess
    import textwrap

    from research.core import experiment
    from research.core.config import ConfigError, load_config

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        f = open({str(tmp_path / '.lock')!r}, "a+"); fcntl.flock(f, fcntl.LOCK_EX); f.write(f"pid {{os.getpid()}}")
        f.flush(); print("locked", flush=True); time.sleep(60)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"workdir .* is in use by another run \(pid {holder.pid}\)"):
            experiment.start(load_config(CONFIG), str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    experiment.start(load_config(CONFIG), str(tmp_path))  # free again: this process takes it
    experiment.start(load_config(CONFIG), str(tmp_path))  # and may start again itself


def test_a_preempted_run_exits_with_status_75(monkeypatch, capsys, tmp_path):
    from research.core.loop import Preempted

    def preempted(config, workdir):
        raise Preempted(7, True)
    flags.FLAGS.unparse_flags()
    monkeypatch.setattr(sys, "argv", ["experiment", "--config", CONFIG, "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        cli.run(preempted)
    assert done.value.code == cli.PREEMPTED_EXIT == 75
    assert capsys.readouterr().err.strip() == ("preempted: stopped by SIGTERM after step 7; its checkpoint is saved: "
                                               "run the same command again to resume")
