"""A small jitted optimisation loop over an ``Unlearnable``'s parameter subset, shared by the baselines.

``minimize(unlearnable, loss_fn, next_batch, steps, tx)`` runs ``steps`` optax updates of
``loss_fn(params, batch, rng) -> scalar`` and returns the new params. Batches come from
``next_batch(step) -> dict of numpy arrays`` so the order is a pure function of the step.
``cross_entropy_loss`` and ``image_batches`` cover the common case (CE on (images, labels) pairs).
``fit`` trains with a ``TrainRecipe`` (recipe.py); ``recipe_optimizer`` is its SGD, which the
baselines share so that they keep the recipe's weight decay and its anchor w_init.
``recipe_gradient_norm`` measures how near a stationary point of the recipe's objective a run stopped.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from research.core import optim
from research.data.pipeline import ImageArrays
from research.unlearning.gauss_newton import fit_gauss_newton
from research.unlearning.model import Unlearnable
from research.unlearning.recipe import TrainRecipe

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


def squared_error(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """(1/2) |f(x) - onehot(y)|^2 per sample: logits (N, C), integer labels (N,) -> (N,)."""
    return 0.5 * jnp.sum((logits - jax.nn.one_hot(labels, logits.shape[-1])) ** 2, -1)


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


def mse(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over samples of (1/2) |f(x) - onehot(y)|^2: logits (N, C), integer labels (N,)."""
    return squared_error(logits, labels).mean()


LOSSES = {"ce": cross_entropy, "mse": mse}
PER_SAMPLE = {"ce": optax.softmax_cross_entropy_with_integer_labels, "mse": squared_error}


def data_loss(unlearnable: Unlearnable, name: str = "ce") -> LossFn:
    """loss(params, {"images", "labels"}, rng) = the mean ``name`` loss (ce | mse) of the model's logits:
    a recipe's data term (its weight decay is the optimiser's)."""
    per_batch = LOSSES[name]

    def loss(params, batch, rng):
        return per_batch(unlearnable.logits(params, batch["images"]), batch["labels"])
    return loss


def cross_entropy_loss(unlearnable: Unlearnable) -> LossFn:
    """loss(params, {"images", "labels"}, rng) = mean CE of the model's logits."""
    return data_loss(unlearnable, "ce")


def recipe_optimizer(recipe: TrainRecipe, steps: int, anchor: nnx.State | None = None,
                     **overrides) -> optax.GradientTransformation:
    """The recipe's SGD through the core optimiser; ``anchor`` is w_0 of its proximal decay (None:
    where the run starts). ``overrides``: OptimConfig fields a baseline sets itself (lr, ...)."""
    cfg = recipe.optim_config(**overrides)
    return optim.make_optimizer(cfg, steps, anchor=anchor if cfg.decay_toward == "init" else None)


def _penalty(recipe: TrainRecipe, params, anchor):
    diff = jax.tree.map(lambda p, a: p - a, params, anchor) if recipe.decay_toward == "init" else params
    return 0.5 * recipe.weight_decay * sum(jnp.sum(d ** 2) for d in jax.tree.leaves(diff))


