"""The anytime table of a seed sweep (``tools/sweep.py --experiment anytime``): for each sampler,
test accuracy at each FLOPs budget as mean ± sample sd over the runs, the training seconds, and
the difference TPS - uniform in units of the larger sd; then the same difference taken within each
run (both samplers start from the run's seed and initialisation): its mean ± sd and in how many
runs TPS is ahead. With a plot of the curves and their spread.

    python -m tools.anytime_table runs/anytime_seeds            # DIR/anytime_table.md, DIR/anytime_seeds.png

A run is a folder ``DIR/*/`` with the experiment's results.json; every run must have the same budgets.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np


def load(sweep_dir: str) -> tuple[list[float], dict[str, dict[str, np.ndarray]]]:
    """(budgets, {sampler: {"acc": (runs, budgets), "seconds": (runs,), "runs": [run folder]}})."""
    paths = sorted(glob.glob(os.path.join(sweep_dir, "*", "results.json")))
    if not paths:
        raise FileNotFoundError(f"no DIR/*/results.json under {sweep_dir!r}")
    budgets, acc, seconds, names = None, {}, {}, {}
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        if budgets is None:
            budgets = r["budgets"]
        elif r["budgets"] != budgets:
            raise ValueError(f"{path}: budgets {r['budgets']} differ from the first run's {budgets}")
        for name, s in r["samplers"].items():
            acc.setdefault(name, []).append([p["test_accuracy"] for p in s["curve"]])
            seconds.setdefault(name, []).append(s["train_seconds"])
            names.setdefault(name, []).append(os.path.basename(os.path.dirname(path)))
    order = sorted(acc, key=lambda n: (n != "uniform", n))  # the baseline first
    return budgets, {n: {"acc": np.asarray(acc[n]), "seconds": np.asarray(seconds[n]), "runs": names[n]}
                     for n in order}


def sd(x: np.ndarray, axis: int = 0) -> np.ndarray:
    return x.std(axis=axis, ddof=1) if x.shape[axis] > 1 else np.zeros(np.delete(x.shape, axis))


def table(budgets: list[float], runs: dict[str, dict[str, np.ndarray]]) -> str:
    n = min(len(r["seconds"]) for r in runs.values())
    header = "| sampler | " + " | ".join(f"{b:g} x FLOPs" for b in budgets) + " | train s |"
    lines = [f"Test accuracy, mean ± sd over {n} runs", "", header, "|---" * (len(budgets) + 2) + "|"]
    for name, r in runs.items():
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(r["acc"].mean(0), sd(r["acc"]), strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['seconds'].mean():.0f} ± {sd(r['seconds']):.0f} |")
    if {"uniform", "tps"} <= set(runs):
        u, t = runs["uniform"]["acc"], runs["tps"]["acc"]
        diff = t.mean(0) - u.mean(0)
        spread = np.maximum(sd(u), sd(t))
        cells = [f"{d:+.3f} ({d / s:+.1f} sd)" if s > 0 else f"{d:+.3f}" for d, s in zip(diff, spread, strict=True)]
        lines.append("| tps - uniform | " + " | ".join(cells) + " | |")
        row = {n: {r: i for i, r in enumerate(runs[n]["runs"])} for n in ("tps", "uniform")}  # run -> row
        both = [r for r in row["tps"] if r in row["uniform"]]  # runs that trained both samplers
        if both:
            paired = t[[row["tps"][r] for r in both]] - u[[row["uniform"][r] for r in both]]
            cells = [f"{m:+.3f} ± {s:.3f} ({int((col > 0).sum())}/{len(col)} ahead)"
                     for m, s, col in zip(paired.mean(0), sd(paired), paired.T, strict=True)]
            lines.append("| tps - uniform, within each run | " + " | ".join(cells) + " | |")
    return "\n".join(lines) + "\n"


def plot(budgets: list[float], runs: dict[str, dict[str, np.ndarray]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, r in runs.items():
        mean, spread = r["acc"].mean(0), sd(r["acc"])
        ax.plot(budgets, mean, marker="o", label=f"{name} ({len(r['acc'])} runs)")
        ax.fill_between(budgets, mean - spread, mean + spread, alpha=0.2)
    ax.set_xlabel("FLOPs budget (fraction of the largest subnetwork)")
    ax.set_ylabel("test accuracy (mean ± sd)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir")
    args = p.parse_args(argv)
    try:
        budgets, runs = load(args.sweep_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    text = table(budgets, runs)
    with open(os.path.join(args.sweep_dir, "anytime_table.md"), "w") as f:
        f.write(text)
    plot(budgets, runs, os.path.join(args.sweep_dir, "anytime_seeds.png"))
    print(text, end="")
    print(f"plot: {os.path.join(args.sweep_dir, 'anytime_seeds.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
