"""Baselines for task-free online continual learning, with the interface of ``OnlineLoRA``.

One learner, ``OnlineFinetune``, covers the baselines of the Online-LoRA paper (Wei et al., WACV 2025):

- sequential fine-tuning   ``trainable="all"``: every parameter, plain Adam on each incoming batch;
- LoRA without regularisation   ``trainable="lora"``: one LoRA adapter on the Online-LoRA targets plus
  the head, plain Adam (no hard buffer, no penalty, no consolidation);
- online EWC   ``ewc_lambda > 0``: the task-free variant EWC++ (Chaudhry et al., ECCV 2018, "Riemannian
  Walk for Incremental Learning"): every ``ewc_every`` steps the empirical Fisher F of the current
  batch (true labels, mean over samples of the squared per-sample gradients) updates the importance
  and the anchor moves to the current parameters,

      Omega <- ewc_alpha F + (1 - ewc_alpha) Omega,      theta* <- theta,
      L(theta) = CE(batch) + (ewc_lambda / 2) sum_i Omega_i (theta_i - theta*_i)^2;

- experience replay   ``replay_size > 0``: a reservoir buffer (Vitter 1985) of individual samples;
  every step adds the mean CE of ``replay_batch`` samples drawn from it without replacement,

      L(theta) = CE(batch) + CE(replay draw) [+ the EWC term].

Options combine (EWC with replay, LoRA with replay, ...). BatchNorm keeps its pre-trained running
statistics unless ``freeze_batch_stats=False`` (as in ``OnlineLoraConfig``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research.adapters.lora import LoraSpec, add_lora, lora_filter
from research.core import config as config_lib
from research.adapters.online_lora import (as_batch, default_preprocess, evaluate_accuracy, masked_mean,
                                           train_mode)
from research.models import filters

ADAPTER = "adapter"

__all__ = ["OnlineBaselineConfig", "OnlineFinetune", "ReservoirBuffer", "TRAINABLE", "batch_fisher"]


@dataclass(frozen=True)
class OnlineBaselineConfig:
    """trainable       all | lora | head (the head is trained in every case).
    rank, alpha, targets, lora_dropout   the adapter for ``trainable="lora"`` (as OnlineLoraConfig).
    lr              Adam learning rate.
    ewc_lambda      strength of the online EWC penalty (0 = off); ewc_alpha, ewc_every: see the module.
    replay_size     reservoir buffer size in samples (0 = no replay); replay_batch: samples drawn per step.
    freeze_batch_stats   BatchNorm normalises with its running statistics in training too.
    seed            the reservoir's and the replay draws' random stream.
    """
    trainable: Literal["all", "lora", "head"] = "all"
    rank: int = 4
    alpha: float = 4.0
    targets: str = r"attn/(q|v)$"
    lora_dropout: float = 0.0
    lr: float = 1e-4
    ewc_lambda: float = 0.0
    ewc_alpha: float = 0.5
    ewc_every: int = 50
    replay_size: int = 0
    replay_batch: int = 32
    freeze_batch_stats: bool = True
    seed: int = 0

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "lr", self.lr > 0, "a positive float")
        config_lib.require(self, "ewc_lambda", self.ewc_lambda >= 0, "a float >= 0")
        config_lib.require(self, "ewc_alpha", 0 < self.ewc_alpha <= 1, "a number in (0, 1]")
        config_lib.require(self, "ewc_every", self.ewc_every >= 1, "an int >= 1")
        config_lib.require(self, "replay_size", self.replay_size >= 0, "an int >= 0 (0 = no replay)")
        config_lib.require(self, "replay_batch", self.replay_batch >= 1, "an int >= 1")


TRAINABLE = config_lib.choices(OnlineBaselineConfig, "trainable")


class ReservoirBuffer:
    """Reservoir sampling over individual samples (host memory): after n samples were offered, each
    of them is in the buffer with probability min(1, size / n)."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seen = 0
        self.rng = np.random.default_rng(seed)
        self.images = self.labels = None

    def __len__(self) -> int:
        return min(self.seen, self.size)

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        if self.images is None:
            self.images = np.zeros((self.size,) + images.shape[1:], images.dtype)
            self.labels = np.zeros((self.size,), labels.dtype)
        for image, label in zip(images, labels, strict=True):
            slot = self.seen if self.seen < self.size else self.rng.integers(0, self.seen + 1)
            if slot < self.size:
                self.images[slot], self.labels[slot] = image, label
            self.seen += 1

    def draw(self, n: int, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """n samples without replacement (fewer while the buffer is smaller; the rest has mask 0),
        shaped like the batch ``like`` so that the jitted step compiles once."""
        images = np.zeros((n,) + like["images"].shape[1:], like["images"].dtype)
        labels, mask = np.zeros((n,), np.int32), np.zeros((n,), np.float32)
        take = min(n, len(self))
        if take:
            rows = self.rng.choice(len(self), take, replace=False)
            images[:take], labels[:take], mask[:take] = self.images[rows], self.labels[rows], 1.0
        return {"images": images, "labels": labels, "mask": mask}


def batch_fisher(loss_fn: Callable, params, images: jax.Array, labels: jax.Array, mask: jax.Array):
    """Empirical Fisher F = sum_i mask_i (d loss_fn(params, x_i, y_i) / d params)^2 / sum_i mask_i.

    One sample at a time, accumulated in a scan: memory stays at one gradient. (Stacking the
    per-sample gradients, or vmapping them over a chunk, asks for tens of GB on a 4M-parameter
    CNN at 224x224: vmapped per-sample conv weight gradients expand into huge grouped convs.)"""
    weights = mask.astype(jnp.float32) / jnp.maximum(jnp.sum(mask), 1.0)

    def accumulate(total, args):
        x, y, w = args
        g = jax.grad(loss_fn)(params, x[None], y[None])
        return jax.tree.map(lambda t, gi: t + w * jnp.square(gi.astype(jnp.float32)), total, g), None

    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return jax.lax.scan(accumulate, zeros, (images, labels, weights))[0]


def _ce(graphdef, preprocess, params, frozen, rest, images, labels):
    model = nnx.merge(graphdef, params, frozen, rest, copy=True)
    logits = model(preprocess(images)).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels), model


