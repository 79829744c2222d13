"""One pass over a task-free class-incremental stream with Online-LoRA and the baselines, from the same
pre-trained backbone (see configs/online_lora.py for the presets).

    python -m experiments.online_lora --config configs/online_lora.py[:PRESETS] --workdir DIR

Every method starts from the same backbone with the same fresh classifier head and sees the same
batches; none is told where tasks change. After each task segment (and ``eval.points_per_task``
times inside it) the run measures the accuracy on every task's test classes. From the accuracies
a_{e,j} (evaluation e, task j) at the T task ends:

    avg_acc    = (1/T) sum_j a_{T,j}                                        (final average accuracy)
    forgetting = (1/(T-1)) sum_{j<T} max_{l<T} a_{l,j} - a_{T,j}            (Chaudhry et al., ECCV 2018)

a_{e,j} is class-incremental (the argmax over every class); the same figures are also given
task-incremental (``*_task_il``: task j's test images scored over task j's classes only), which
separates forgetting of the features from a head biased toward the newest classes, and ``ncm_acc``
is the final features' nearest-class-mean accuracy (cosine, class means of every training image):
a bound on what a head calibrated across tasks could read from them. With ``eval.auc_every`` N > 0
(the Si-Blurry protocol uses 1,000) the accuracy on the classes seen so far, logits restricted to
them, every N images and at the end gives A_auc (the mean) and A_last (the last). Batches end at
every task boundary, so a task-end evaluation has seen no image of the next task. ``ncm_backbone`` is
the nearest-class-mean accuracy of the pre-trained features before any training.

Methods: ``online_lora`` (the configured hard buffer, by default the paper's 4 samples),
``online_lora_batches`` (the same with the official code's buffer of whole batches), ``lora``,
``sequential_ft``, ``online_ewc`` and ``er``. With ``select.lrs`` each method's Adam lr is first chosen
on a slice of the training images held out from a selection pass, and Online-LoRA's plateau
thresholds are calibrated on that pass's loss trace (``choose_settings``); the test split is not used.

Writes to DIR: config.json, pretrain/ (the backbone's training, when it is trained here), METHOD/tb
(TensorBoard: losses, plateaus, accuracies), methods/METHOD.json (a finished method; a rerun with the
same config skips it), select/ (the selection passes, METHOD_lrLR.json), results.json (per method:
avg_acc, forgetting, n_plateaus, seconds, the accuracy matrix and curve, the loss trace; and the
selection), results.md (the table) and accuracy.png (average accuracy over the
tasks seen so far, along the stream). ``seconds`` is the training time of the pass without its first
step (compilation) and without the evaluations.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from research.adapters.online_baselines import OnlineFinetune
from research.adapters.online_lora import OnlineLoRA, calibrate_plateau_thresholds
from research.adapters.online_stream import (LABELS, OnlineLearning, is_online_lora, lr_key, ncm_task_accuracies,
                                             one_pass)
from research.adapters.selection import best_lr
from research.core import cli, experiment, report
from research.core import config as cfg
from research.core.records import read_signed, write_npy_atomic, write_signed
from research.data import pipeline, sources, streams
from research.data.augment import make_preprocess, normalize, resize
from research.models import COMPUTE_DTYPES, build_from_config
from research.models import efficientnet_lite as effnet
from research.recipes.classify import fit_classifier


# ---------------------------------------------------------------------------------------------- data

def stream_data(exp: OnlineLearning) -> tuple[pipeline.ImageArrays, pipeline.ImageArrays]:
    train, test = exp.data.splits()
    return (pipeline.per_class(train, exp.data.train_per_class, exp.seed),
            pipeline.per_class(test, exp.data.test_per_class, exp.seed))


# ------------------------------------------------------------------------------------------ backbone

@dataclasses.dataclass
class Backbone:
    """new_model() -> a model with the pre-trained backbone and a fresh head (the same weights at every
    call); preprocess(images) -> its inputs; info for the record; encode: None, or (uint8 images) ->
    the frozen prefix's features, which then stand in for the images (``backbone.frozen_blocks``)."""
    new_model: Callable[[], nnx.Module]
    preprocess: Callable
    info: dict
    encode: Callable[[np.ndarray], np.ndarray] | None = None


