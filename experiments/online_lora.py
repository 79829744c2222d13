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
import shutil
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from research.adapters.online_baselines import OnlineBaselineConfig, OnlineFinetune  # noqa: E402
from research.adapters.online_lora import (OnlineLoRA, OnlineLoraConfig, batched,  # noqa: E402
                                           calibrate_plateau_thresholds, evaluate_task, ncm_accuracy)
from research.adapters.selection import SelectionConfig, best_lr  # noqa: E402
from research.core import cli, experiment  # noqa: E402
from research.core import config as cfg  # noqa: E402
from research.recipes.classify import PretrainConfig, fit_classifier  # noqa: E402
from research.core.records import MetricWriter, read_signed, write_npy_atomic, write_signed  # noqa: E402
from research.data import pipeline, sources, streams  # noqa: E402
from research.data.augment import make_preprocess, normalize, resize  # noqa: E402
from research.data.sections import StreamData  # noqa: E402
from research.data.streams import StreamConfig  # noqa: E402
from research.models import COMPUTE_DTYPES, ModelConfig, build_from_config  # noqa: E402
from research.models import efficientnet_lite as effnet  # noqa: E402

METHODS = ("online_lora", "online_lora_batches", "lora", "sequential_ft", "online_ewc", "er")
LABELS = {"online_lora": "Online-LoRA", "online_lora_batches": "Online-LoRA, buffer of whole batches",
          "lora": "LoRA (no regularisation)", "sequential_ft": "sequential fine-tuning",
          "online_ewc": "online EWC (EWC++)", "er": "experience replay"}


def validate(config: ml_collections.ConfigDict) -> list[str]:
    model = cfg.build(ModelConfig, config, "model")
    cfg.build(OnlineLoraConfig, config, "online_lora")
    cfg.build(StreamData, config, "data")
    cfg.build(StreamConfig, config, "stream")
    backbone = cfg.build(effnet.PrefixBackboneConfig, config, "backbone")
    backbone.check_model(model.name)
    for key in ("eval.points_per_task", "eval.auc_every"):
        cfg.check(config, key, lambda v: v >= 0, "an int >= 0")
    for key in ("eval.batch_size", "log_every"):
        cfg.check(config, key, lambda v: v > 0, "a positive int")
    cfg.build(PretrainConfig, config, "pretrain")
    methods = cfg.check_names(config, "methods", METHODS)
    cfg.build(SelectionConfig, config, "select")
    for method in methods:
        if not is_online_lora(method):
            with cfg.under_key("baselines"):  # the baseline's own checks, under the key that set the value
                baseline_config(method, config)
    return methods


# ---------------------------------------------------------------------------------------------- data

def stream_data(config) -> tuple[pipeline.ImageArrays, pipeline.ImageArrays]:
    data = cfg.build(StreamData, config, "data")
    train, test = data.splits()
    return (pipeline.per_class(train, data.train_per_class, config.seed),
            pipeline.per_class(test, data.test_per_class, config.seed))


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


