"""The start every experiment shares, and the rule that only process 0 writes.

``mesh = start(config, workdir)``: joins a multi-process run when launched as one
(``jax.distributed``), makes the mesh of ``config.mesh`` (a ``MeshConfig`` section; all devices on
``data`` when the config has none), creates ``workdir``, takes its lock (a second run in the same
workdir, from another process, stops at once with one line), records the attempt
(``wall_time_s(workdir)``: the run's seconds over every attempt of a resumed run) and writes the
resolved config to ``workdir/config.json``. ``mesh_config(config).logical`` are the rules that lay parameters out.
Files that every process would write alike (results, tables, plots) are written by process 0
alone: guard them with ``if main_process():``.
"""
from __future__ import annotations

import fcntl
import json
import os
import time

import jax
import ml_collections
from jax.sharding import Mesh

from research.core import config as config_lib
from research.core.checkpoint import needs_commit_file
from research.core.lease import LEASE_FILE, take_lease
from research.core.mesh import MeshConfig, initialize_distributed, make_mesh
from research.core.records import write_json_atomic, write_text_atomic


_LOCKS: dict[str, object] = {}  # workdir -> its open lock file, held until the process ends


def lock_workdir(workdir: str) -> None:
    """Holds ``workdir/.lock`` for this process (process 0 of a multi-process run); a `ConfigError`
    naming the other run's pid when another process holds it. The same process may start again in
    the same workdir (a rerun from a notebook or a test). On gcsfuse, whose buckets other machines
    mount too, it also takes the workdir's lease (research/core/lease.py)."""
    path = os.path.join(os.path.abspath(workdir), ".lock")
    if path in _LOCKS or not main_process():
        return
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise config_lib.ConfigError(f"workdir {workdir!r} is in use by another run ({holder}); wait for it to end, "
                                     f"or use another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _LOCKS[path] = handle
    if needs_commit_file(workdir):  # a bucket mounted on several machines: flock sees this one only
        take_lease(workdir)


ATTEMPTS_FILE = "attempts.json"
_STARTED: dict[str, tuple[float, float]] = {}  # workdir -> (perf_counter at this attempt's start, earlier seconds)


def _newest_write(workdir: str) -> float:
    """The latest modification time of the run's files (not the lock or the attempts record)."""
    newest = 0.0
    for root, _, files in os.walk(workdir):
        for name in files:
            if name not in (".lock", LEASE_FILE, ATTEMPTS_FILE):
                try:
                    newest = max(newest, os.path.getmtime(os.path.join(root, name)))
                except OSError:  # removed meanwhile (a checkpoint rotated out)
                    pass
    return newest


def record_attempt(workdir: str) -> None:
    """Appends this start to ``workdir/attempts.json`` ({"started", "seconds"} per attempt). An earlier
    attempt that never reported its time (killed, preempted) counts until its last write."""
    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, ATTEMPTS_FILE)
    attempts = []
    if main_process() and os.path.exists(path):
        with open(path) as f:
            attempts = json.load(f)
        last = attempts[-1] if attempts else None
        if last is not None and last.get("seconds") is None:
            last["seconds"] = max(0.0, _newest_write(workdir) - last["started"])
    if main_process():
        write_json_atomic(path, attempts + [{"started": time.time(), "seconds": None}])
    _STARTED[workdir] = (time.perf_counter(), sum(a["seconds"] for a in attempts))


def wall_time_s(workdir: str) -> float:
    """Seconds of the run in ``workdir`` over all its attempts (a resumed run's earlier ones
    included); records this attempt's seconds so far in ``attempts.json``."""
    workdir = os.path.abspath(workdir)
    started, earlier = _STARTED[workdir]
    seconds = time.perf_counter() - started
    path = os.path.join(workdir, ATTEMPTS_FILE)
    if main_process() and os.path.exists(path):
        with open(path) as f:
            attempts = json.load(f)
        attempts[-1]["seconds"] = seconds
        write_json_atomic(path, attempts)
    return earlier + seconds


def main_process() -> bool:
    """True on the process that writes the run's files (process 0)."""
    return jax.process_index() == 0


def mesh_config(config: ml_collections.ConfigDict) -> MeshConfig:
    """The run's ``mesh`` section (defaults when the config has none); a bad value is a ConfigError."""
    return config_lib.build(MeshConfig, config, "mesh") if "mesh" in config else MeshConfig()


def start(config: ml_collections.ConfigDict, workdir: str, *, subdirs: tuple[str, ...] = ()) -> Mesh:
    """Distributed set-up, the mesh, ``workdir`` (and ``subdirs`` in it) and ``config.json``."""
    if initialize_distributed():
        print(f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local devices "
              f"of {jax.device_count()}", flush=True)
    mesh = make_mesh(mesh_config(config))
    for folder in (workdir, *(os.path.join(workdir, d) for d in subdirs)):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise config_lib.ConfigError(f"workdir {workdir!r}: cannot create {folder!r} ({e.strerror}); "
                                         f"choose a folder you can write") from None
    lock_workdir(workdir)
    record_attempt(workdir)
    if main_process():
        write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    return mesh


def device_summary(mesh: Mesh) -> str:
    """What the run's mesh spans, for its record: "8 x cpu", "1 x NVIDIA H200"."""
    return f"{mesh.size} x {mesh.devices.flat[0].device_kind}"


def write_results(workdir: str, results: dict, table: str = "") -> None:
    """``workdir/results.json`` and, with a ``table``, ``workdir/results.md``, each written atomically."""
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    if table:
        write_text_atomic(os.path.join(workdir, "results.md"), table + "\n")