def make_backbone(exp: OnlineLearning, mesh, workdir: str, num_classes: int, input_shape) -> Backbone:
    """The backbone of ``backbone``: ImageNet EfficientNet-Lite0 (optionally with its first
    ``frozen_blocks`` blocks frozen and computed once per image), or one pre-trained here."""
    dtype = COMPUTE_DTYPES[exp.model.dtype]
    size = exp.data.image_size
    shape = (size, size, input_shape[-1]) if size else tuple(input_shape)

    def build(seed: int, classes: int, shape_=shape, **builder_kwargs):
        return build_from_config(exp.model, num_classes=classes, input_shape=shape_, rngs=nnx.Rngs(seed),
                                 **builder_kwargs)

    encode = None
    if exp.backbone.source == "imagenet":
        reference = build(exp.seed, num_classes, conv_init=effnet.placeholder_init)  # the weights overwrite them
        effnet.load_pretrained(reference, exp.backbone.weights, include_head=False)
        pretrained = nnx.state(reference)

        def preprocess(images):
            return ((resize(images, shape) - effnet.PIXEL_MEAN) / effnet.PIXEL_STD).astype(dtype)
        info = {"source": "imagenet", "weights": exp.backbone.weights or effnet.PRETRAINED_PACKAGE}
        if exp.backbone.frozen_blocks:
            encode = prefix_encoder(reference, exp.backbone.frozen_blocks, preprocess, exp,
                                    os.path.join(sources.default_cache_dir(), "online_lora_prefix"))
            preprocess = functools.partial(jnp.asarray, dtype=dtype)  # the inputs are the prefix's features
            info["frozen_blocks"] = exp.backbone.frozen_blocks
    else:
        stage = exp.pretrain
        pre_train, pre_test = exp.data.splits(stage.data, stage.label, stage.classes, "pretrain.classes")
        if pre_train.images.shape[1:] != tuple(input_shape):
            raise cfg.ConfigError(f"pretrain.data: {stage.data} images are {pre_train.images.shape[1:]}, "
                                  f"the stream's {tuple(input_shape)}; pre-train on data of the same shape")
        mean, std = pipeline.channel_stats(pre_train.images)
        t0 = time.perf_counter()
        run = fit_classifier(build(exp.seed, pre_train.num_classes, pre_train.images.shape[1:]), pre_train,
                             pre_test, stage, mesh=mesh,
                             preprocess=make_preprocess(mean, std, stage.crop_padding, stage.flip, dtype),
                             workdir=stage.workdir or os.path.join(workdir, "pretrain"), seed=exp.seed,
                             rules=exp.mesh.logical)
        pretrained = nnx.state(run.model()).filter(nnx.Not(nnx.PathContains("head")))

        def preprocess(images):
            return normalize(resize(images, shape), mean, std, dtype)
        info = {"source": "pretrain", "data": stage.data, "test_acc": run.eval_metrics.get("test/accuracy"),
                "steps": int(run.state.step), "seconds": time.perf_counter() - t0}

    def new_model() -> nnx.Module:
        model = build(exp.seed + 1, num_classes)  # the same fresh head for every method
        nnx.update(model, pretrained)
        return effnet.EfficientNetTail(model, exp.backbone.frozen_blocks) if encode else model
    return Backbone(new_model, preprocess, info, encode)


