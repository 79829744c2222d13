"""A small jitted optimisation loop over an ``Unlearnable``'s parameter subset, shared by the baselines.

``minimize(unlearnable, loss_fn, next_batch, steps, tx)`` runs ``steps`` optax updates of
``loss_fn(params, batch, rng) -> scalar`` and returns the new params. Batches come from
``next_batch(step) -> dict of numpy arrays`` so the order is a pure function of the step.
``cross_entropy_loss`` and ``image_batches`` cover the common case (CE on (images, labels) pairs).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from research.core import config as config_lib
from research.core import optim
from research.data.pipeline import ImageArrays
from research.unlearning.model import Unlearnable

LossFn = Callable[[nnx.State, dict, jax.Array], jax.Array]


def minimize(unlearnable: Unlearnable, loss_fn: LossFn, next_batch: Callable[[int], dict], steps: int,
             tx: optax.GradientTransformation, *, seed: int = 0, params: nnx.State | None = None,
             progress: bool = False, desc: str = "") -> nnx.State:
    """``steps`` updates of ``tx`` on ``loss_fn`` from ``params`` (default: the unlearnable's own)."""
    params = unlearnable.params if params is None else params
    opt_state = tx.init(params)

    @jax.jit
    def step_fn(params, opt_state, batch, rng):
        grads = jax.grad(loss_fn)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    key = jax.random.PRNGKey(seed)
    for step in tqdm.trange(steps, disable=not progress, desc=desc, leave=False):
        batch = {k: jnp.asarray(v) for k, v in next_batch(step).items()}
        params, opt_state = step_fn(params, opt_state, batch, jax.random.fold_in(key, step))
    return params


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy: logits (N, C), integer labels (N,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def cross_entropy_loss(unlearnable: Unlearnable) -> LossFn:
    """loss(params, {"images", "labels"}, rng) = mean CE of the model's logits."""
    def loss(params, batch, rng):
        return cross_entropy(unlearnable.logits(params, batch["images"]), batch["labels"])
    return loss


def image_batches(data: ImageArrays, batch_size: int, seed: int = 0) -> Callable[[int], dict]:
    """next_batch(step): seeded epochs of ``data``, reshuffled each epoch; a batch larger than the
    data is the whole (shuffled) data."""
    n = len(data)
    size = min(batch_size, n)
    per_epoch = max(n // size, 1)

    def next_batch(step: int) -> dict:
        epoch, i = divmod(step, per_epoch)
        rows = np.random.default_rng([seed, epoch]).permutation(n)[i * size:(i + 1) * size]
        return {"images": data.images[rows], "labels": data.labels[rows]}
    return next_batch


def sgd(lr: float, momentum: float = 0.9, weight_decay: float = 0.0, steps: int = 0,
        schedule: str = "constant") -> optax.GradientTransformation:
    """research.core's SGD with momentum as the unlearning references' torch code sets it up:
    ``weight_decay`` adds wd * w to the gradient of every parameter of the subset (vectors too);
    ``schedule="cosine"`` decays lr to 0 over ``steps``."""
    return optim.make_optimizer(optim.OptimConfig(name="sgd", lr=lr, momentum=momentum, nesterov=False,
                                                  weight_decay=weight_decay, schedule=schedule, decay_vectors=True),
                                steps)


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """How a model was trained on D (and so how the retrain baseline trains on D_r): the parameter
    ``subset`` trained (the rest frozen, BatchNorm in eval mode), SGD with momentum, L2
    ``weight_decay`` on the subset, ``epochs`` over the data in batches of ``batch_size``."""
    subset: Literal["all", "bn_and_head", "bn", "head", "prompts_and_head", "prompts"] = "all"
    num_prompts: int = 10          # prompts*: prompt tokens (a ViT)
    deep_prompts: bool = False     # prompts*: one set per block (deep VPT) instead of one at the input
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    batch_size: int = 64
    schedule: Literal["constant", "cosine"] = "cosine"

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "lr", self.lr > 0, "a positive float")
        config_lib.require(self, "weight_decay", self.weight_decay >= 0, "a float >= 0")
        config_lib.require(self, "epochs", self.epochs > 0, "a positive int")
        config_lib.require(self, "batch_size", self.batch_size > 0, "a positive int")
        config_lib.require(self, "num_prompts", self.num_prompts > 0, "a positive int")

    def steps(self, n: int) -> int:
        return self.epochs * max(n // min(self.batch_size, n), 1)

    def optimizer(self, n: int) -> optax.GradientTransformation:
        return sgd(self.lr, self.momentum, self.weight_decay, self.steps(n), self.schedule)


def fit(unlearnable: Unlearnable, data: ImageArrays, recipe: TrainRecipe, *, params: nnx.State | None = None,
        seed: int = 0, progress: bool = False, desc: str = "train") -> nnx.State:
    """Cross-entropy training of the subset on ``data`` with ``recipe``, from ``params`` (default: the
    unlearnable's own). Returns the trained params."""
    steps = recipe.steps(len(data))
    return minimize(unlearnable, cross_entropy_loss(unlearnable), image_batches(data, recipe.batch_size, seed),
                    steps, recipe.optimizer(len(data)), seed=seed, params=params, progress=progress, desc=desc)
