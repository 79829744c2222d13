"""Predictive multiplicity: explore the Rashomon set of a trained classifier by inference-time
dropout and compare it with re-training and AWP (research/multiplicity).

    python -m experiments.rashomon --config configs/rashomon.py[:PRESETS] --workdir DIR

1. Train the reference model (seed ``seed``) in DIR/reference (resumable).
2. ``dropout``: sample the dropout models of ``rashomon`` and evaluate each on the evaluation points.
3. ``retrain``: train one model per seed of ``retrain_seeds`` in DIR/retrain/seed_S (resumable).
4. ``awp``: adversarial weight perturbation of the reference for the targets of ``awp``.
5. For every method and eps: ambiguity, discrepancy, VPR, score variance, Rashomon capacity, the
   set's size, and the method's seconds per explored model; the mitigations (dropout ensembles and
   model selection) on the dropout sets.

Writes to DIR: config.json, results.json, results.md (the tables), multiplicity.png (each metric
against eps per method) and losses.png (histogram of the sampled models' losses per rate).
"""
from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np
from flax import nnx

from research.core import cli, experiment, report
from research.core import config as cfg
from research.core.records import write_json_atomic
from research.data import pipeline, tabular
from research.data.augment import make_preprocess
from research.models import build_from_config
from research.multiplicity import baselines, metrics, rashomon
from research.multiplicity.benchmark import Multiplicity
from research.recipes.classify import fit_classifier


def load_data(exp: Multiplicity):
    """(train, evaluation points, preprocess(images, rng, train) for training, preprocess(x) for eval)."""
    data = exp.data
    if data.name in tabular.TABULAR_DATASETS:
        train, test = tabular.breast_cancer(seed=exp.seed)
        mean, std = (0.0,), (1.0,)
    else:
        train, test = data.splits()
        mean, std = pipeline.channel_stats(train.images)
    train, test = train.first(data.train_limit), test.first(data.eval_limit)
    preprocess = make_preprocess(mean, std)
    return train, test, preprocess, lambda x: preprocess(x, None, False)


def train_model(exp: Multiplicity, train, test, preprocess, seed: int, workdir: str, mesh) -> tuple[nnx.Module, float]:
    """(eval-mode model trained with ``seed``, seconds of its first training, kept in workdir)."""
    record = os.path.join(workdir, "train_seconds.json")
    start = time.perf_counter()
    model = build_from_config(exp.model, num_classes=train.num_classes, input_shape=train.images.shape[1:],
                              rngs=nnx.Rngs(seed))
    run = fit_classifier(model, train, test, exp, preprocess=preprocess, mesh=mesh, workdir=workdir,
                         seed=seed, rules=exp.mesh.logical)
    seconds = time.perf_counter() - start
    if os.path.exists(record):
        with open(record) as f:
            seconds = json.load(f)["seconds"]
    elif experiment.main_process():
        write_json_atomic(record, {"seconds": seconds, "test_accuracy": run.eval_metrics.get("test/accuracy")})
    return run.model(), seconds


def method_block(model_set, epsilons, labels, reference_pred) -> dict:
    return {"seconds": model_set.seconds, "models_explored": int(model_set.models_explored),
            "seconds_per_model": model_set.seconds_per_model,
            "by_eps": rashomon.metrics_by_eps(model_set.set_probs, labels, reference_pred, epsilons)}