def padded_chunks(data: ImageArrays, size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images, labels, mask) in order, every chunk ``size`` rows (the last padded with mask 0) so one
    compiled function serves them all; a split smaller than ``size`` is one unpadded chunk."""
    size = min(size, len(data))
    for start in range(0, len(data), size):
        rows = np.arange(start, start + size)
        valid = rows < len(data)
        rows = np.where(valid, rows, 0)
        yield data.images[rows], data.labels[rows], valid.astype(np.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _summed_loss_grad(loss, graphdef, preprocess, params, others, images, labels, mask):
    """grad_w sum_n mask_n loss(f(x_n; w), y_n) over one chunk."""
    def summed(p):
        logits = Unlearnable(graphdef, p, others, preprocess).logits(p, images)
        return jnp.sum(mask * PER_SAMPLE[loss](logits, labels))
    return jax.grad(summed)(params)


def mean_loss_gradient(unlearnable: Unlearnable, data: ImageArrays, loss: str = "ce",
                       params: nnx.State | None = None, chunk_size: int = 256) -> nnx.State:
    """grad_w of the mean ``loss`` (ce | mse) over all of ``data`` at ``params`` (default: the
    unlearnable's own), accumulated over padded chunks. A tree like the params."""
    params = unlearnable.params if params is None else params
    total = jax.tree.map(jnp.zeros_like, params)
    for images, labels, mask in padded_chunks(data, chunk_size):
        chunk = _summed_loss_grad(loss, unlearnable.graphdef, unlearnable.preprocess, params, unlearnable.others,
                                  jnp.asarray(images), jnp.asarray(labels), jnp.asarray(mask))
        total = jax.tree.map(jnp.add, total, chunk)
    return jax.tree.map(lambda g: g / len(data), total)


def recipe_gradient_norm(unlearnable: Unlearnable, data: ImageArrays, recipe: TrainRecipe, params: nnx.State,
                         anchor: nnx.State, chunk_size: int = 256) -> float:
    """|grad_w| of the recipe's full objective, mean loss(D) + (wd/2)|w - anchor|^2 (or |w|^2 when it
    decays toward 0), at ``params``: how far from a stationary point training left w."""
    decay = jax.grad(lambda p: _penalty(recipe, p, anchor))(params)
    grad = jax.tree.map(jnp.add, mean_loss_gradient(unlearnable, data, recipe.loss, params, chunk_size), decay)
    return float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grad))))


def fit_lbfgs(unlearnable: Unlearnable, data: ImageArrays, recipe: TrainRecipe, *, params: nnx.State | None = None,
              progress: bool = False, desc: str = "train") -> nnx.State:
    """Full-batch L-BFGS on loss(D) + (wd/2)|w - w_0|^2 (w_0 = the start) for ``recipe.epochs``
    iterations: training to convergence, where the linearised solution is exact for a linear model."""
    start = unlearnable.params if params is None else params
    data_term = data_loss(unlearnable, recipe.loss)
    batch = {"images": jnp.asarray(data.images), "labels": jnp.asarray(data.labels)}
    tx = optax.lbfgs()

    @jax.jit  # data and anchor are arguments: as closed-over constants XLA would try to fold the network
    def step(p, state, batch, anchor):
        def objective(w):
            return data_term(w, batch, None) + _penalty(recipe, w, anchor)
        value, grad = optax.value_and_grad_from_state(objective)(p, state=state)
        updates, state = tx.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(p, updates), state

    p, state = start, tx.init(start)
    for _ in tqdm.trange(recipe.epochs, disable=not progress, desc=desc, leave=False):
        p, state = step(p, state, batch, start)
    return p


def fit(unlearnable: Unlearnable, data: ImageArrays, recipe: TrainRecipe, *, params: nnx.State | None = None,
        seed: int = 0, progress: bool = False, desc: str = "train") -> nnx.State:
    """Train the subset on ``data`` with ``recipe`` from ``params`` (default: the unlearnable's own),
    the proximal decay anchored there. Returns the trained params."""
    if recipe.optimizer == "gauss_newton":
        start = unlearnable.params if params is None else params
        anchor = start if recipe.decay_toward == "init" else None
        return fit_gauss_newton(unlearnable, data, recipe.weight_decay, anchor=anchor, params=start,
                                max_iterations=recipe.epochs, progress=progress, desc=desc)[0]
    if recipe.optimizer == "lbfgs":
        return fit_lbfgs(unlearnable, data, recipe, params=params, progress=progress, desc=desc)
    steps = recipe.steps(len(data))
    return minimize(unlearnable, data_loss(unlearnable, recipe.loss), image_batches(data, recipe.batch_size, seed),
                    steps, recipe_optimizer(recipe, steps), seed=seed, params=params, progress=progress, desc=desc)
