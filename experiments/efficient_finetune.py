"""Pre-train on one half of a data set, then fine-tune the last layers on the other half with exact
backprop, gradient filtering (conv) or LBP-WHT (ViT linear layers), and compare.

    python -m experiments.efficient_finetune --config configs/efficient_finetune.py[:PRESETS] --workdir DIR

Writes to DIR: config.json, pretrain/ (TensorBoard, checkpoints; ``pretrain.workdir`` points elsewhere
to share one pre-training between runs), finetune/VARIANT/ (the same per variant, and variant.json
once it is finished), results.json (per variant: test_acc, backward_flops, activation_bytes,
backward_seconds_per_step, ...), results.md (the table) and tradeoff.png (accuracy against backward
FLOPs and time). Every stage resumes from its checkpoints; a rerun reuses a finished variant unless
a setting that shapes it changed.
"""
from __future__ import annotations

import dataclasses
import os
import time

import ml_collections
from flax import nnx

from research.backprop.apply import (enable_gradient_filter, enable_lbp_wht, layer_params_filter,
                                     select_layers, trace_layers)
from research.backprop.cost import finetune_backward_cost
from research.backprop.finetune import EfficientFinetune, layer_kind
from research.backprop.measure import backward_profile
from research.core import cli, experiment, report
from research.core import config as cfg
from research.core.mesh import shard_batch
from research.core.records import read_signed, write_signed
from research.core.train import classification_loss
from research.data import pipeline
from research.data.augment import make_preprocess
from research.models import COMPUTE_DTYPES, build_from_config
from research.recipes.classify import fit_classifier


def finetuned_layers(model: nnx.Module, input_shape, exp: EfficientFinetune):
    """The conv (CNN) or token-linear (ViT) layers that fine-tuning trains, in execution order."""
    calls = trace_layers(model, input_shape)
    kind = layer_kind(exp.model.name)
    if exp.finetune.unit == "blocks":
        num_blocks = len(model.blocks)
        if exp.finetune.last_n > num_blocks:
            raise cfg.ConfigError(f"finetune.last_n: {exp.model.name} has {num_blocks} blocks, "
                                  f"got {exp.finetune.last_n}")
        ids = range(num_blocks - exp.finetune.last_n, num_blocks)
        return select_layers(calls, kind, pattern="^blocks/(" + "|".join(map(str, ids)) + ")/")
    return select_layers(calls, kind, pattern="^blocks/" if kind == "linear" else "", last_n=exp.finetune.last_n)


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    exp = cfg.build(EfficientFinetune, config)
    mesh = experiment.start(config, workdir)
    rules = exp.mesh.logical

    data = exp.data
    (pre_train, pre_test), (fine_train, fine_test) = pipeline.split_halves(*data.splits(), data.split, exp.seed)
    pre_train, fine_train = pre_train.first(data.train_limit), fine_train.first(data.train_limit)
    mean, std = pipeline.channel_stats(pre_train.images)  # the backbone's normalisation, kept for fine-tuning
    dtype = COMPUTE_DTYPES[exp.model.dtype]
    preprocess = make_preprocess(mean, std, data.crop_padding, data.flip, dtype)
    input_shape = pre_train.images.shape[1:]

    def new_model(seed: int, num_classes: int) -> nnx.Module:
        return build_from_config(exp.model, num_classes=num_classes, input_shape=input_shape, rngs=nnx.Rngs(seed))

    # Stage 1: pre-train the whole network on the first half (or reuse a finished pre-training).
    t0 = time.perf_counter()
    pretrain_dir = exp.pretrain.workdir or os.path.join(workdir, "pretrain")
    pre = fit_classifier(new_model(exp.seed, pre_train.num_classes), pre_train, pre_test, exp.pretrain,
                         preprocess=preprocess, mesh=mesh, workdir=pretrain_dir, seed=exp.seed, rules=rules)
    pretrained = nnx.state(pre.model())
    results = {"pretrain": {"test_acc": pre.eval_metrics.get("test/accuracy"), "steps": int(pre.state.step),
                            "seconds": time.perf_counter() - t0, "train_examples": len(pre_train),
                            "classes": list(pre_train.label_names)}}

    # Stage 2: the same fine-tuning per variant, from the same weights. A new task (other classes)
    # gets a freshly initialised head; a new sample of the same classes keeps the pre-trained one.
    if data.split == "classes":
        pretrained = pretrained.filter(nnx.Not(lambda path, value: "head" in path))
    measure_batch = pipeline.train_batch(fine_train, exp.finetune.train.batch_size, exp.seed, 0)
    # A finished variant is reused only if everything that shapes it is unchanged (not its timing:
    # a rerun keeps the backward time it measured).
    signature = dataclasses.asdict(exp)
    signature["finetune"].pop("variants")
    for stage in ("pretrain", "finetune"):
        signature[stage]["train"].pop("progress")
    variant_results = {}
    layer_paths = []
    for name, method, setting in exp.variants:
        record = os.path.join(workdir, "finetune", name, "variant.json")
        saved = read_signed(record, signature)
        if saved is not None:
            variant_results[name], layer_paths = saved["result"], saved["layers"]
            print(f"{name}: reusing {record}")
            continue
        model = new_model(exp.seed + 1, fine_train.num_classes)
        nnx.update(model, pretrained)
        layers = finetuned_layers(model, input_shape, exp)
        layer_paths = [c.path for c in layers]
        if method == "filter":
            enable_gradient_filter(model, layers, setting)
        elif method == "lbp":
            enable_lbp_wht(model, layers, setting)
        trained = [] if method == "head_only" else layers
        t0 = time.perf_counter()
        run = fit_classifier(model, fine_train, fine_test, exp.finetune, preprocess=preprocess, mesh=mesh,
                             workdir=os.path.join(workdir, "finetune", name), trainable=layer_params_filter(trained),
                             train_mode=False, seed=exp.seed, rules=rules)
        seconds = time.perf_counter() - t0
        profile = _profile_backward(run, preprocess, measure_batch, mesh, exp.measure.repeats)
        analytic = finetune_backward_cost(trained, batch=exp.finetune.train.batch_size,
                                          patch_size=setting if method == "filter" else None,
                                          lbp_k=setting if method == "lbp" else None)
        variant_results[name] = {
            "test_acc": run.eval_metrics.get("test/accuracy"),
            "train_loss": run.train_metrics.get("train/loss"),
            "backward_flops": profile["flops"],
            "analytic_backward_flops": analytic["flops"],
            "activation_bytes": analytic["activation_bytes"],
            "residual_bytes": profile["residual_bytes"],
            "backward_seconds_per_step": profile["seconds"],
            "train_seconds": seconds,
            "trainable_params": run.num_trainable,
        }
        if experiment.main_process():
            write_signed(record, signature, {"result": variant_results[name], "layers": layer_paths})
        print(f"{name}: test accuracy {variant_results[name]['test_acc']:.4f}, backward "
              f"{1e3 * profile['seconds']:.1f} ms/step, {profile['flops'] / 1e6:.1f} MFLOPs")

    results.update({
        "variants": variant_results,
        "finetuned_layers": layer_paths,
        "model": exp.model.name,
        "data": data.name,
        "split": data.split,
        "finetune_examples": len(fine_train),
        "test_examples": len(fine_test),
        "measure_batch_size": exp.finetune.train.batch_size,
        "wall_time_s": experiment.wall_time_s(workdir),
        "devices": experiment.device_summary(mesh),
    })
    if experiment.main_process():
        table = results_table(results)
        experiment.write_results(workdir, results, table)
        plot_tradeoff(results, os.path.join(workdir, "tradeoff.png"))
        print(table)
    return results


