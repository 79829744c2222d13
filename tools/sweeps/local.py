"""Runs points as subprocesses of this machine, ``parallel`` at a time.

Each point's stdout and stderr go to ``WORKDIR/sweep.log`` (appended per attempt, so a rerun keeps
the failed attempt's log). A failed point is reported and the others go on. With ``processes``
> 1 a point is itself a multi-process JAX run: its processes meet through
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (read by
``research.core.mesh.initialize_distributed``); process 0 logs to ``sweep.log``, process i to
``sweep.p{i}.log``, and when one process fails the others are stopped rather than left waiting
on a collective.
"""
from __future__ import annotations

import concurrent.futures
import os
import shlex
import socket
import subprocess
import sys
import time
from typing import Sequence

from tools.sweeps.points import Point
from tools.sweeps.progress import Outcome, Progress

RUN_HEADER = "=== run "  # starts the log lines that open each attempt
PREEMPTED_EXIT = 75      # research.core.cli's exit status after SIGTERM with the checkpoint saved (a test ties them)


# Sets PR_SET_PDEATHSIG (1) to SIGTERM, gives up if the launcher is already gone, then becomes the
# point's command (same pid). A wrapper rather than a preexec_fn: no Python runs between fork and
# exec in this multi-threaded (JAX) process.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0); "
                    "os.getppid() == int(sys.argv[1]) or sys.exit(143); os.execvp(sys.argv[2], sys.argv[2:])")


def dies_with_parent(command: Sequence[str]) -> list[str]:
    """``command`` made to receive SIGTERM when the process that starts it dies (Linux; unchanged
    elsewhere): a point never outlives the sweep or Ray worker running it, so a retried or re-run
    point is never written by two runs at once."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def distributed_env(process_id: int, num_processes: int, port: int) -> dict[str, str]:
    return {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(num_processes),
            "JAX_PROCESS_ID": str(process_id)}


def run_point(point: Point, processes: int = 1, python: str = sys.executable, env: dict | None = None,
              cwd: str | None = None, command: Sequence[str] | None = None, requeues: int = 3) -> Outcome:
    """Runs one point to its end (blocking) and returns how it ended. ``command`` replaces the
    point's own (``python *point.args``), e.g. a launcher that runs it elsewhere. A run stopped by
    SIGTERM with its checkpoint saved (exit ``PREEMPTED_EXIT``, 75) is run again, resuming, up to
    ``requeues`` times; ``attempts`` counts the runs."""
    for attempt in range(1, requeues + 2):
        outcome = _run_once(point, processes, python, env, cwd, command)
        outcome.attempts = attempt
        if outcome.returncode != PREEMPTED_EXIT:
            break
    return outcome


def _run_once(point: Point, processes: int, python: str, env: dict | None, cwd: str | None,
              command: Sequence[str] | None) -> Outcome:
    point.record()
    command = list(command) if command is not None else [python, *point.args]
    env = dict(os.environ if env is None else env)
    start = time.monotonic()
    logs = [point.log] + [os.path.join(point.workdir, f"sweep.p{i}.log") for i in range(1, processes)]
    files = [open(path, "a") for path in logs]
    try:
        for f in files:
            f.write(f"{RUN_HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
            f.flush()
        port = free_port() if processes > 1 else 0
        procs = [subprocess.Popen(dies_with_parent(command), stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                  env={**env, **(distributed_env(i, processes, port) if processes > 1 else {})})
                 for i, f in enumerate(files)]
        returncode = _wait_all(procs)
    finally:
        for f in files:
            f.close()
    return Outcome(point.name, point.workdir, returncode, time.monotonic() - start, point.log)


def _wait_all(procs: Sequence[subprocess.Popen]) -> int:
    """Waits for every process; the first failure stops the rest. Returns 0 or the first failure's code."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def run(points: Sequence[Point], parallel: int = 1, processes: int = 1, progress: Progress | None = None,
        **kwargs) -> list[Outcome]:
    """Runs the points that are not done, ``parallel`` at a time; returns their outcomes."""
    pending = [p for p in points if not p.done]
    progress = progress or Progress(len(pending), parallel)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(run_point, p, processes, **kwargs) for p in pending]
        for future in concurrent.futures.as_completed(futures):
            progress.finished(future.result())
    return progress.outcomes
