"""Zero-cost NAS proxies against NAS-Bench-201's trained accuracies.

    python -m experiments.nas_correlation --config configs/nas_correlation.py[:cifar100|:smoke] --workdir DIR

For each cell of the ground-truth file: build the NB201 network (one seed for all cells), score it
with every proxy on the same fixed batch of CIFAR training images, and record the seconds each
proxy took. Then rank-correlate each proxy with the file's ``val_accuracy``.
WORKDIR receives scores.json (per cell, resumable; cells are scored in a seeded random order, so
an interrupted run holds a uniform sample), results.json (``spearman`` and ``kendall`` keyed by
proxy, ``n_cells``, ``seconds_per_cell`` per proxy, and the same correlations of the values NASLib
stored in the file, for reference), results.md and correlation.png.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx
from scipy import stats
from tqdm import tqdm

from research.core import cli, experiment, report
from research.core import config as cfg
from research.core.records import write_json_atomic
from research.nas import nb201, proxies, scoring
from research.nas.benchmark import DATASETS, NASCorrelation, ground_truth_path, load_ground_truth, naslib_cell

NASLIB_STORED = ("flops", "params", "synflow", "grasp", "fisher", "grad_norm", "snip", "jacov", "nwot")


def score_exact(exp: NASCorrelation, names, cells, batch, done: dict, save, bar) -> None:
    """One network per cell, run op by op: each NB201 operation compiles once per shape and is
    reused by every cell (``research.models.compiled.run_compiled``), where compiling a whole
    program per cell would cost more than running it."""
    _, classes = DATASETS[exp.dataset]
    key = jax.random.key(exp.seed)
    for k in cells:
        todo = [n for n in names if n not in done.get(k, {})]
        if not todo:
            continue
        model = nb201.NB201Network(naslib_cell(k), num_classes=classes, C=exp.width,
                                   N=exp.cells_per_stage, rngs=nnx.Rngs(exp.seed))
        for name in todo:
            start = time.perf_counter()
            value = float(proxies.score(name, model, batch, key, jit=False))
            done.setdefault(k, {})[name] = {"value": value, "seconds": time.perf_counter() - start}
        save()
        bar.update(1)


def score_masked(exp: NASCorrelation, names, cells, batch, done: dict, save, bar) -> None:
    """The masked super-network: one compilation per proxy, ``chunk`` cells per vmapped call."""
    _, classes = DATASETS[exp.dataset]
    model = nb201.NB201Network(None, num_classes=classes, C=exp.width, N=exp.cells_per_stage,
                               rngs=nnx.Rngs(exp.seed))
    for name in names:
        todo = [k for k in cells if name not in done.get(k, {})]
        if not todo:
            continue
        start = time.perf_counter()
        values = scoring.score_cells(name, model, [naslib_cell(k) for k in todo], batch,
                                     jax.random.key(exp.seed), chunk=exp.chunk)
        seconds = (time.perf_counter() - start) / len(todo)  # compilation included, amortised
        for k, v in zip(todo, values):
            done.setdefault(k, {})[name] = {"value": float(v), "seconds": seconds}
        save()
        bar.update(len(todo) / len(names))


def correlations(values: np.ndarray, accuracy: np.ndarray) -> tuple[float, float]:
    ok = np.isfinite(values)
    if ok.sum() < 3 or np.ptp(values[ok]) == 0:
        return float("nan"), float("nan")
    return (float(stats.spearmanr(values[ok], accuracy[ok])[0]),
            float(stats.kendalltau(values[ok], accuracy[ok])[0]))


def plot(workdir: str, names, table: dict, accuracy: np.ndarray, summary: dict) -> None:
    cols = min(4, len(names))
    fig, axes = report.figure(cols, -(-len(names) // cols), panel=(3.2, 2.8))
    for ax, name in zip(axes.ravel(), names):
        ax.scatter(table[name], accuracy, s=6, alpha=0.6)
        ax.set_title(f"{name}  rho={summary['spearman'][name]:.2f}", fontsize=9)
        ax.set_xlabel("proxy", fontsize=8)
        ax.set_ylabel("NB201 accuracy (%)", fontsize=8)
        values = np.asarray(table[name])
        # Sizes, and any positive proxy spanning over two decades, read better on a log axis.
        if np.all(values > 0) and (name in ("params", "flops") or values.max() > 100 * values.min()):
            ax.set_xscale("log")
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    report.save(fig, os.path.join(workdir, "correlation.png"))


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    exp = cfg.build(NASCorrelation, config)
    names = list(exp.proxies)
    cells = load_ground_truth(ground_truth_path(exp.ground_truth, exp.data.data_dir), exp.dataset, exp.num_cells,
                              exp.seed)
    batch = exp.data.batch(exp.dataset, exp.data.num_images)
    experiment.start(config, workdir)
    # Scores are reusable only under the same protocol (seed, images, network size).
    settings = dataclasses.asdict(exp)
    signature = {k: settings[k] for k in ("seed", "dataset", "width", "cells_per_stage", "data")}
    path = os.path.join(workdir, "scores.json")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("signature") == signature:
            done = saved["cells"]

    def save():
        if experiment.main_process():
            write_json_atomic(path, {"signature": signature, "cells": done})

    scored = sum(all(n in done.get(k, {}) for n in names) for k in cells)
    print(f"{len(cells)} NB201 cells ({exp.dataset}), proxies: {', '.join(names)}; "
          f"{exp.mode} mode; {scored} already scored", flush=True)
    # A seeded random order: the cells an interrupted run has scored are a uniform sample.
    order = [str(k) for k in np.random.default_rng(exp.seed).permutation(list(cells))]
    with tqdm(total=len(cells), initial=scored, disable=not exp.progress, desc="cells") as bar:
        (score_exact if exp.mode == "exact" else score_masked)(exp, names, order, batch, done,
                                                                   save, bar)
    accuracy = np.array([cells[k]["val_accuracy"] for k in cells])
    table = {n: np.array([done[k][n]["value"] for k in cells]) for n in names}
    summary = {"dataset": exp.dataset, "n_cells": len(cells), "mode": exp.mode,
               "spearman": {}, "kendall": {}, "seconds_per_cell": {},
               "naslib_stored": {"spearman": {}, "kendall": {}}}
    for n in names:
        summary["spearman"][n], summary["kendall"][n] = correlations(table[n], accuracy)
        summary["seconds_per_cell"][n] = float(np.median([done[k][n]["seconds"] for k in cells]))
    for n in NASLIB_STORED:
        stored = np.array([cells[k][n]["score"] for k in cells])
        rho, tau = correlations(stored, accuracy)
        summary["naslib_stored"]["spearman"][n], summary["naslib_stored"]["kendall"][n] = rho, tau
    ranked = sorted(names, key=lambda n: -np.nan_to_num(summary["spearman"][n], nan=-9))
    lines = [f"{len(cells)} NB201 cells, {exp.dataset}; {exp.mode} mode", "",
             *report.table(["proxy", "Spearman", "Kendall", "s / cell"],
                           [[n, f"{summary['spearman'][n]:.3f}", f"{summary['kendall'][n]:.3f}",
                             f"{summary['seconds_per_cell'][n]:.2f}"] for n in ranked])]
    if experiment.main_process():
        experiment.write_results(workdir, summary, "\n".join(lines))
        plot(workdir, names, table, accuracy, summary)
    print("\n".join(lines), flush=True)
    return summary


if __name__ == "__main__":
    cli.run(main)
