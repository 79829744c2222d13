"""The online (task-free, class-incremental) learning benchmark: its settings, one typed schema, and
one pass over a stream with its evaluations.

``OnlineLearning`` is what ``configs/online_lora.py`` makes (``section(OnlineLearning)`` and its
presets) and ``experiments/online_lora.py`` builds once. ``one_pass`` runs a learner (Online-LoRA or
a baseline: ``step(batch)``, ``predict``, ``embed``) once over the stream. From the accuracies
a_{e,j} (evaluation e, task j) at the T task ends:

    avg_acc    = (1/T) sum_j a_{T,j}                                        (final average accuracy)
    forgetting = (1/(T-1)) sum_{j<T} max_{l<T} a_{l,j} - a_{T,j}            (Chaudhry et al., ECCV 2018)
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import ClassVar, Literal

import numpy as np
from tqdm import tqdm

from research.adapters.online_baselines import OnlineBaselineConfig
from research.adapters.online_lora import OnlineLoraConfig, batched, evaluate_task, ncm_accuracy
from research.adapters.selection import SelectionConfig
from research.core import config as config_lib
from research.core.experiment import main_process
from research.core.mesh import MeshConfig
from research.core.optim import OptimConfig
from research.core.records import MetricWriter
from research.data import sources, streams
from research.data.sections import DataSource
from research.data.streams import StreamConfig
from research.models import ModelConfig
from research.models.efficientnet_lite import PrefixBackboneConfig
from research.recipes.classify import ClassifierTrainConfig, PretrainConfig

METHODS = ("online_lora", "online_lora_batches", "lora", "sequential_ft", "online_ewc", "er")
LABELS = {"online_lora": "Online-LoRA", "online_lora_batches": "Online-LoRA, buffer of whole batches",
          "lora": "LoRA (no regularisation)", "sequential_ft": "sequential fine-tuning",
          "online_ewc": "online EWC (EWC++)", "er": "experience replay"}


@dataclasses.dataclass(frozen=True)
class StreamData(DataSource):
    """online_lora: ``train_per_class`` images of each class make the stream (0 = every training
    image), ``test_per_class`` the test set (0 = all); ``image_size`` resizes on the device (0 = as
    stored)."""
    COUNTS: ClassVar[tuple[str, ...]] = ("train_per_class", "test_per_class", "image_size")

    name: Literal[sources.IMAGE_DATASETS] = "fashion_mnist"
    train_per_class: int = 2000
    test_per_class: int = 0
    image_size: int = 0


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
    """The baselines' own settings (``lora`` takes the adapter and lr of ``online_lora``): ``lr`` the
    Adam lr of the full-model baselines; online EWC's ``ewc_lambda``, ``ewc_alpha``, ``ewc_every``;
    experience replay's ``replay_size`` and ``replay_batch``."""
    lr: float = 1e-4
    ewc_lambda: float = 100.0
    ewc_alpha: float = 0.5
    ewc_every: int = 20
    replay_size: int = 200
    replay_batch: int = 32

    def __post_init__(self):
        config_lib.check_fields(self)


@dataclasses.dataclass(frozen=True)
class StreamEval:
    """``points_per_task`` evaluations inside each task segment besides its end (for the plot);
    ``auc_every`` > 0: the seen-class accuracy every that many images (A_auc, A_last; Si-Blurry
    uses 1,000); evaluation batches of ``batch_size``."""
    points_per_task: int = 2
    auc_every: int = 0
    batch_size: int = 500

    def __post_init__(self):
        config_lib.check_fields(self)
        for field in ("points_per_task", "auc_every"):
            config_lib.require(self, field, getattr(self, field) >= 0, "an int >= 0")
        config_lib.require(self, "batch_size", self.batch_size > 0, "a positive int")


def _pretrain() -> PretrainConfig:
    # A ViT pre-trained on MNIST, for a Fashion-MNIST stream.
    return PretrainConfig(data="mnist", train=ClassifierTrainConfig(eval_batch_size=500, epochs=2),
                          optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, warmup_steps=100,
                                            grad_clip_norm=1.0))