def make_backbone(config, mesh, workdir: str, num_classes: int, input_shape) -> Backbone:
    """The backbone of ``config.backbone``: ImageNet EfficientNet-Lite0 (optionally with its first
    ``frozen_blocks`` blocks frozen and computed once per image), or one pre-trained here."""
    dtype = COMPUTE_DTYPES[config.model.dtype]
    size = config.data.image_size
    shape = (size, size, input_shape[-1]) if size else tuple(input_shape)

    def build(seed: int, classes: int, shape_=shape, **builder_kwargs):
        return build_from_config(config.model, num_classes=classes, input_shape=shape_, rngs=nnx.Rngs(seed),
                                 **builder_kwargs)

    encode = None
    if config.backbone.source == "imagenet":
        reference = build(config.seed, num_classes, conv_init=effnet.placeholder_init)  # the weights overwrite them
        effnet.load_pretrained(reference, config.backbone.weights, include_head=False)
        pretrained = nnx.state(reference)

        def preprocess(images):
            return ((resize(images, shape) - effnet.PIXEL_MEAN) / effnet.PIXEL_STD).astype(dtype)
        info = {"source": "imagenet", "weights": config.backbone.weights or effnet.PRETRAINED_PACKAGE}
        if config.backbone.frozen_blocks:
            encode = prefix_encoder(reference, config.backbone.frozen_blocks, preprocess, config,
                                    os.path.join(sources.default_cache_dir(), "online_lora_prefix"))
            preprocess = functools.partial(jnp.asarray, dtype=dtype)  # the inputs are the prefix's features
            info["frozen_blocks"] = config.backbone.frozen_blocks
    else:
        stage = cfg.build(PretrainConfig, config, "pretrain")
        pre_train, pre_test = cfg.build(StreamData, config, "data").splits(stage.data, stage.label, stage.classes,
                                                                           "pretrain.classes")
        if pre_train.images.shape[1:] != tuple(input_shape):
            raise cfg.ConfigError(f"pretrain.data: {stage.data} images are {pre_train.images.shape[1:]}, "
                                  f"the stream's {tuple(input_shape)}; pre-train on data of the same shape")
        mean, std = pipeline.channel_stats(pre_train.images)
        t0 = time.perf_counter()
        run = fit_classifier(build(config.seed, pre_train.num_classes, pre_train.images.shape[1:]), pre_train,
                             pre_test, config.pretrain, mesh=mesh,
                             preprocess=make_preprocess(mean, std, stage.crop_padding, stage.flip, dtype),
                             workdir=stage.workdir or os.path.join(workdir, "pretrain"), seed=config.seed,
                             rules=experiment.mesh_config(config).logical)
        pretrained = nnx.state(run.model()).filter(nnx.Not(nnx.PathContains("head")))

        def preprocess(images):
            return normalize(resize(images, shape), mean, std, dtype)
        info = {"source": "pretrain", "data": stage.data, "test_acc": run.eval_metrics.get("test/accuracy"),
                "steps": int(run.state.step), "seconds": time.perf_counter() - t0}

    def new_model() -> nnx.Module:
        model = build(config.seed + 1, num_classes)  # the same fresh head for every method
        nnx.update(model, pretrained)
        return effnet.EfficientNetTail(model, config.backbone.frozen_blocks) if encode else model
    return Backbone(new_model, preprocess, info, encode)


def prefix_encoder(model: nnx.Module, blocks: int, preprocess: Callable, config,
                   cache_dir: str = "") -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, C) uint8 images -> the feature maps after the stem and the first ``blocks`` blocks of
    ``model`` in eval mode (BatchNorm on its ImageNet statistics), float32, in batches of eval.batch_size.
    With ``cache_dir``, each result is kept there under a hash of the images, the weights, the input
    size and ``blocks``: the runs of a sweep encode their images once (160 px: about 5 min here)."""
    model = nnx.clone(model)
    model.eval()
    graphdef, state = nnx.split(model)
    weights = config.backbone.weights or str(effnet.pretrained_state_dict_path())
    stat = os.stat(weights)
    what = f"{os.path.abspath(weights)}:{stat.st_size}:{stat.st_mtime_ns}:{config.data.image_size}:{blocks}"

    @jax.jit
    def features(state, images):
        return nnx.merge(graphdef, state).prefix(preprocess(images), blocks).astype(jnp.float32)

    def compute(images: np.ndarray) -> np.ndarray:
        size = config.eval.batch_size
        chunks = [np.asarray(features(state, images[i:i + size]))
                  for i in tqdm(range(0, len(images), size), desc=f"prefix ({blocks} blocks)", leave=False,
                                disable=not config.progress)]
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


def baseline_config(method: str, config) -> OnlineBaselineConfig:
    """The settings of a baseline: the ``baselines`` section, with the adapter of ``online_lora``."""
    ol, b = cfg.build(OnlineLoraConfig, config, "online_lora"), config.baselines
    common = dict(rank=ol.rank, alpha=ol.alpha, targets=ol.targets, seed=config.seed)
    settings = {"lora": dict(trainable="lora", lr=ol.lr),
                "sequential_ft": dict(trainable="all", lr=b.lr),
                "online_ewc": dict(trainable="all", lr=b.lr, ewc_lambda=b.ewc_lambda, ewc_alpha=b.ewc_alpha,
                                   ewc_every=b.ewc_every),
                "er": dict(trainable="all", lr=b.lr, replay_size=b.replay_size, replay_batch=b.replay_batch)}[method]
    return OnlineBaselineConfig(**common, **settings)


def is_online_lora(method: str) -> bool:
    return method.startswith("online_lora")


def lr_key(method: str) -> str:
    """The config key of a method's Adam learning rate."""
    return "online_lora.lr" if is_online_lora(method) or method == "lora" else "baselines.lr"


def method_config(config, method: str, settings: dict | None = None) -> ml_collections.ConfigDict:
    """A copy of ``config`` with what is particular to ``method``: the official buffer for
    ``online_lora_batches`` and ``settings`` ({dotted key: value}, e.g. a chosen learning rate)."""
    updates = {"online_lora.buffer": "batches"} if method == "online_lora_batches" else {}
    return cfg.apply_overrides(config, {**updates, **(settings or {})})


