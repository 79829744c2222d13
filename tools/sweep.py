"""Runs the sweep a config file declares (`get_sweep(arg)`), one run per point.

    python -m tools.sweep --experiment train_classifier --config configs/train_classifier.py:smoke --workdir runs/sweep
    python -m tools.sweep ... --print_commands | xargs -P 2 -I{} sh -c {}      # or hand them to a cluster queue

Each point runs as `python -m experiments.NAME --config ... --config.key=value --workdir DIR/NNN`;
points are checked against the config before anything runs, and a point whose results.json
exists is skipped, so an interrupted sweep is resumed by running the same command again.
``python -m tools.sweep_stats DIR KEY...`` then gives the mean and spread of any result.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

from research.core.config import ConfigError, apply_overrides, load_config, load_sweep


def commands(experiment: str, config: str, workdir: str) -> list[tuple[str, list[str]]]:
    base = load_config(config)
    out = []
    for i, point in enumerate(load_sweep(config)):
        apply_overrides(base, point)  # fails early on a bad key or value
        run_dir = os.path.join(workdir, f"{i:03d}")
        flags = [f"--config.{k}={v}" for k, v in point.items()]
        out.append((run_dir, [sys.executable, "-m", f"experiments.{experiment}", "--config", config, *flags, "--workdir", run_dir]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--print_commands", action="store_true", help="print one shell command per point and exit")
    args = parser.parse_args()
    try:
        runs = commands(args.experiment, args.config, args.workdir)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.print_commands:
        for _, cmd in runs:
            print(shlex.join(cmd))
        return
    summary = []
    for run_dir, cmd in runs:
        results = os.path.join(run_dir, "results.json")
        if not os.path.exists(results):
            print("running:", shlex.join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True)
        with open(results) as f:
            summary.append({"workdir": run_dir, "overrides": cmd[5:-2], **json.load(f)})
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "sweep.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for row in summary:
        accuracy = f"test_accuracy={row['test_accuracy']} " if "test_accuracy" in row else ""
        print(f"{row['workdir']}: {accuracy}{' '.join(row['overrides'])}")


if __name__ == "__main__":
    main()
