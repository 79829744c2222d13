"""A workdir lock for storage that ``flock`` cannot lock across machines (a gcsfuse bucket, which the
tpu-pod sweeps mount on every VM): a lease file renewed by its holder.

``workdir/.lease`` holds {"holder": "host:pid", "renewed": unix time}. A run takes the lease when
the file is absent, its own, or older than ``LEASE_S`` (its holder died without releasing it); it
writes the file, waits ``SETTLE_S`` and reads it back, so of two runs that start together only the
one whose write landed last proceeds (the bucket reads back what was last written). A daemon
thread renews it every ``LEASE_S / 4`` seconds; it is removed when the process ends.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time

from research.core import config as config_lib

LEASE_FILE = ".lease"
LEASE_S = 120.0   # a lease not renewed for this long is stale: its holder is gone
SETTLE_S = 2.0    # between writing the lease and reading it back

_HELD: dict[str, threading.Event] = {}  # lease path -> the event that stops its renewal


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def read_lease(path: str) -> dict | None:
    try:
        with open(path) as f:
            lease = json.load(f)
        return lease if isinstance(lease, dict) and "holder" in lease and "renewed" in lease else None
    except (OSError, ValueError):  # absent, or half-written by a holder that died: no lease
        return None


def _write(path: str) -> None:
    with open(path, "w") as f:  # gcsfuse uploads the object when the file is closed
        json.dump({"holder": holder_name(), "renewed": time.time()}, f)


def take_lease(workdir: str, settle_s: float = SETTLE_S, lease_s: float = LEASE_S) -> None:
    """Holds ``workdir/.lease`` for this process, or raises a `ConfigError` naming the holder."""
    path = os.path.join(os.path.abspath(workdir), LEASE_FILE)
    if path in _HELD:
        return
    me = holder_name()
    lease = read_lease(path)
    if lease and lease["holder"] != me and time.time() - lease["renewed"] < lease_s:
        _refuse(workdir, lease, lease_s)
    _write(path)
    time.sleep(settle_s)
    lease = read_lease(path)
    if not lease or lease["holder"] != me:  # another run wrote after us: it holds the workdir
        _refuse(workdir, lease or {"holder": "another run", "renewed": time.time()}, lease_s)
    stop = threading.Event()
    _HELD[path] = stop
    threading.Thread(target=_renew, args=(path, stop, lease_s / 4), daemon=True, name="workdir-lease").start()
    atexit.register(release_lease, workdir)


def _refuse(workdir: str, lease: dict, lease_s: float) -> None:
    age = max(0.0, time.time() - lease["renewed"])
    raise config_lib.ConfigError(
        f"workdir {workdir!r} is in use by another run ({lease['holder']}, lease renewed {age:.0f} s ago); wait "
        f"for it to end (a lease not renewed for {lease_s:.0f} s is taken over), or use another --workdir")


def _renew(path: str, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            _write(path)
        except OSError:  # the bucket is unreachable for a moment: the next renewal tries again
            pass


def release_lease(workdir: str) -> None:
    """Stops renewing and removes the lease if it is still this process's."""
    path = os.path.join(os.path.abspath(workdir), LEASE_FILE)
    stop = _HELD.pop(path, None)
    if stop is None:
        return
    stop.set()
    lease = read_lease(path)
    if lease and lease["holder"] == holder_name():
        try:
            os.remove(path)
        except OSError:
            pass
