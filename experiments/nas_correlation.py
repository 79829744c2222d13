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
from research.nas.benchmark import DATASETS, ground_truth_path, load_ground_truth, naslib_cell, proxy_batch

NASLIB_STORED = ("flops", "params", "synflow", "grasp", "fisher", "grad_norm", "snip", "jacov", "nwot")


def validate(config: ml_collections.ConfigDict) -> list[str]:
    cfg.check_choice(config, "dataset", DATASETS)
    cfg.check_choice(config, "mode", ("exact", "masked"))
    cfg.check(config, "num_cells", lambda n: n >= 0, "an integer >= 0 (0 = all)")
    cfg.check(config, "chunk", lambda n: n >= 1, "an integer >= 1")
    cfg.check(config, "data.num_images", lambda n: n >= 1, "an integer >= 1")
    names = cfg.check_names(config, "proxies", proxies.PROXY_NAMES)
    need = max(proxies.get(n).batch_size for n in names)
    if config.data.num_images < need:
        raise cfg.ConfigError(f"data.num_images={config.data.num_images}: the proxies chosen read "
                              f"up to {need} images; allowed: >= {need}")
    return names


def score_exact(config, names, cells, batch, done: dict, save, bar) -> None:
    """One network per cell, run op by op: each NB201 operation compiles once per shape and is
    reused by every cell (``research.models.compiled.run_compiled``), where compiling a whole
    program per cell would cost more than running it."""
    _, classes = DATASETS[config.dataset]
    key = jax.random.key(config.seed)
    for k in cells:
        todo = [n for n in names if n not in done.get(k, {})]
        if not todo:
            continue
        model = nb201.NB201Network(naslib_cell(k), num_classes=classes, C=config.width,
                                   N=config.cells_per_stage, rngs=nnx.Rngs(config.seed))
        for name in todo:
            start = time.perf_counter()
            value = float(proxies.score(name, model, batch, key, jit=False))
            done.setdefault(k, {})[name] = {"value": value, "seconds": time.perf_counter() - start}
        save()
        bar.update(1)


def score_masked(config, names, cells, batch, done: dict, save, bar) -> None:
    """The masked super-network: one compilation per proxy, ``chunk`` cells per vmapped call."""
    _, classes = DATASETS[config.dataset]
    model = nb201.NB201Network(None, num_classes=classes, C=config.width, N=config.cells_per_stage,
                               rngs=nnx.Rngs(config.seed))
    for name in names:
        todo = [k for k in cells if name not in done.get(k, {})]
        if not todo:
            continue
        start = time.perf_counter()
        values = scoring.score_cells(name, model, [naslib_cell(k) for k in todo], batch,
                                     jax.random.key(config.seed), chunk=config.chunk)
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
    names = validate(config)
    cells = load_ground_truth(ground_truth_path(config.ground_truth, config.data.data_dir), config.dataset,
                              config.num_cells, config.seed)
    batch = proxy_batch(config.dataset, config.data.num_images, config.data.seed, source=config.data.source,
                        data_dir=config.data.data_dir or None)
    experiment.start(config, workdir)
    # Scores are reusable only under the same protocol (seed, images, network size).
    signature = {k: config[k] for k in ("seed", "dataset", "width", "cells_per_stage")}
    signature["data"] = config.data.to_dict()
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
    print(f"{len(cells)} NB201 cells ({config.dataset}), proxies: {', '.join(names)}; "
          f"{config.mode} mode; {scored} already scored", flush=True)
    # A seeded random order: the cells an interrupted run has scored are a uniform sample.
    order = [str(k) for k in np.random.default_rng(config.seed).permutation(list(cells))]
    with tqdm(total=len(cells), initial=scored, disable=not config.progress, desc="cells") as bar:
        (score_exact if config.mode == "exact" else score_masked)(config, names, order, batch, done,
                                                                   save, bar)
    accuracy = np.array([cells[k]["val_accuracy"] for k in cells])
    table = {n: np.array([done[k][n]["value"] for k in cells]) for n in names}
    summary = {"dataset": config.dataset, "n_cells": len(cells), "mode": config.mode,
               "spearman": {}, "kendall": {}, "seconds_per_cell": {},
               "naslib_stored": {"spearman": {}, "kendall": {}}}
    for n in names:
        summary["spearman"][n], summary["kendall"][n] = correlations(table[n], accuracy)
        summary["seconds_per_cell"][n] = float(np.median([done[k][n]["seconds"] for k in cells]))
    for n in NASLIB_STORED:
        stored = np.array([cells[k][n]["score"] for k in cells])
        rho, tau = correlations(stored, accuracy)
        summary["naslib_stored"]["spearman"][n], summary["naslib_stored"]["kendall"][n] = rho, tau
    lines = [f"{len(cells)} NB201 cells, {config.dataset}; {config.mode} mode", "",
             "| proxy | Spearman | Kendall | s / cell |", "|---|---|---|---|"]
    for n in sorted(names, key=lambda n: -np.nan_to_num(summary["spearman"][n], nan=-9)):
        lines.append(f"| {n} | {summary['spearman'][n]:.3f} | {summary['kendall'][n]:.3f} | "
                     f"{summary['seconds_per_cell'][n]:.2f} |")
    if experiment.main_process():
        experiment.write_results(workdir, summary, "\n".join(lines))
        plot(workdir, names, table, accuracy, summary)
    print("\n".join(lines), flush=True)
    return summary


if __name__ == "__main__":
    cli.run(main, default_workdir="runs/nas_correlation")