@dataclasses.dataclass(frozen=True)
class OnlineLearning:
    """One pass of each of ``methods`` over the stream of ``stream`` drawn from ``data`` (``seed``),
    each from the same backbone (``backbone``: pre-trained by ``pretrain``, or ImageNet weights) with
    the same fresh head. ``select``: each method's lr chosen on held-out training images first."""
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    data: StreamData = StreamData()
    stream: StreamConfig = StreamConfig()
    backbone: PrefixBackboneConfig = PrefixBackboneConfig()
    model: ModelConfig = ModelConfig(name="vit_tiny", depth=4, patch_size=7)
    pretrain: PretrainConfig = dataclasses.field(default_factory=_pretrain)
    online_lora: OnlineLoraConfig = OnlineLoraConfig(lr=1e-3)
    baselines: BaselineSettings = BaselineSettings()
    select: SelectionConfig = SelectionConfig()
    eval: StreamEval = StreamEval()
    log_every: int = 10
    progress: bool = True
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require_names(self, "methods", METHODS)
        config_lib.require(self, "log_every", self.log_every > 0, "a positive int")
        self.backbone.check_model(self.model.name)
        for method in self.methods:
            if not is_online_lora(method):
                with config_lib.under_key("baselines"):  # the baseline's own checks, under the key that set the value
                    self.baseline_config(method)

    def baseline_config(self, method: str) -> OnlineBaselineConfig:
        """The settings of a baseline: ``baselines``, with the adapter of ``online_lora``."""
        ol, b = self.online_lora, self.baselines
        common = dict(rank=ol.rank, alpha=ol.alpha, targets=ol.targets, seed=self.seed)
        settings = {"lora": dict(trainable="lora", lr=ol.lr),
                    "sequential_ft": dict(trainable="all", lr=b.lr),
                    "online_ewc": dict(trainable="all", lr=b.lr, ewc_lambda=b.ewc_lambda, ewc_alpha=b.ewc_alpha,
                                       ewc_every=b.ewc_every),
                    "er": dict(trainable="all", lr=b.lr, replay_size=b.replay_size, replay_batch=b.replay_batch)}[method]
        return OnlineBaselineConfig(**common, **settings)

    def for_method(self, method: str, settings: dict | None = None) -> OnlineLearning:
        """These settings with what is particular to ``method``: the official buffer for
        ``online_lora_batches`` and ``settings`` ({dotted key: value}, e.g. a chosen learning rate)."""
        updates = {"online_lora.buffer": "batches"} if method == "online_lora_batches" else {}
        return config_lib.override(self, {**updates, **(settings or {})})

    def signature(self) -> dict:
        """What shapes a method's pass: the settings without the method list, logging and the
        selection section (a chosen value is in the settings it is written into)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("methods", "progress", "log_every", "select")}


def is_online_lora(method: str) -> bool:
    return method.startswith("online_lora")


def lr_key(method: str) -> str:
    """The settings key of a method's Adam learning rate."""
    return "online_lora.lr" if is_online_lora(method) or method == "lora" else "baselines.lr"


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


def one_pass(method: str, learner, train, stream, tests, exp: OnlineLearning, workdir: str, test=None,
             ncm: bool = True) -> dict:
    """One pass; accuracies at the evaluation positions (a batch ends at or after each). With
    ``eval.auc_every`` > 0 and the whole ``test`` split, also the seen-class accuracy every that many
    images and at the end: A_auc (their mean) and A_last (the last). ``loss_trace`` holds, per step,
    the stream position at the batch's end and the loss the plateau detector watches (batch + hard
    buffer CE; the batch CE for the baselines). ``ncm=False`` skips the nearest-class-mean figures."""
    logdir = os.path.join(workdir, method, "tb")
    if main_process() and os.path.isdir(logdir):
        shutil.rmtree(logdir)  # a rerun (changed config, or an interrupted pass) starts a clean log
    writer = MetricWriter(logdir)
    pending = sorted(eval_positions(stream, exp.eval.points_per_task).items())
    every = exp.eval.auc_every if test is not None else 0
    auc_pending = sorted({*range(every, len(stream), every), len(stream)}) if every else []
    auc_curve = []
    batch_size = exp.stream.batch_size
    curve, task_end_accs, task_end_til, train_seconds, compile_seconds, plateaus = [], [], [], 0.0, 0.0, []
    loss_trace = []
    # Batches end at every task boundary, so a task-end evaluation has seen nothing of the next task.
    batches = list(streams.stream_batches(train, stream, batch_size, cuts=stream.boundaries[1:]))
    bar = tqdm(batches, desc=method, disable=not exp.progress, leave=False)
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
        if step % exp.log_every == 0:
            writer.scalars(step, {f"train/{k}": float(v) for k, v in metrics.items()})
            bar.set_postfix(loss=f"{metrics['batch_loss']:.3f}", plateaus=metrics["n_plateaus"])
        seen = batch["end"]
        while pending and pending[0][0] <= seen:
            _, is_task_end = pending.pop(0)
            both = [evaluate_task(learner.predict, t.images, t.labels, classes, exp.eval.batch_size)
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
                              "accuracy": seen_class_accuracy(learner, test, classes, exp.eval.batch_size)})
            writer.scalars(step, {"eval/seen_class_accuracy": auc_curve[-1]["accuracy"]})
    writer.close()
    avg_acc, forgetting = continual_metrics(task_end_accs)
    avg_til, forgetting_til = continual_metrics(task_end_til)
    ncm_accs = ncm_task_accuracies(learner.embed, train, tests, exp.eval.batch_size) if ncm else []
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