def _loss(graphdef, preprocess, params, frozen, rest, omega, anchor, batch, replay, ewc_lambda):
    images = jnp.concatenate([batch["images"], replay["images"].astype(batch["images"].dtype)])
    labels = jnp.concatenate([batch["labels"], replay["labels"]])
    losses, model = _ce(graphdef, preprocess, params, frozen, rest, images, labels)
    n = batch["labels"].shape[0]
    terms = jax.tree.leaves(jax.tree.map(lambda o, p, a: jnp.sum(o * jnp.square(p - a)), omega, params, anchor))
    parts = {"batch_loss": masked_mean(losses[:n], batch["mask"]),
             "replay_loss": masked_mean(losses[n:], replay["mask"]),
             "reg": 0.5 * ewc_lambda * sum(terms, jnp.zeros((), jnp.float32))}
    parts["loss"] = parts["batch_loss"] + parts["replay_loss"] + parts["reg"]
    return parts["loss"], (parts, nnx.state(model, nnx.Not(nnx.Param)))


@partial(jax.jit, static_argnums=(0, 1))
def _train_step(graphdef, preprocess, params, frozen, rest, opt_state, omega, anchor, batch, replay, lr, ewc_lambda):
    (_, (parts, rest)), grads = jax.value_and_grad(_loss, argnums=2, has_aux=True)(
        graphdef, preprocess, params, frozen, rest, omega, anchor, batch, replay, ewc_lambda)
    updates, opt_state = optax.adam(lr).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, parts


@partial(jax.jit, static_argnums=(0, 1))
def _fisher(graphdef, preprocess, params, frozen, rest, batch):
    def loss_fn(p, x, y):
        return _ce(graphdef, preprocess, p, frozen, rest, x, y)[0][0]
    return batch_fisher(loss_fn, params, batch["images"], batch["labels"], batch["mask"])


@partial(jax.jit, static_argnums=(0, 1))
def _predict(graphdef, preprocess, params, frozen, rest, images):
    return nnx.merge(graphdef, params, frozen, rest, copy=True)(preprocess(images)).astype(jnp.float32)


@partial(jax.jit, static_argnums=(0, 1))
def _embed(graphdef, preprocess, params, frozen, rest, images):
    return nnx.merge(graphdef, params, frozen, rest, copy=True).embedding(preprocess(images)).astype(jnp.float32)