def prefix_encoder(model: nnx.Module, blocks: int, preprocess: Callable, exp: OnlineLearning,
                   cache_dir: str = "") -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, C) uint8 images -> the feature maps after the stem and the first ``blocks`` blocks of
    ``model`` in eval mode (BatchNorm on its ImageNet statistics), float32, in batches of eval.batch_size.
    With ``cache_dir``, each result is kept there under a hash of the images, the weights, the input
    size and ``blocks``: the runs of a sweep encode their images once (160 px: about 5 min here)."""
    model = nnx.clone(model)
    model.eval()
    graphdef, state = nnx.split(model)
    weights = exp.backbone.weights or str(effnet.pretrained_state_dict_path())
    stat = os.stat(weights)
    what = f"{os.path.abspath(weights)}:{stat.st_size}:{stat.st_mtime_ns}:{exp.data.image_size}:{blocks}"

    @jax.jit
    def features(state, images):
        return nnx.merge(graphdef, state).prefix(preprocess(images), blocks).astype(jnp.float32)

    def compute(images: np.ndarray) -> np.ndarray:
        size = exp.eval.batch_size
        chunks = [np.asarray(features(state, images[i:i + size]))
                  for i in tqdm(range(0, len(images), size), desc=f"prefix ({blocks} blocks)", leave=False,
                                disable=not exp.progress)]
        return np.concatenate(chunks)

    def encode(images: np.ndarray) -> np.ndarray:
        if not cache_dir:
            return compute(images)
        key = hashlib.sha1(f"{what}:{images.shape}:{images.dtype}".encode() + images.tobytes()).hexdigest()
        path = os.path.join(cache_dir, f"{key}.npy")
        if os.path.exists(path):
            return np.load(path)
        out = compute(images)
        write_npy_atomic(path, out)
        return out
    return encode


def make_learner(method: str, model: nnx.Module, exp: OnlineLearning, preprocess):
    rngs = nnx.Rngs(exp.seed + 2)
    if is_online_lora(method):
        return OnlineLoRA(model, exp.online_lora, rngs=rngs, preprocess=preprocess)
    return OnlineFinetune(model, exp.baseline_config(method), rngs=rngs, preprocess=preprocess)


# ----------------------------------------------------------------------------------------- selection

def choose_settings(method: str, exp: OnlineLearning, train: pipeline.ImageArrays, backbone: Backbone, workdir: str) -> dict:
    """A method's Adam learning rate (and Online-LoRA's plateau thresholds), chosen without the test split.

    ``select.holdout_per_class`` training images of each class (drawn with ``select.seed``) are held
    out. Each lr of ``select.lrs`` makes one pass over a stream of the other training images (the class
    order of ``select.seed``); the lr whose final model has the highest class-incremental average
    accuracy over the tasks of the held-out slice is chosen (a tie: the smaller lr). With
    ``select.calibrate_plateaus``, Online-LoRA's thresholds are then calibrated on that pass's loss
    trace (``calibrate_plateau_thresholds``: one plateau per task segment as far as possible).
    Each pass is kept in ``select.workdir`` (default WORKDIR/select) and reused while its settings
    are unchanged, so the points of a seed sweep that share the folder select once.

    Returns {"lr", "scores" {lr: held-out accuracy}, "settings" {dotted key: value}, "stream_length", and for
    Online-LoRA "calibration": the selection stream's boundaries and where the plateaus fired with the
    configured and the calibrated thresholds}.
    """
    select = exp.select
    fit, held = pipeline.hold_out(train, select.holdout_per_class, select.seed)
    base = cfg.override(exp, {"seed": select.seed})
    stream = base.stream.build(fit, select.seed)
    tests = streams.task_test_sets(held, stream.tasks)
    directory = select.workdir or os.path.join(workdir, "select")
    scores, passes = {}, {}
    for lr in select.lrs:
        c = base.for_method(method, {lr_key(method): lr})
        signature = {**c.signature(), "holdout_per_class": select.holdout_per_class}
        path = os.path.join(directory, f"{method}_lr{lr:g}.json")
        result = read_signed(path, signature)
        kept = result is not None
        if not kept:
            learner = make_learner(method, backbone.new_model(), c, backbone.preprocess)
            result = one_pass(method, learner, fit, stream, tests, c, os.path.join(directory, f"lr{lr:g}"),
                                ncm=False)
            if experiment.main_process():
                write_signed(path, signature, result)
        scores[lr], passes[lr] = result["avg_acc"], result
        print(f"select {method}: lr {lr:g} -> held-out avg acc {result['avg_acc']:.4f}" + (" (kept)" if kept else ""))
    best = best_lr(scores)
    out = {"lr": best, "scores": {f"{lr:g}": v for lr, v in scores.items()}, "settings": {lr_key(method): best},
           "stream_length": len(stream)}
    if is_online_lora(method) and select.calibrate_plateaus:
        ol = exp.online_lora
        trace = np.asarray(passes[best]["loss_trace"], np.float64)
        segments = np.searchsorted(stream.boundaries, trace[:, 0] - 1, side="right") - 1
        mean_t, var_t, fires = calibrate_plateau_thresholds(trace[:, 1], segments, window=ol.window,
                                                            start_with_peak=not ol.first_plateau_needs_peak)
        out["settings"].update({"online_lora.mean_threshold": mean_t, "online_lora.var_threshold": var_t})
        out["calibration"] = {"boundaries": list(stream.boundaries),
                              "configured_plateaus_at": passes[best]["plateau_positions"],
                              "calibrated_plateaus_at": [int(trace[i, 0]) for i in fires]}
    return out


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    exp = cfg.build(OnlineLearning, config)
    train, test = stream_data(exp)
    with cfg.under_key("select"):  # before anything is written: every class keeps images outside the slice
        exp.select.check_holdout(train.labels, train.num_classes)
    mesh = experiment.start(config, workdir, subdirs=("methods",))

    backbone = make_backbone(exp, mesh, workdir, train.num_classes, train.images.shape[1:])
    if backbone.encode:  # the frozen prefix runs once per image; the stream carries its features
        t0 = time.perf_counter()
        train, test = (pipeline.ImageArrays(backbone.encode(d.images), d.labels, d.label_names) for d in (train, test))
        backbone.info["encode_seconds"] = time.perf_counter() - t0
    stream = exp.stream.build(train, exp.seed)
    tests = streams.task_test_sets(test, stream.tasks)
    print(f"stream: {len(stream)} {exp.data.name} images in {len(stream.tasks)} {exp.stream.kind} tasks "
          f"{[list(t) for t in stream.tasks]}; backbone: {backbone.info}")

    # What the pre-trained features tell apart before any training (the adapter starts as a no-op).
    untrained = make_learner("lora", backbone.new_model(), exp, backbone.preprocess)
    ncm_backbone = float(np.mean(ncm_task_accuracies(untrained.embed, train, tests, exp.eval.batch_size)))
    print(f"nearest-class-mean accuracy of the pre-trained features: {ncm_backbone:.4f}")

    method_results, selection = {}, {}
    for method in exp.methods:
        if exp.select.lrs:
            selection[method] = choose_settings(method, exp, train, backbone, workdir)
        method_exp = exp.for_method(method, selection.get(method, {}).get("settings"))
        # A finished method is reused only if everything that shapes its pass is unchanged.
        signature = method_exp.signature()
        path = os.path.join(workdir, "methods", f"{method}.json")
        saved = read_signed(path, signature)
        if saved is not None:
            method_results[method] = saved
            print(f"{method}: reusing {path}")
            continue
        learner = make_learner(method, backbone.new_model(), method_exp, backbone.preprocess)
        result = one_pass(method, learner, train, stream, tests, method_exp, workdir, test)
        method_results[method] = result
        if experiment.main_process():
            write_signed(path, signature, result)
        print(f"{method}: avg_acc {result['avg_acc']:.4f}, forgetting {result['forgetting']:.4f}, "
              f"{result['n_plateaus']} plateaus, {result['seconds']:.1f} s")

    stream_info = {"kind": exp.stream.kind, "tasks": [list(t) for t in stream.tasks],
                   "boundaries": list(stream.boundaries), "length": len(stream), "batch_size": exp.stream.batch_size}
    results = {"methods": method_results, "selection": selection, "ncm_backbone": ncm_backbone,
               "backbone": backbone.info, "model": exp.model.name,
               "data": exp.data.name, "stream": stream_info,
               "test_examples": [len(t) for t in tests], "wall_time_s": experiment.wall_time_s(workdir),
               "devices": experiment.device_summary(mesh)}
    if experiment.main_process():
        table = results_table(results)
        experiment.write_results(workdir, results, table)
        plot_accuracy(results, os.path.join(workdir, "accuracy.png"))
        print(table)
    return results


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def results_table(results: dict) -> str:
    s = results["stream"]
    lines = [f"{results['model']} on {results['data']}: {len(s['tasks'])} {s['kind']} tasks, {s['length']} images "
             f"seen once in batches of {s['batch_size']}", ""]
    lines += report.table(["method", "avg acc (%)", "forgetting (%)", "task-IL acc (%)", "task-IL forgetting (%)",
                           "NCM acc (%)", "plateaus", "seconds"],
                          [[LABELS[name], pct(r["avg_acc"]), pct(r["forgetting"]), pct(r["avg_acc_task_il"]),
                            pct(r["forgetting_task_il"]), pct(r["ncm_acc"]), r["n_plateaus"], f"{r['seconds']:.0f}"]
                           for name, r in results["methods"].items()])
    if all("a_auc" in r for r in results["methods"].values()):
        lines += ["", *report.table(["method", "A_auc (%)", "A_last (%)"],
                                    [[LABELS[name], pct(r["a_auc"]), pct(r["a_last"])]
                                     for name, r in results["methods"].items()])]
    lines += ["", f"Nearest-class-mean accuracy of the pre-trained features: {100 * results['ncm_backbone']:.2f}%. "
              f"Plateaus fired at (stream positions): " + "; ".join(
                  f"{LABELS[name]} {r['plateau_positions']}" for name, r in results["methods"].items()
                  if is_online_lora(name)) + f"; task boundaries {s['boundaries'][1:]}."]
    for name, chosen in results["selection"].items():
        scores = ", ".join(f"{lr}: {100 * v:.2f}%" for lr, v in chosen["scores"].items())
        line = f"- {LABELS[name]}: lr {chosen['lr']:g} chosen on the held-out slice ({scores})"
        if "calibration" in chosen:
            c, settings = chosen["calibration"], chosen["settings"]
            line += (f"; plateau thresholds mean {settings['online_lora.mean_threshold']:.4g}, variance "
                     f"{settings['online_lora.var_threshold']:.3g}, which fire at {c['calibrated_plateaus_at']} on "
                     f"the selection pass (configured: {c['configured_plateaus_at']}; boundaries {c['boundaries'][1:]})")
        lines.append(line)
    return "\n".join(lines)


def plot_accuracy(results: dict, path: str) -> None:
    fig, axes = report.figure(panel=(7, 4))
    ax = axes[0, 0]
    for name, r in results["methods"].items():
        ax.plot([p["position"] for p in r["curve"]], [100 * p["avg_seen"] for p in r["curve"]], marker="o",
                markersize=3, label=LABELS[name])
    for b in results["stream"]["boundaries"][1:]:
        ax.axvline(b, color="grey", alpha=0.3, linewidth=1)
    ax.set_xlabel("images seen")
    ax.set_ylabel("mean accuracy over tasks seen (%)")
    ax.set_title(f"{results['model']} on a {results['stream']['kind']} {results['data']} stream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    report.save(fig, path, dpi=120)


if __name__ == "__main__":
    cli.run(main)