def make_learner(method: str, model: nnx.Module, config, preprocess):
    rngs = nnx.Rngs(config.seed + 2)
    if is_online_lora(method):
        return OnlineLoRA(model, cfg.build(OnlineLoraConfig, config, "online_lora"), rngs=rngs, preprocess=preprocess)
    return OnlineFinetune(model, baseline_config(method, config), rngs=rngs, preprocess=preprocess)


# ------------------------------------------------------------------------------------------ the pass

def eval_positions(stream: streams.Stream, points_per_task: int) -> dict[int, bool]:
    """{stream position after which to evaluate: is it a task end}."""
    ends = list(stream.boundaries[1:]) + [len(stream)]
    positions = {}
    for start, end in zip(stream.boundaries, ends, strict=True):
        for k in range(1, points_per_task + 1):
            positions.setdefault(start + round(k * (end - start) / (points_per_task + 1)), False)
        positions[end] = True
    return positions


def continual_metrics(task_end_accs) -> tuple[float, float]:
    """(avg_acc, forgetting) from a (T, T) matrix a[l][j] = accuracy on task j after task segment l:
    the mean of the last row, and the mean over j < T of max_{l < T} a[l][j] - a[T][j] (0 when T = 1)."""
    acc = np.asarray(task_end_accs, np.float64)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1]:
        raise ValueError(f"need a square (tasks, tasks) matrix of accuracies, got shape {acc.shape}")
    forgetting = float(np.mean(acc[:-1, :-1].max(axis=0) - acc[-1, :-1])) if len(acc) > 1 else 0.0
    return float(acc[-1].mean()), forgetting


def seen_class_accuracy(learner, test, classes, batch_size: int) -> float:
    """Accuracy on the test images of ``classes`` with the logits restricted to them (the Si-Blurry
    protocol's seen-class mask)."""
    rows = np.flatnonzero(np.isin(test.labels, classes))
    return evaluate_task(learner.predict, test.images[rows], test.labels[rows], classes, batch_size)[1]


def ncm_task_accuracies(embed, train, tests, batch_size: int) -> list[float]:
    """What features can still tell apart: per task, the nearest-class-mean accuracy of its test images
    with every class's mean over all training images."""
    train_features = batched(embed, train.images, batch_size)
    return [ncm_accuracy(train_features, train.labels, batched(embed, t.images, batch_size), t.labels)
            for t in tests]


