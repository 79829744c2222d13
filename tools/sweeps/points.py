"""The points of a sweep: one run each, with its own workdir, checked against the config before
anything starts.

``make_points(experiment, config, workdir, common)`` reads ``get_sweep(arg)`` from the config file,
applies ``common`` (overrides for every point, e.g. ``{"train.epochs": 1}``) and then each point's
own overrides to the config (a bad key or value raises ``ConfigError`` naming it), and returns one
``Point`` per entry: ``workdir/NNN`` and the experiment's argument list without the interpreter.
A point is ``done`` when its ``results.json`` exists; every backend skips done points, and a point
that was running when a sweep died resumes from its own checkpoint in its workdir.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from research.core.config import apply_overrides, load_config, load_sweep
from research.core.records import write_json_atomic


def flag_value(value: Any) -> str:
    """A config value as command-line text the experiment parses back to the same value."""
    if isinstance(value, (tuple, list)):
        return ",".join(flag_value(v) for v in value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: ``args`` follow the interpreter (``-m experiments.NAME ...``)."""
    index: int
    overrides: dict
    workdir: str
    args: tuple[str, ...]

    @property
    def name(self) -> str:
        return os.path.basename(self.workdir.rstrip("/"))

    @property
    def done(self) -> bool:
        return os.path.exists(os.path.join(self.workdir, "results.json"))

    @property
    def log(self) -> str:
        """The point's log (stdout and stderr of every attempt), kept in its workdir."""
        return os.path.join(self.workdir, "sweep.log")

    def record(self) -> None:
        """Writes ``point.json`` (the overrides and command) that ``tools/collect.py`` reads."""
        os.makedirs(self.workdir, exist_ok=True)
        write_json_atomic(os.path.join(self.workdir, "point.json"),
                          {"index": self.index, "overrides": self.overrides, "args": list(self.args)})


def make_points(experiment: str, config: str, workdir: str, common: dict | None = None) -> list[Point]:
    common = dict(common or {})
    base = apply_overrides(load_config(config), common, from_strings=True) if common else load_config(config)
    points = []
    for i, point in enumerate(load_sweep(config)):
        apply_overrides(base, point)  # fails early on a bad key or value
        overrides = {**common, **point}
        run_dir = os.path.join(workdir, f"{i:03d}")
        flags = [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]
        args = ("-m", f"experiments.{experiment}", "--config", config, *flags, "--workdir", run_dir)
        points.append(Point(i, overrides, run_dir, args))
    return points


def read_point(run_dir: str) -> dict:
    """``point.json`` of a point's workdir ({} when the sweep did not write one)."""
    path = os.path.join(run_dir, "point.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
