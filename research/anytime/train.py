"""Training a supernet by the sandwich rule, and evaluating it as an anytime network.

One step on a batch (the TIPS code's rule, from DS-Net / slimmable networks): the largest
subnetwork learns the labels (cross-entropy, label smoothing ``label_smoothing``); ``num_sampled``
subnetworks drawn by the sampler and the smallest learn the softmax of an EMA copy's largest
subnetwork (soft-target cross-entropy). The losses are summed and give one gradient, one update:

    L = CE_ls(f_max(x), y) + Σ_{s ∈ sampled ∪ {min}} CE(f_s(x), softmax(f^EMA_max(x)))
    θ^EMA <- decay θ^EMA + (1 - decay) θ          (f^EMA normalises with the batch's statistics)

The step wraps ``research.core.train.make_train_step`` (optimiser, gradient accumulation); the
subnetworks are drawn on the device from the sampler's table, so every step is one program.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar, Literal

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from research.anytime import supernet
from research.anytime.sampling import SubnetTable
from research.core import config as config_lib
from research.core import optim
from research.core.checkpoint import Checkpointer
from research.core.loop import fit
from research.core.mesh import LogicalRules, batch_sharding, replicated, to_local_device
from research.core.records import MetricWriter
from research.core.train import ModelDefs, TrainState, create_train_state, make_train_step, place_on_mesh
from research.data import pipeline, sources
from research.data.sections import DataSource
from research.recipes.classify import stage_settings, total_steps, training_settings


@dataclasses.dataclass(frozen=True)
class AnytimeData(DataSource):
    """anytime: the first ``train_limit`` training images, of which the last ``val_size`` are held
    out to pick each budget's subnetwork; the first ``eval_limit`` test images."""
    COUNTS: ClassVar[tuple[str, ...]] = ("train_limit", "eval_limit")

    name: Literal[sources.IMAGE_DATASETS] = "cifar10_sample"
    train_limit: int = 0
    val_size: int = 500
    eval_limit: int = 0

    def __post_init__(self):
        super().__post_init__()
        config_lib.require(self, "val_size", self.val_size >= 1,
                           "an int >= 1 (the held-out images that pick subnetworks)")


@dataclasses.dataclass(frozen=True)
class SandwichConfig:
    num_sampled: int = 2          # subnetworks drawn by the sampler per step, besides largest and smallest
    label_smoothing: float = 0.1  # on the largest subnetwork's labels
    ema_decay: float = 0.99       # the guide: an EMA copy of the weights (0.997 in the ImageNet runs)

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "num_sampled", self.num_sampled >= 0, "an int >= 0")
        config_lib.require(self, "label_smoothing", 0.0 <= self.label_smoothing < 1.0, "a float in [0, 1)")
        config_lib.require(self, "ema_decay", 0.0 <= self.ema_decay < 1.0, "a float in [0, 1)")


@flax.struct.dataclass
class SandwichState:
    train: TrainState
    ema_params: nnx.State  # the guide's weights; it runs on batch statistics, so it keeps no BN statistics

    @property
    def step(self) -> jax.Array:
        return self.train.step


def init_state(train_state: TrainState) -> SandwichState:
    return SandwichState(train_state, jax.tree.map(jnp.copy, train_state.params))


def make_sandwich_step(defs: ModelDefs, tx: optax.GradientTransformation, table: SubnetTable,
                       sample: Callable[[jax.Array, int], jax.Array], preprocess, config: SandwichConfig,
                       accum_steps: int = 1):
    """step(SandwichState, batch) -> (SandwichState, metric sums). batch: images (N, H, W, C) uint8,
    labels (N,), mask (N,). Metric sums: loss (the sandwich total), loss_largest, correct (largest), count."""
    widths, gates = jnp.asarray(table.widths), jnp.asarray(table.gates)
    largest, smallest = table.largest, table.smallest

    def loss_fn(model, batch, rng):
        x, mask = batch["x"], batch["mask"].astype(jnp.float32)
        picks = batch["subnets"][0]  # (K,): the same row in every example
        num_classes = batch["guide"].shape[-1]
        targets = optax.smooth_labels(jax.nn.one_hot(batch["labels"], num_classes), config.label_smoothing)
        logits = supernet.forward(model, x, widths[picks[0]], gates[picks[0]])
        first = optax.softmax_cross_entropy(logits, targets)
        total = jnp.sum(first * mask)
        for k in range(1, picks.shape[0]):
            sub = supernet.forward(model, x, widths[picks[k]], gates[picks[k]])
            total += jnp.sum(optax.softmax_cross_entropy(sub, batch["guide"]) * mask)
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        return total, {"loss": total, "loss_largest": jnp.sum(first * mask), "correct": jnp.sum(correct * mask),
                       "count": jnp.sum(mask)}

    core = make_train_step(defs, tx, loss_fn, accum_steps)

    def step(state: SandwichState, batch):
        rng = jax.random.fold_in(state.train.rng, state.train.step)
        k_aug, k_sub = jax.random.split(rng)
        x = preprocess(batch["images"], k_aug, True)
        # The guide normalises with the batch's statistics (train mode; its statistic updates are
        # dropped): running statistics shared by every subnetwork would not fit the largest one.
        guide_model = nnx.merge(defs.train, state.ema_params, state.train.frozen, state.train.rest, copy=True)
        guide = jax.nn.softmax(supernet.forward(guide_model, x, widths[largest], gates[largest]))
        picks = jnp.concatenate([jnp.array([largest]), sample(k_sub, config.num_sampled), jnp.array([smallest])])
        n = x.shape[0]
        train, sums = core(state.train, dict(batch, x=x, guide=jax.lax.stop_gradient(guide),
                                             subnets=jnp.broadcast_to(picks, (n,) + picks.shape)))
        d = config.ema_decay
        ema = lambda e, p: d * e + (1.0 - d) * p  # noqa: E731
        return SandwichState(train, jax.tree.map(ema, state.ema_params, train.params)), sums

    return step