class OnlineFinetune:
    """A baseline learner over an NNX classifier (see the module docstring); same interface as
    ``OnlineLoRA``: ``step(batch) -> metrics``, ``predict``, ``embed``, ``evaluate``, ``model``, ``n_plateaus`` (always 0:
    no plateau detection) and ``n_importance_updates`` (EWC updates so far).

    State: ``params`` (trainable), ``frozen`` (other params), ``rest`` (non-params), ``opt_state``,
    ``omega`` and ``anchor`` (trees of ``params``; only with EWC), ``replay`` (ReservoirBuffer or None).
    """

    def __init__(self, model: nnx.Module, config: OnlineBaselineConfig = OnlineBaselineConfig(), *,
                 rngs: nnx.Rngs, preprocess: Callable[[jax.Array], jax.Array] = default_preprocess):
        self.config = config
        self.preprocess = preprocess
        if config.trainable == "all":
            trainable = nnx.Param
        elif config.trainable == "lora":
            add_lora(model, LoraSpec(config.targets, rank=config.rank, alpha=config.alpha,
                                     dropout=config.lora_dropout), name=ADAPTER, rngs=rngs)
            trainable = nnx.Any(lora_filter(ADAPTER), filters.head(model))
        else:
            trainable = filters.head(model)
        model.eval()
        self._eval_def = nnx.graphdef(model)
        train_mode(model, config.freeze_batch_stats)
        self._train_def, self.params, self.frozen, self.rest = nnx.split(model, trainable, nnx.Param, ...)
        self.opt_state = optax.adam(config.lr).init(self.params)
        self.ewc = config.ewc_lambda > 0
        self.omega = jax.tree.map(jnp.zeros_like, self.params)
        self.anchor = self.params
        self.n_plateaus = 0
        self.n_importance_updates = 0
        self.replay = ReservoirBuffer(config.replay_size, config.seed) if config.replay_size else None
        self.steps = 0

    @property
    def model(self) -> nnx.Module:
        """A module in train mode built from (a copy of) the current states."""
        return nnx.merge(self._train_def, self.params, self.frozen, self.rest, copy=True)

    def step(self, batch) -> dict:
        """One Adam step on batch (+ replay draw, + EWC penalty); then the reservoir and, every
        ``ewc_every`` steps, the EWC importance and anchor. Returns floats "loss", "batch_loss",
        "replay_loss", "reg", "n_plateaus" and "n_importance_updates"."""
        host = {k: np.asarray(batch[k]) for k in ("images", "labels")}
        mask = np.asarray(batch.get("mask", np.ones(len(host["labels"]), np.float32)))
        if self.replay is not None:
            replay = self.replay.draw(self.config.replay_batch, host)
        else:  # an empty draw keeps one code path; zero rows cost nothing
            replay = {"images": host["images"][:0], "labels": np.zeros((0,), np.int32),
                      "mask": np.zeros((0,), np.float32)}
        device_batch = as_batch(dict(host, mask=mask))
        self.params, self.rest, self.opt_state, parts = _train_step(
            self._train_def, self.preprocess, self.params, self.frozen, self.rest, self.opt_state, self.omega,
            self.anchor, device_batch, as_batch(replay), jnp.float32(self.config.lr),
            jnp.float32(self.config.ewc_lambda))
        if self.replay is not None:
            keep = mask > 0
            self.replay.add(host["images"][keep], host["labels"][keep])
        self.steps += 1
        if self.ewc and self.steps % self.config.ewc_every == 0:
            fisher = _fisher(self._eval_def, self.preprocess, self.params, self.frozen, self.rest, device_batch)
            alpha = self.config.ewc_alpha
            self.omega = jax.tree.map(lambda o, f: alpha * f + (1.0 - alpha) * o, self.omega, fisher)
            self.anchor = self.params
            self.n_importance_updates += 1
        metrics = {k: float(v) for k, v in parts.items()}
        metrics.update(n_plateaus=self.n_plateaus, n_importance_updates=self.n_importance_updates)
        return metrics

    def predict(self, images) -> jax.Array:
        """Logits (N, C) of the eval-mode model."""
        return _predict(self._eval_def, self.preprocess, self.params, self.frozen, self.rest, jnp.asarray(images))

    def embed(self, images) -> jax.Array:
        """The head's input (N, D) of the eval-mode model (the model's ``embedding``)."""
        return _embed(self._eval_def, self.preprocess, self.params, self.frozen, self.rest, jnp.asarray(images))

    def evaluate(self, images, labels, batch_size: int = 256) -> float:
        return evaluate_accuracy(self.predict, images, labels, batch_size)
