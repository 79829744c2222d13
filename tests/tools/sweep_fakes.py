"""Stand-in points for the sweep tests: a few lines of Python instead of an experiment, so the
tests exercise the engines (failures, retries, resuming) in about a second each.

The script counts its runs in ``WORKDIR/runs.txt``; it fails (exit 3, "boom" on stderr) while
``WORKDIR/fail`` exists; while ``WORKDIR/hang`` exists it writes its parent's pid (the engine's
worker) to ``WORKDIR/parent.pid`` and its own to ``WORKDIR/child.pid`` and sleeps; otherwise it
writes ``results.json`` with its run count. While ``WORKDIR/preempt`` holds a number n > 0 it
counts it down and exits 75, as a run stopped by SIGTERM with its checkpoint saved does.
"""
import os
import sys

from tools.sweeps.points import Point

SCRIPT = """
import json, os, sys, time
d = sys.argv[1]
runs = int(open(os.path.join(d, "runs.txt")).read()) + 1 if os.path.exists(os.path.join(d, "runs.txt")) else 1
open(os.path.join(d, "runs.txt"), "w").write(str(runs))
print("run", runs, flush=True)
preempt = os.path.join(d, "preempt")
left = int(open(preempt).read()) if os.path.exists(preempt) else 0
if left > 0:
    open(preempt, "w").write(str(left - 1))
    sys.exit(75)
if os.path.exists(os.path.join(d, "fail")):
    print("boom", file=sys.stderr)
    sys.exit(3)
if os.path.exists(os.path.join(d, "hang")):
    os.remove(os.path.join(d, "hang"))
    open(os.path.join(d, "child.pid"), "w").write(str(os.getpid()))
    open(os.path.join(d, "parent.pid"), "w").write(str(os.getppid()))
    time.sleep(120)
json.dump({"runs": runs, "value": float(sys.argv[2])}, open(os.path.join(d, "results.json"), "w"))
"""


def fake_points(workdir, n=3, marks=None) -> list[Point]:
    """``n`` points in ``workdir/NNN``; ``marks`` {index: "fail" | "hang"} creates those files."""
    points = []
    for i in range(n):
        run_dir = os.path.join(str(workdir), f"{i:03d}")
        os.makedirs(run_dir, exist_ok=True)
        if marks and i in marks:
            open(os.path.join(run_dir, marks[i]), "w").close()
        points.append(Point(i, {"value": i / 10}, run_dir, ("-c", SCRIPT, run_dir, str(i / 10))))
    return points


def runs(point: Point) -> int:
    path = os.path.join(point.workdir, "runs.txt")
    return int(open(path).read()) if os.path.exists(path) else 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1][0] != "Z"


PYTHON = sys.executable
