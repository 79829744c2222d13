"""Zero-shot NAS under a budget: evolutionary search against random search at equal cost.

    python -m experiments.zero_shot_search --config configs/zero_shot_search.py[:smoke|:mobilenet] --workdir DIR

Every candidate's network is built from one seed and scored by one proxy on one fixed batch of
CIFAR training images (as in ``experiments.nas_correlation``). Evolution (``research.nas.search``)
runs first; random search then scores as many distinct candidates as evolution did. For NB201 the
found cells are looked up in the ground-truth file (``val_accuracy`` of NB201's full training);
with ``candidates=file`` the search only visits cells the file holds, so each has an accuracy, and
``oracle`` is the file's most accurate cell within the budget (flops and params budgets).

WORKDIR receives config.json, results.json (per method: best candidate, score, cost, seconds,
evaluations, val_accuracy or null, history of (evaluations, best score)), results.md and
search.png (best score against proxy evaluations).
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from research.core import cli, experiment, report
from research.core import config as cfg
from research.data import sources
from research.nas import search
from research.nas.benchmark import DATASETS, ZeroShotSearch, ground_truth_path, load_ground_truth, naslib_cell
from research.nas.macro_space import MobileNetSpace

METHODS = ("evolution", "random")


def accuracies(exp: ZeroShotSearch) -> dict:
    """{cell: val_accuracy} of the ground-truth file for ``dataset``; {} when the file is absent
    and not needed (``candidates=all``)."""
    try:
        cells = load_ground_truth(ground_truth_path(exp.ground_truth, exp.data.data_dir), exp.dataset)
    except sources.DataSourceError:
        if exp.candidates == "file":
            raise
        return {}
    return {naslib_cell(k): float(v["val_accuracy"]) for k, v in cells.items()}


def make_space(exp: ZeroShotSearch, accuracy: dict):
    _, classes = DATASETS[exp.dataset]
    latency = {"latency_batch": exp.latency_batch, "latency_runs": exp.latency_runs}
    if exp.space == "mobilenet":
        return MobileNetSpace(width_multiplier=exp.width_multiplier, num_classes=classes,
                              **latency)
    cells = sorted(accuracy) if exp.candidates == "file" else None
    return search.NB201Space(C=exp.width, N=exp.cells_per_stage, num_classes=classes,
                             cells=cells, **latency)


def oracle(exp: ZeroShotSearch, space, accuracy: dict) -> dict | None:
    """The most accurate file cell within the budget (NB201, flops and params budgets)."""
    if exp.space != "nb201" or exp.budget_kind == "latency" or not accuracy:
        return None
    feasible = [c for c in accuracy if space.cost(c, exp.budget_kind) <= exp.budget]
    if not feasible:
        return None
    best = max(feasible, key=lambda c: (accuracy[c], c))
    return {"best": space.describe(best), "cost": space.cost(best, exp.budget_kind),
            "val_accuracy": accuracy[best], "feasible_cells": len(feasible)}


def row(space, result: search.SearchResult, accuracy: dict) -> dict:
    """One method's record; ``val_accuracy`` is None where the file lacks the cell (or for a
    space without ground truth)."""
    return {"best": space.describe(result.best), "candidate": result.best,
            "score": result.score, "cost": result.cost, "seconds": result.seconds,
            "evaluations": result.evaluations, "steps": result.steps, "rejected": result.rejected,
            "val_accuracy": accuracy.get(result.best), "history": result.history}


def table(summary: dict) -> list[str]:
    unit = search.UNITS[summary["budget_kind"]]
    lines = [f"{summary['space']} space, {summary['dataset']}, proxy {summary['proxy']}, "
             f"{summary['budget_kind']} <= {summary['budget']:g} {unit}", "",
             f"| budget ({unit}) | proxy | method | best | cost | score | val acc (%) "
             "| evaluations | seconds |", "|---|---|---|---|---|---|---|---|---|"]

    def acc(v):
        return "-" if v is None else f"{v:.2f}"

    def code(text):  # NB201 strings hold "|", which would split a table cell
        return "`" + text.replace("|", "\\|") + "`"

    for method, r in summary["methods"].items():
        lines.append(f"| {summary['budget']:g} | {summary['proxy']} | {method} | "
                     f"{code(r['best'])} | {r['cost']:.3g} | {r['score']:.4g} | "
                     f"{acc(r['val_accuracy'])} | {r['evaluations']} | {r['seconds']:.1f} |")
    if summary["oracle"]:
        o = summary["oracle"]
        lines.append(f"| {summary['budget']:g} | - | oracle (best of {o['feasible_cells']} file "
                     f"cells) | {code(o['best'])} | {o['cost']:.3g} | - | {acc(o['val_accuracy'])} "
                     "| - | - |")
    return lines


def plot(workdir: str, summary: dict) -> None:
    fig, axes = report.figure(panel=(5, 3.4))
    ax = axes[0, 0]
    for (method, r), style in zip(summary["methods"].items(), ("-", "--")):
        steps = np.array(r["history"], np.float64).reshape(-1, 2)
        ax.step(steps[:, 0], steps[:, 1], style, where="post", label=method)  # dashed: overlaps
    ax.set_xlabel("proxy evaluations")
    ax.set_ylabel(f"best {summary['proxy']} so far")
    ax.set_title(f"{summary['space']}, {summary['budget_kind']} <= {summary['budget']:g} "
                 f"{search.UNITS[summary['budget_kind']]}", fontsize=9)
    ax.legend()
    report.save(fig, os.path.join(workdir, "search.png"))


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    exp = cfg.build(ZeroShotSearch, config)
    accuracy = accuracies(exp) if exp.space == "nb201" else {}
    space = make_space(exp, accuracy)
    try:  # an impossible budget fails here, before any data is read
        first, _ = search.sample_feasible(space, np.random.default_rng(exp.seed),
                                          exp.budget_kind, exp.budget)
    except search.BudgetError as e:
        raise cfg.ConfigError(f"config key 'budget' = {exp.budget!r}: {e}") from None
    batch = exp.data.batch(exp.dataset, exp.num_images)
    experiment.start(config, workdir)
    _, classes = DATASETS[exp.dataset]
    score = search.proxy_scorer(space, exp.proxy, batch, classes, exp.seed, jit=exp.jit)
    common = {"kind": exp.budget_kind, "budget": exp.budget, "seed": exp.seed,
              "progress": exp.progress}
    listed = f" ({len(space.cells)} file cells)" if getattr(space, "cells", None) else ""
    print(f"{exp.space} space{listed}, {exp.budget_kind} <= {exp.budget:g} "
          f"{search.UNITS[exp.budget_kind]}, proxy {exp.proxy}", flush=True)
    # One untimed evaluation first: run op by op, a proxy compiles each new primitive on first use,
    # and that one-off cost would otherwise be charged to whichever method runs first.
    score(first)
    evolution = search.evolution_search(space, score, population=exp.population,
                                        steps=exp.steps, **common)
    random = search.random_search(space, score, evaluations=evolution.evaluations, **common)
    summary = {k: getattr(exp, k) for k in ("space", "proxy", "dataset", "budget_kind", "budget", "population",
                                            "steps", "seed")}
    summary["units"] = search.UNITS[exp.budget_kind]
    summary["methods"] = {"evolution": row(space, evolution, accuracy),
                          "random": row(space, random, accuracy)}
    summary["oracle"] = oracle(exp, space, accuracy)
    lines = table(summary)
    if experiment.main_process():
        experiment.write_results(workdir, summary, "\n".join(lines))
        plot(workdir, summary)
    print("\n".join(lines), flush=True)
    return summary


if __name__ == "__main__":
    cli.run(main)