def evaluate_subnets(model: nnx.Module, candidates: Iterable[int], table: SubnetTable,
                     calibration: list[jax.Array], splits: dict[str, tuple[np.ndarray, np.ndarray]],
                     preprocess, batch_size: int = 500) -> list[dict]:
    """Per candidate subnetwork: recalibrate BatchNorm on ``calibration`` (preprocessed batches), then
    the accuracy on each split {name: (images, labels)}; rows hold index, width, gates, flops and
    ``{name}_accuracy``. The model's running statistics are restored afterwards; its arrays are
    moved to the first local device."""
    # A few small programs per candidate: one device runs them faster than a mesh of replicas.
    nnx.update(model, to_local_device(nnx.state(model)))
    saved = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
    graphdef, state = nnx.split(model)

    @jax.jit
    def correct(state, x, y, width, gates):
        m = nnx.merge(graphdef, state)
        return jnp.sum(jnp.argmax(supernet.forward(m, preprocess(x, None, False), width, gates), -1) == y)

    rows = []
    for i in candidates:
        width, gates = table.widths[i], table.gates[i]
        supernet.recalibrate(model, calibration, width, gates)
        state = nnx.state(model)
        row = {"index": int(i), "width": float(width), "gates": gates.tolist(), "flops": int(table.flops[i]),
               "tps": float(table.tps[i])}
        for name, (images, labels) in splits.items():
            hits = sum(int(correct(state, jnp.asarray(images[s:s + batch_size]), jnp.asarray(labels[s:s + batch_size]),
                                   jnp.float32(width), jnp.asarray(gates)))
                       for s in range(0, len(images), batch_size))
            row[f"{name}_accuracy"] = hits / len(images)
        rows.append(row)
    nnx.update(model, saved)
    return rows


def anytime_curve(rows: list[dict], budgets: Iterable[float], select: str = "val_accuracy",
                  report: str = "test_accuracy") -> list[dict]:
    """For each FLOPs budget: the candidate with the best ``select`` among those within it, and its
    ``report``. A budget below every candidate gets None."""
    out = []
    for budget in budgets:
        inside = [r for r in rows if r["flops"] <= budget]
        best = max(inside, key=lambda r: (r[select], -r["flops"])) if inside else None
        out.append({"budget": float(budget), "flops": best and best["flops"], "width": best and best["width"],
                    "gates": best and best["gates"], report: best and best[report]})
    return out


def fit_supernet(model: nnx.Module, train: pipeline.ImageArrays, config: ml_collections.ConfigDict,
                 table: SubnetTable, sample, *, preprocess, mesh: Mesh, workdir: str, seed: int = 0,
                 rules: LogicalRules = LogicalRules(),
                 settings: Mapping = {}) -> tuple[ModelDefs, SandwichState, dict]:
    """Trains the supernet ``model`` by the sandwich rule on ``train`` (resumable from
    workdir/checkpoints) with the ``optim`` (OptimConfig), ``train`` (ClassifierTrainConfig) and
    ``sandwich`` (SandwichConfig) sections of ``config``. ``settings``: what else shapes the weights
    (the sampler's section), kept beside the checkpoints. Returns (defs, state, last train metrics)."""
    opt, train_config = stage_settings(config)
    sandwich = config_lib.section_of(config, "sandwich", SandwichConfig)
    steps = total_steps(train_config, len(train))
    tx = optim.make_optimizer(opt, steps)
    defs, train_state = create_train_state(model, tx, seed=seed)
    train_state, shardings = place_on_mesh(train_state, mesh, rules)
    state = init_state(train_state)
    state_shardings = SandwichState(shardings, shardings.params)
    step = jax.jit(make_sandwich_step(defs, tx, table, sample, preprocess, sandwich, train_config.grad_accum_steps),
                   in_shardings=(state_shardings, batch_sharding(mesh)), out_shardings=(state_shardings, replicated(mesh)),
                   donate_argnums=0)
    writer = MetricWriter(os.path.join(workdir, "tb"))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), train_config.checkpoint_every or steps,
                                settings=training_settings(opt, train_config, steps, seed, train,
                                                           sandwich=dataclasses.asdict(sandwich), **settings))
    state, train_metrics, _ = fit(
        state, step, lambda i: pipeline.train_batch(train, train_config.batch_size, seed, i), steps, mesh=mesh,
        writer=writer, checkpointer=checkpointer, learning_rate=optim.make_schedule(opt, steps),
        log_every=train_config.log_every, progress=train_config.progress)
    checkpointer.close()
    writer.close()
    return defs, state, train_metrics
