"""Anytime networks (TIPS): train a ResNet supernet per sampler and read its anytime curve.

    python -m experiments.anytime --config configs/anytime.py[:PRESETS] --workdir DIR

For each sampler kind of ``samplers`` (uniform: the AnytimeNN baseline; tps: TPS-biased), in DIR/KIND:
1. the same initial ResNet (seed ``seed``) becomes a supernet of every width of ``sampler.widths``
   and every pattern of skipped residual blocks (research/anytime/supernet.py);
2. it trains by the sandwich rule (research/anytime/train.py), resumable from its checkpoints;
3. candidate subnetworks (each width with all, every other, or none of the skippable blocks) are
   evaluated after BatchNorm recalibration on ``eval.calibration_batches`` training batches;
4. at each budget of ``eval.budgets`` (fractions of the largest subnetwork's FLOPs), the candidate
   within it with the best held-out accuracy, and its test accuracy.

Writes to DIR: config.json, results.json, results.md, anytime.png (test accuracy against FLOPs per
sampler, each candidate and the budget curve) and KIND/{tb,checkpoints}.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from research.anytime import sampling, supernet
from research.anytime import train as anytime_train
from research.anytime.benchmark import Anytime
from research.core import cli, experiment, report
from research.core import config as cfg
from research.data import pipeline
from research.data.augment import make_preprocess
from research.models import build_from_config
from research.models.resnet import ResNet


def load_data(exp: Anytime):
    """(train, held-out, test) arrays and preprocess(images, rng, train)."""
    data = exp.data
    train, test = data.splits()
    train, test = train.first(data.train_limit), test.first(data.eval_limit)
    if data.val_size >= len(train):
        raise cfg.ConfigError(f"config key 'data.val_size' = {data.val_size} leaves no training images "
                              f"(there are {len(train)}); choose fewer")
    held_out = train.subset(slice(len(train) - data.val_size, len(train)))
    train = train.first(len(train) - data.val_size)
    return train, held_out, test, make_preprocess(*pipeline.channel_stats(train.images))


def candidates(table: sampling.SubnetTable, model: ResNet, widths) -> list[int]:
    """Each width with all, every other, or none of the skippable blocks computed."""
    free = np.flatnonzero(supernet.skippable(model))
    out = []
    for width in widths:
        for drop in (free[:0], free[1::2], free):
            gates = np.ones(len(model.blocks), np.int32)
            gates[drop] = 0
            out.append(table.index(width, gates))
    return sorted(set(out), key=lambda i: table.flops[i])


def run_sampler(kind: str, exp: Anytime, data, mesh, workdir: str) -> dict:
    train, held_out, test, preprocess = data
    sampler_config = dataclasses.replace(exp.sampler, kind=kind)
    model = build_from_config(exp.model, num_classes=train.num_classes, input_shape=train.images.shape[1:],
                              rngs=nnx.Rngs(exp.seed))
    if not isinstance(model, ResNet):
        raise cfg.ConfigError(f"config key 'model.name' = {exp.model.name!r} is not a ResNet supernet")
    table = sampling.enumerate_subnets(model, train.images.shape[1:3], sampler_config, seed=exp.seed)
    start = time.perf_counter()
    defs, state, train_metrics = anytime_train.fit_supernet(
        model, train, exp, table, sampling.make_sampler(table, sampler_config), preprocess=preprocess, mesh=mesh,
        workdir=os.path.join(workdir, kind), seed=exp.seed, rules=exp.mesh.logical,
        settings={"sampler": dataclasses.asdict(sampler_config)})
    seconds = time.perf_counter() - start
    trained = nnx.merge(defs.eval, state.train.params, state.train.frozen, state.train.rest)
    calibration = [preprocess(jax.numpy.asarray(pipeline.train_batch(train, exp.train.batch_size, exp.seed + 1,
                                                                      i)["images"]), None, False)
                   for i in range(exp.eval.calibration_batches)]
    rows = anytime_train.evaluate_subnets(
        trained, candidates(table, model, sampler_config.widths), table, calibration,
        {"val": (held_out.images, held_out.labels), "test": (test.images, test.labels)}, preprocess,
        exp.eval.batch_size)
    largest = int(table.flops[table.largest])
    curve = anytime_train.anytime_curve(rows, [b * largest for b in exp.eval.budgets])
    return {"train_seconds": seconds, "train_loss": train_metrics.get("train/loss"), "largest_flops": largest,
            "subnetworks": len(table), "candidates": rows, "curve": curve}


def table_md(results: dict) -> str:
    budgets = results["budgets"]
    lines = ["| sampler | train s | " + " | ".join(f"{b:g} x FLOPs" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for kind, block in results["samplers"].items():
        cells = [f"{p['test_accuracy']:.3f} ({p['width']:g}, {sum(p['gates'])} blocks)" if p["flops"] else "-"
                 for p in block["curve"]]
        lines.append(f"| {kind} | {block['train_seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, workdir: str) -> None:
    fig, axes = report.figure(panel=(6, 4))
    ax = axes[0, 0]
    for kind, block in results["samplers"].items():
        rows = block["candidates"]
        line, = ax.plot([p["flops"] / 1e6 for p in block["curve"] if p["flops"]],
                        [p["test_accuracy"] for p in block["curve"] if p["flops"]], marker="o", label=f"{kind}: budget curve")
        ax.scatter([r["flops"] / 1e6 for r in rows], [r["test_accuracy"] for r in rows], s=12, alpha=0.4,
                   color=line.get_color())
    ax.set(xlabel="MFLOPs (multiply-accumulates) per image", ylabel="test accuracy",
           title="anytime supernet: each candidate (dots) and the best per budget")
    ax.legend()
    report.save(fig, os.path.join(workdir, "anytime.png"))


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    exp = cfg.build(Anytime, config)
    data = load_data(exp)  # before the workdir is made: a bad data.val_size writes nothing
    mesh = experiment.start(config, workdir)
    results = {"data": exp.data.name, "model": exp.model.name, "seed": exp.seed,
               "budgets": list(exp.eval.budgets),
               "samplers": {kind: run_sampler(kind, exp, data, mesh, workdir) for kind in exp.samplers},
               "devices": experiment.device_summary(mesh)}
    if experiment.main_process():
        experiment.write_results(workdir, results, table_md(results))
        plot(results, workdir)
        for kind, block in results["samplers"].items():
            accs = ", ".join(f"{p['test_accuracy']:.3f}" if p["flops"] else "-" for p in block["curve"])
            print(f"{kind}: test accuracy at budgets {exp.eval.budgets}: {accs}; trained in {block['train_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    cli.run(main)