def run_method(method: str, learner, train, stream, tests, config, workdir: str, test=None, ncm: bool = True) -> dict:
    """One pass; accuracies at the evaluation positions (a batch ends at or after each). With
    ``eval.auc_every`` > 0 and the whole ``test`` split, also the seen-class accuracy every that many
    images and at the end: A_auc (their mean) and A_last (the last). ``loss_trace`` holds, per step,
    the stream position at the batch's end and the loss the plateau detector watches (batch + hard
    buffer CE; the batch CE for the baselines). ``ncm=False`` skips the nearest-class-mean figures."""
    logdir = os.path.join(workdir, method, "tb")
    if experiment.main_process() and os.path.isdir(logdir):
        shutil.rmtree(logdir)  # a rerun (changed config, or an interrupted pass) starts a clean log
    writer = MetricWriter(logdir)
    pending = sorted(eval_positions(stream, config.eval.points_per_task).items())
    every = config.eval.auc_every if test is not None else 0
    auc_pending = sorted({*range(every, len(stream), every), len(stream)}) if every else []
    auc_curve = []
    batch_size = config.stream.batch_size
    curve, task_end_accs, task_end_til, train_seconds, compile_seconds, plateaus = [], [], [], 0.0, 0.0, []
    loss_trace = []
    # Batches end at every task boundary, so a task-end evaluation has seen nothing of the next task.
    batches = list(streams.stream_batches(train, stream, batch_size, cuts=stream.boundaries[1:]))
    bar = tqdm(batches, desc=method, disable=not config.progress, leave=False)
    for step, batch in enumerate(bar):
        t0 = time.perf_counter()
        metrics = learner.step(batch)
        if step == 0:  # compilation; later methods may reuse an earlier method's programs
            compile_seconds = time.perf_counter() - t0
        else:
            train_seconds += time.perf_counter() - t0
        loss_trace.append([int(batch["end"]), metrics["batch_loss"] + metrics.get("buffer_loss", 0.0)])
        if metrics.get("plateau"):
            plateaus.append(batch["end"])
        if step % config.log_every == 0:
            writer.scalars(step, {f"train/{k}": float(v) for k, v in metrics.items()})
            bar.set_postfix(loss=f"{metrics['batch_loss']:.3f}", plateaus=metrics["n_plateaus"])
        seen = batch["end"]
        while pending and pending[0][0] <= seen:
            _, is_task_end = pending.pop(0)
            both = [evaluate_task(learner.predict, t.images, t.labels, classes, config.eval.batch_size)
                    for t, classes in zip(tests, stream.tasks, strict=True)]
            accs, task_accs = [b[0] for b in both], [b[1] for b in both]
            started = int(np.searchsorted(stream.boundaries, seen - 1, side="right"))
            curve.append({"position": seen, "task_accs": accs, "task_il_accs": task_accs,
                          "avg_seen": float(np.mean(accs[:started]))})
            writer.scalars(step, {"eval/avg_acc_seen_tasks": curve[-1]["avg_seen"],
                                  **{f"eval/task_{j}": a for j, a in enumerate(accs)}})
            if is_task_end:
                task_end_accs.append(accs)
                task_end_til.append(task_accs)
        while auc_pending and auc_pending[0] <= seen:
            auc_pending.pop(0)
            classes = streams.seen_classes(stream, seen)
            auc_curve.append({"position": seen, "seen_classes": len(classes),
                              "accuracy": seen_class_accuracy(learner, test, classes, config.eval.batch_size)})
            writer.scalars(step, {"eval/seen_class_accuracy": auc_curve[-1]["accuracy"]})
    writer.close()
    avg_acc, forgetting = continual_metrics(task_end_accs)
    avg_til, forgetting_til = continual_metrics(task_end_til)
    ncm_accs = ncm_task_accuracies(learner.embed, train, tests, config.eval.batch_size) if ncm else []
    return {"avg_acc": avg_acc, "forgetting": forgetting, "avg_acc_task_il": avg_til,
            "forgetting_task_il": forgetting_til, **({"ncm_acc": float(np.mean(ncm_accs)), "ncm_task_accs": ncm_accs}
                                                     if ncm else {}),
            "n_plateaus": int(learner.n_plateaus), "loss_trace": loss_trace,
            "seconds": train_seconds, "first_step_seconds": compile_seconds, "steps": step + 1,
            "seconds_per_step": train_seconds / max(step, 1),
            "plateau_positions": plateaus, "task_end_accs": task_end_accs, "task_end_accs_task_il": task_end_til,
            "curve": curve,
            **({"a_auc": float(np.mean([p["accuracy"] for p in auc_curve])), "a_last": auc_curve[-1]["accuracy"],
                "auc_curve": auc_curve} if auc_curve else {})}


# ----------------------------------------------------------------------------------------- selection