def table(results: dict) -> str:
    lines = []
    for method, block in results["methods"].items():
        lines += [f"### {method} ({block['models_explored']} models explored, "
                  f"{block['seconds_per_model']:.4g} s per model)", "",
                  "| eps | models in set | ambiguity | discrepancy | VPR | score var | capacity | accuracy |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['eps']:g} | {r['num_models']} | {r['ambiguity']:.3f} | {r['discrepancy']:.3f} | "
                  f"{r['vpr']:.3f} | {r['score_variance']:.4f} | {r['rashomon_capacity']:.3f} | {r['accuracy']:.3f} |"
                  for r in block["by_eps"]]
        lines.append("")
    for name, rows in results["mitigation"].items():
        lines += [f"### dropout sets, {name}", "", "| eps | ambiguity | discrepancy | VPR | capacity | accuracy |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['eps']:g} | {r['ambiguity']:.3f} | {r['discrepancy']:.3f} | {r['vpr']:.3f} | "
                  f"{r['rashomon_capacity']:.3f} | {r['accuracy']:.3f} |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, exploration: rashomon.Exploration, retrain_losses, workdir: str) -> None:
    fig, axes = report.figure(len(metrics.METRICS), panel=(4, 3.4))
    for ax, metric in zip(axes[0], metrics.METRICS):
        for method, block in results["methods"].items():
            rows = block["by_eps"]
            ax.plot([r["eps"] for r in rows], [r[metric] for r in rows], marker="o", label=method)
        ax.set(xlabel="eps (loss above the reference)", title=metric)
    axes[0, 0].legend()
    report.save(fig, os.path.join(workdir, "multiplicity.png"))

    fig, axes = report.figure(panel=(6, 3.6))
    ax = axes[0, 0]
    bins = np.linspace(min(exploration.losses.min(), exploration.reference_loss),
                       np.quantile(exploration.losses, 0.98), 40)
    for rate in np.unique(exploration.rates):
        ax.hist(exploration.losses[exploration.rates == rate], bins, alpha=0.5, label=f"dropout p={rate:.3g}")
    ax.axvline(exploration.reference_loss, color="k", label="reference")
    for i, loss in enumerate(retrain_losses):
        ax.axvline(loss, color="tab:red", ls=":", label="re-trained" if i == 0 else None)
    ax.set(xlabel="cross-entropy on the evaluation points", ylabel="models")
    ax.legend(fontsize=7)
    report.save(fig, os.path.join(workdir, "losses.png"))


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    exp = cfg.build(Multiplicity, config)
    mesh = experiment.start(config, workdir)
    rc = exp.rashomon
    train, test, preprocess, eval_preprocess = load_data(exp)

    reference, reference_seconds = train_model(exp, train, test, preprocess, exp.seed,
                                               os.path.join(workdir, "reference"), mesh)
    exploration = rashomon.explore(reference, test.images, test.labels, rc, preprocess=eval_preprocess,
                                   mesh=mesh, progress=exp.progress)
    labels, reference_pred = test.labels, exploration.reference_pred
    dropout = baselines.ModelSet({float(e): exploration.set_probs(e) for e in rc.epsilons}, exploration.losses,
                                 exploration.seconds, len(exploration.losses))
    blocks = {"dropout": method_block(dropout, rc.epsilons, labels, reference_pred)}
    retrain_losses = []
    if "retrain" in exp.methods:
        retrained = baselines.retrained_set(
            lambda s: train_model(exp, train, test, preprocess, s, os.path.join(workdir, "retrain", f"seed_{s}"),
                                  mesh),
            exp.retrain_seeds, test.images, test.labels, exploration.reference_probs, exploration.reference_loss,
            rc.epsilons, preprocess=eval_preprocess, batch_size=rc.batch_size, mesh=mesh)
        blocks["retrain"] = method_block(retrained, rc.epsilons, labels, reference_pred)
        retrain_losses = retrained.losses.tolist()
    if "awp" in exp.methods:
        awp_config = exp.awp
        points = np.arange(awp_config.points or len(test))
        awp = baselines.awp_set(reference, test.images, test.labels, points, exploration.reference_probs,
                                exploration.reference_loss, rc.epsilons, awp_config, preprocess=eval_preprocess,
                                progress=exp.progress)
        blocks["awp"] = method_block(awp, rc.epsilons, labels, reference_pred)

    dropout_per_model = blocks["dropout"]["seconds_per_model"]
    results = {
        "data": exp.data.name, "model": exp.model.name,
        "train_examples": len(train), "evaluation_points": len(test),
        "reference_loss": exploration.reference_loss,
        "reference_accuracy": float(np.mean(reference_pred == labels)),
        "reference_train_seconds": reference_seconds,
        "retrain_losses": retrain_losses,
        "methods": blocks,
        "speedup_per_model": {m: b["seconds_per_model"] / dropout_per_model for m, b in blocks.items() if m != "dropout"},
        "mitigation": rashomon.mitigation_by_eps(exploration, rc),
        "devices": experiment.device_summary(mesh),
    }
    if experiment.main_process():
        experiment.write_results(workdir, results, table(results))
        plot(results, exploration, retrain_losses, workdir)
        speed = ", ".join(f"{m} {v:.0f}x" for m, v in results["speedup_per_model"].items())
        print(f"reference accuracy {results['reference_accuracy']:.3f}; dropout "
              f"{dropout_per_model * 1e3:.2f} ms per model; slower per model than dropout: {speed or '-'}")
    return results


if __name__ == "__main__":
    cli.run(main)
