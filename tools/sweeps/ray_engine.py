"""Runs points as Ray tasks: on a running cluster (``address="auto"`` or ``ray://HOST:10001``) or
on a local instance started for the sweep (no address).

One task per point runs the point's command as a subprocess of the Ray worker (so a point is the
same run on every backend, with its log in its workdir), under the resources the flags ask for
(``num_cpus``, ``num_gpus``, custom ``TPU`` chips). When the worker or its node dies, Ray
re-runs the task (up to ``max_retries`` times) and the point resumes from its own checkpoint; the
point's process dies with its worker, so two attempts never write one workdir. A point that
exits non-zero is a result, not a worker failure: it is reported, not retried. The workdir must
be storage every node sees (a shared or mounted file system) when the cluster has several nodes,
and every node needs this checkout and its environment (or pass ``working_dir`` to ship it).
Outcomes are gathered as they finish.
"""
from __future__ import annotations

import os
from typing import Sequence

from tools.sweeps.local import RUN_HEADER
from tools.sweeps.points import Point
from tools.sweeps.progress import Outcome, Progress


def _run_on_worker(point: Point, processes: int, cwd: str, env: dict) -> Outcome:
    import sys

    from tools.sweeps import local

    return local.run_point(point, processes=processes, python=sys.executable, env={**os.environ, **env}, cwd=cwd)


def run(points: Sequence[Point], address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
        tpu: float = 0, max_retries: int = 3, processes: int = 1, local_cpus: int | None = None,
        working_dir: str | None = None, env: dict | None = None, progress: Progress | None = None) -> list[Outcome]:
    """Runs the points that are not done as Ray tasks; returns their outcomes as they finish."""
    import ray

    pending = [p for p in points if not p.done]
    if not pending:
        return []
    if working_dir and not all(os.path.isabs(p.workdir) for p in pending):
        raise ValueError("a shipped working_dir is a temporary copy on each node: give the sweep an absolute "
                         "--workdir on storage every node sees")
    started_here = not ray.is_initialized()
    if started_here:
        runtime_env = {"working_dir": working_dir, "excludes": ["runs", ".venv", ".cache", ".git"]} if working_dir else None
        ray.init(address=address or None, num_cpus=None if address else local_cpus, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=False)
    try:
        cwd = "." if working_dir else os.getcwd()  # a shipped working_dir is the task's cwd
        resources = {"TPU": tpu} if tpu else None
        task = ray.remote(_run_on_worker).options(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
                                                 max_retries=max_retries, retry_exceptions=False)
        # Ray does not say how often a task was retried; each attempt appends a run header to the log.
        since = {p.name: _log_size(p) for p in pending}
        refs = {task.remote(p, processes, cwd, dict(env or {})): p for p in pending}
        slots = _concurrency(num_cpus, len(pending))
        progress = progress or Progress(len(pending), slots)
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            point = refs[ready[0]]
            try:
                outcome = ray.get(ready[0])
            except ray.exceptions.RayError as e:  # the worker died more often than max_retries allows
                outcome = Outcome(point.name, point.workdir, -1, 0.0, point.log)
                with open(point.log, "a") as f:
                    f.write(f"ray: the point's task failed with {max_retries} retries: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}\n")
            outcome.attempts = _attempts(point, since[point.name])
            progress.finished(outcome)
        return progress.outcomes
    finally:
        if started_here:
            ray.shutdown()


def _log_size(point: Point) -> int:
    return os.path.getsize(point.log) if os.path.exists(point.log) else 0


def _attempts(point: Point, since: int) -> int:
    """Runs of the point this sweep started: the run headers its log gained after byte ``since``."""
    if not os.path.exists(point.log):
        return 0
    with open(point.log, "rb") as f:
        f.seek(since)
        return max(1, sum(line.startswith(RUN_HEADER.encode()) for line in f))


def _concurrency(num_cpus: float, pending: int) -> int:
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, min(pending, int(cpus // max(num_cpus, 1e-9))))