def _profile_backward(run, preprocess, batch, mesh, repeats: int) -> dict:
    """Backward time, XLA FLOPs and residuals of one fine-tuning step's loss on ``batch``."""
    _, eval_loss = classification_loss(preprocess)  # no augmentation: the same input for every variant
    state = run.state
    batch = shard_batch(batch, mesh)

    def loss(params, batch):
        model = nnx.merge(run.defs.train, params, state.frozen, state.rest)
        return eval_loss(model, batch, state.rng)[0]
    return backward_profile(loss, state.params, batch, repeats=repeats)


def results_table(results: dict) -> str:
    exact = results["variants"].get("vanilla")
    lines = [f"{results['model']} on {results['data']} ({results['split']} split), fine-tuned layers: "
             f"{', '.join(results['finetuned_layers'])}", "",
             "| variant | test acc | backward MFLOPs (XLA) | analytic MFLOPs | saved layer inputs KB | "
             "backward ms/step | speed-up vs vanilla | trainable params |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["variants"].items():
        speedup = exact["backward_seconds_per_step"] / r["backward_seconds_per_step"] if exact else float("nan")
        lines.append(f"| {name} | {100 * r['test_acc']:.2f} | {r['backward_flops'] / 1e6:,.1f} | "
                     f"{r['analytic_backward_flops'] / 1e6:,.1f} | {r['activation_bytes'] / 1024:,.0f} | "
                     f"{1e3 * r['backward_seconds_per_step']:.2f} | {speedup:.1f}x | {r['trainable_params']:,} |")
    return "\n".join(lines)


def plot_tradeoff(results: dict, path: str) -> None:
    names = list(results["variants"])
    acc = [100 * results["variants"][n]["test_acc"] for n in names]
    fig, axes = report.figure(2, panel=(5, 4))
    for ax, key, label in ((axes[0, 0], "backward_flops", "backward FLOPs per step (XLA)"),
                           (axes[0, 1], "backward_seconds_per_step", "backward seconds per step")):
        xs = [results["variants"][n][key] for n in names]
        ax.scatter(xs, acc)
        for x, y, n in zip(xs, acc, names, strict=True):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['model']} fine-tuned on {results['data']} ({results['split']} split)")
    report.save(fig, path, dpi=120)


if __name__ == "__main__":
    cli.run(main)
