"""Mean and spread of results across the runs of a sweep (tools/sweep.py's DIR/NNN/results.json).

    python -m tools.sweep_stats runs/rashomon_seeds 'methods.*.by_eps.-1.ambiguity' 'speedup_per_model.*'

A key is a dotted path into results.json: dict keys, list indices (negative counts from the end)
and ``*`` for every key of a dict (or item of a list). Each concrete path prints one line:
mean, sample standard deviation, min, max and the number of runs that have it. A key that no run
has fails naming it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

import numpy as np


def expand(tree: Any, key: str) -> dict[str, float]:
    """{concrete dotted path: number} for a key that may hold ``*``."""
    out: dict[str, float] = {}

    def walk(node, parts, path):
        if not parts:
            if isinstance(node, (int, float)) and not isinstance(node, bool):
                out[".".join(path)] = float(node)
            return
        head, rest = parts[0], parts[1:]
        if isinstance(node, dict):
            names = list(node) if head == "*" else [head] if head in node else []
            for name in names:
                walk(node[name], rest, path + [name])
        elif isinstance(node, list):
            if head == "*":
                indices = range(len(node))
            elif head.lstrip("-").isdigit() and -len(node) <= int(head) < len(node):
                indices = [int(head) % len(node)]
            else:
                indices = []
            for i in indices:
                walk(node[i], rest, path + [str(i)])

    walk(tree, key.split("."), [])
    return out


def stats(runs: list[dict], keys: list[str]) -> list[tuple[str, np.ndarray]]:
    """[(concrete path, values over the runs that have it)] in the order the keys expand."""
    rows: dict[str, list[float]] = {}
    for key in keys:
        found = False
        for run in runs:
            for path, value in expand(run, key).items():
                rows.setdefault(path, []).append(value)
                found = True
        if not found:
            raise KeyError(f"no run's results.json has a number at {key!r}")
    return [(path, np.asarray(values)) for path, values in rows.items()]


def load_runs(directory: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(directory, "*", "results.json")))
    if not paths:
        raise FileNotFoundError(f"{directory}: no */results.json (run tools/sweep.py there first)")
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="the sweep's workdir (holds NNN/results.json)")
    parser.add_argument("keys", nargs="+", help="dotted paths into results.json; * matches every key")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.directory)
        rows = stats(runs, args.keys)
    except (FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e.args[0]}")
    width = max(len(path) for path, _ in rows)
    print(f"{'key':{width}s}  {'mean':>10s}  {'std':>10s}  {'min':>10s}  {'max':>10s}  runs")
    for path, v in rows:
        std = v.std(ddof=1) if len(v) > 1 else 0.0
        print(f"{path:{width}s}  {v.mean():10.4g}  {std:10.4g}  {v.min():10.4g}  {v.max():10.4g}  {len(v)}")


if __name__ == "__main__":
    main()