def run_signature(config) -> dict:
    """What shapes a method's pass: the config without the method list, logging and the selection
    section (a chosen value is in the config it is written into)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("methods", "progress", "log_every", "select")}


def choose_settings(method: str, config, train: pipeline.ImageArrays, backbone: Backbone, workdir: str) -> dict:
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
    select = cfg.build(SelectionConfig, config, "select")
    fit, held = pipeline.hold_out(train, select.holdout_per_class, select.seed)
    base = cfg.apply_overrides(config, {"seed": select.seed})
    stream = cfg.build(StreamConfig, base, "stream").build(fit, select.seed)
    tests = streams.task_test_sets(held, stream.tasks)
    directory = select.workdir or os.path.join(workdir, "select")
    scores, passes = {}, {}
    for lr in select.lrs:
        c = method_config(base, method, {lr_key(method): lr})
        signature = {**run_signature(c), "holdout_per_class": select.holdout_per_class}
        path = os.path.join(directory, f"{method}_lr{lr:g}.json")
        result = read_signed(path, signature)
        kept = result is not None
        if not kept:
            learner = make_learner(method, backbone.new_model(), c, backbone.preprocess)
            result = run_method(method, learner, fit, stream, tests, c, os.path.join(directory, f"lr{lr:g}"),
                                ncm=False)
            if experiment.main_process():
                write_signed(path, signature, result)
        scores[lr], passes[lr] = result["avg_acc"], result
        print(f"select {method}: lr {lr:g} -> held-out avg acc {result['avg_acc']:.4f}" + (" (kept)" if kept else ""))
    best = best_lr(scores)
    out = {"lr": best, "scores": {f"{lr:g}": v for lr, v in scores.items()}, "settings": {lr_key(method): best},
           "stream_length": len(stream)}
    if is_online_lora(method) and select.calibrate_plateaus:
        ol = cfg.build(OnlineLoraConfig, config, "online_lora")
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
    methods = validate(config)
    start_time = time.perf_counter()
    train, test = stream_data(config)
    with cfg.under_key("select"):  # before anything is written: every class keeps images outside the slice
        cfg.build(SelectionConfig, config, "select").check_holdout(train.labels, train.num_classes)
    mesh = experiment.start(config, workdir, subdirs=("methods",))

    backbone = make_backbone(config, mesh, workdir, train.num_classes, train.images.shape[1:])
    if backbone.encode:  # the frozen prefix runs once per image; the stream carries its features
        t0 = time.perf_counter()
        train, test = (pipeline.ImageArrays(backbone.encode(d.images), d.labels, d.label_names) for d in (train, test))
        backbone.info["encode_seconds"] = time.perf_counter() - t0
    stream = cfg.build(StreamConfig, config, "stream").build(train, config.seed)
    tests = streams.task_test_sets(test, stream.tasks)
    print(f"stream: {len(stream)} {config.data.name} images in {len(stream.tasks)} {config.stream.kind} tasks "
          f"{[list(t) for t in stream.tasks]}; backbone: {backbone.info}")

    # What the pre-trained features tell apart before any training (the adapter starts as a no-op).
    untrained = make_learner("lora", backbone.new_model(), config, backbone.preprocess)
    ncm_backbone = float(np.mean(ncm_task_accuracies(untrained.embed, train, tests, config.eval.batch_size)))
    print(f"nearest-class-mean accuracy of the pre-trained features: {ncm_backbone:.4f}")

    method_results, selection = {}, {}
    for method in methods:
        if config.select.lrs:
            selection[method] = choose_settings(method, config, train, backbone, workdir)
        method_cfg = method_config(config, method, selection.get(method, {}).get("settings"))
        # A finished method is reused only if everything that shapes its pass is unchanged.
        signature = run_signature(method_cfg)
        path = os.path.join(workdir, "methods", f"{method}.json")
        saved = read_signed(path, signature)
        if saved is not None:
            method_results[method] = saved
            print(f"{method}: reusing {path}")
            continue
        learner = make_learner(method, backbone.new_model(), method_cfg, backbone.preprocess)
        result = run_method(method, learner, train, stream, tests, method_cfg, workdir, test)
        method_results[method] = result
        if experiment.main_process():
            write_signed(path, signature, result)
        print(f"{method}: avg_acc {result['avg_acc']:.4f}, forgetting {result['forgetting']:.4f}, "
              f"{result['n_plateaus']} plateaus, {result['seconds']:.1f} s")

    stream_info = {"kind": config.stream.kind, "tasks": [list(t) for t in stream.tasks],
                   "boundaries": list(stream.boundaries), "length": len(stream), "batch_size": config.stream.batch_size}
    results = {"methods": method_results, "selection": selection, "ncm_backbone": ncm_backbone,
               "backbone": backbone.info, "model": config.model.name,
               "data": config.data.name, "stream": stream_info,
               "test_examples": [len(t) for t in tests], "wall_time_s": time.perf_counter() - start_time,
               "devices": experiment.device_summary(mesh)}
    if experiment.main_process():
        table = results_table(results)
        experiment.write_results(workdir, results, table)
        plot_accuracy(results, os.path.join(workdir, "accuracy.png"))
        print(table)
    return results


def results_table(results: dict) -> str:
    s = results["stream"]
    lines = [f"{results['model']} on {results['data']}: {len(s['tasks'])} {s['kind']} tasks, {s['length']} images "
             f"seen once in batches of {s['batch_size']}", "",
             "| method | avg acc (%) | forgetting (%) | task-IL acc (%) | task-IL forgetting (%) | NCM acc (%) "
             "| plateaus | seconds |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        lines.append(f"| {LABELS[name]} | {100 * r['avg_acc']:.2f} | {100 * r['forgetting']:.2f} | "
                     f"{100 * r['avg_acc_task_il']:.2f} | {100 * r['forgetting_task_il']:.2f} | "
                     f"{100 * r['ncm_acc']:.2f} | {r['n_plateaus']} | {r['seconds']:.0f} |")
    if all("a_auc" in r for r in results["methods"].values()):
        lines += ["", "| method | A_auc (%) | A_last (%) |", "|---|---|---|"]
        lines += [f"| {LABELS[name]} | {100 * r['a_auc']:.2f} | {100 * r['a_last']:.2f} |"
                  for name, r in results["methods"].items()]
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
    fig, ax = plt.subplots(figsize=(7, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    cli.run(main)
