"""Functional train and eval steps over an NNX model split at the jit boundary.

The model is split once into a graph definition and three states:
  params  the trainable parameters (an NNX filter chooses them: all, BN affine, head, ...),
  frozen  the other parameters,
  rest    everything else (BatchNorm statistics, RNG counters).
A step is a pure function of `TrainState` and a batch, jitted with shardings by the loop.

Losses return sums, not means, plus a `count`: gradients and metrics are divided by the total
count once, so a mean is exact however the batch is split (gradient accumulation, padding of an
uneven last batch, devices).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from research.core.mesh import LogicalRules, batch_sharding, replicated, state_shardings

# loss_fn(model, batch, rng) -> (loss_sum, metric_sums); metric_sums must contain "count".
# A train step's sums also carry these two, which are no per-example sums (research.core.loop reads them):
SKIPPED = "skipped_steps"              # 1 for a step skipped for a non-finite loss or gradient
LAST_FINITE_STEP = "last_finite_step"  # the step number when it updated, else -1; a window keeps the max
LossFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    frozen: nnx.State
    rest: nnx.State
    opt_state: Any
    rng: jax.Array


@flax.struct.dataclass
class ModelDefs:
    """Graph definitions of one model in train mode and in eval mode (BN, dropout)."""
    train: nnx.GraphDef = flax.struct.field(pytree_node=False)
    eval: nnx.GraphDef = flax.struct.field(pytree_node=False)


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param, train_mode: bool = True):
    """Splits `model` into (ModelDefs, params, frozen, rest); the model is left in train mode.

    `train_mode=False` trains with the eval-mode graph (BatchNorm running statistics, no dropout),
    as when fine-tuning a few layers of a frozen backbone.
    """
    model.eval()
    eval_def = nnx.graphdef(model)
    if train_mode:
        model.train()
    train_def, params, frozen, rest = nnx.split(model, nnx.All(nnx.Param, trainable), nnx.Param, ...)
    model.train()
    return ModelDefs(train_def, eval_def), params, frozen, rest


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation,
                       trainable: nnx.filterlib.Filter = nnx.Param, seed: int = 0, train_mode: bool = True):
    """Returns (ModelDefs, TrainState) with the optimizer initialised on the trainable params."""
    defs, params, frozen, rest = split_model(model, trainable, train_mode)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, rest=rest,
                       opt_state=tx.init(params), rng=jax.random.PRNGKey(seed))
    return defs, state


def classification_loss(preprocess: Callable[[jax.Array, jax.Array, bool], jax.Array],
                        label_smoothing: float = 0.0) -> tuple[LossFn, LossFn]:
    """Cross-entropy loss functions for training and evaluation of a classifier.

    batch: images (N, H, W, C) uint8, labels (N,) int32, mask (N,) float (0 for padding).
    `preprocess(images, rng, train)` augments and normalises on the device.
    Returns sums of loss, correct predictions and count over the unmasked examples.
    """
    def make(train: bool) -> LossFn:
        def loss_fn(model, batch, rng):
            x = preprocess(batch["images"], rng, train)
            logits = model(x).astype(jnp.float32)
            num_classes = logits.shape[-1]
            targets = optax.smooth_labels(jax.nn.one_hot(batch["labels"], num_classes),
                                          label_smoothing if train else 0.0)
            losses = optax.softmax_cross_entropy(logits, targets)
            mask = batch["mask"].astype(jnp.float32)
            correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
            return jnp.sum(losses * mask), {"loss": jnp.sum(losses * mask),
                                            "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
        return loss_fn
    return make(True), make(False)


def _microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """(B, ...) -> (n, B/n, ...), taking every n-th example so each device keeps its rows."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} is not divisible into {n} accumulation steps")
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(defs: ModelDefs, tx: optax.GradientTransformation, loss_fn: LossFn,
                    accum_steps: int = 1) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """One optimizer step: gradients of the mean loss over the batch, accumulated over
    `accum_steps` micro-batches (BatchNorm statistics update once per micro-batch)."""

    def grads_of(params, frozen, rest, batch, rng):
        def total_loss(p):
            # copy=True: fresh Variables in this trace, which NNX requires for BatchStat updates.
            model = nnx.merge(defs.train, p, frozen, rest, copy=True)
            loss_sum, sums = loss_fn(model, batch, rng)
            return loss_sum, (sums, nnx.state(model, nnx.Not(nnx.Param)))
        (_, (sums, new_rest)), grads = jax.value_and_grad(total_loss, has_aux=True)(params)
        return grads, sums, new_rest

    def step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum_steps == 1:
            grads, sums, rest = grads_of(state.params, state.frozen, state.rest, batch, rng)
        else:
            def body(carry, micro):
                acc, rest, i = carry
                g, s, rest = grads_of(state.params, state.frozen, rest, micro, jax.random.fold_in(rng, i))
                acc = jax.tree.map(jnp.add, acc, (g, s))
                return (acc, rest, i + 1), None
            micro = _microbatches(batch, accum_steps)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grads_of, state.params, state.frozen, state.rest, first, rng)[:2]
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # (grads, sums)
            ((grads, sums), rest, _), _ = jax.lax.scan(body, (zeros, state.rest, 0), micro)
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        # A non-finite loss or gradient skips the step: parameters, optimizer state and statistics stay
        # as they were, its metric sums count nothing, and the loop reads the skip from SKIPPED.
        finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
        updated = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state.replace(step=state.step + 1))
        sums = jax.tree.map(lambda v: jnp.where(finite, v, jnp.zeros_like(v)), dict(sums, grad_norm=grad_norm * sums["count"]))
        sums[SKIPPED] = 1.0 - finite.astype(jnp.float32)
        sums[LAST_FINITE_STEP] = jnp.where(finite, state.step + 1, -1).astype(jnp.float32)
        return new_state, sums

    return step


def make_eval_step(defs: ModelDefs, loss_fn: LossFn) -> Callable[[TrainState, dict], dict]:
    """Metric sums of the eval-mode model on one (possibly padded) batch."""
    def step(state: TrainState, batch):
        model = nnx.merge(defs.eval, state.params, state.frozen, state.rest)
        return loss_fn(model, batch, state.rng)[1]
    return step


def place_on_mesh(state: TrainState, mesh: Mesh, rules: LogicalRules = LogicalRules()) -> tuple[TrainState, Any]:
    """Puts `state` on `mesh` by its parameters' logical axis names under ``rules``; returns
    (state, shardings)."""
    shardings = state_shardings(state, mesh, rules)
    return jax.device_put(state, shardings), shardings


def jit_train_step(step_fn, shardings, mesh: Mesh):
    """jax.jit of a train step with the state's shardings kept and the batch split over `data`.
    The input state is donated: its buffers are reused for the new state."""
    return jax.jit(step_fn, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def jit_eval_step(step_fn, shardings, mesh: Mesh):
    return jax.jit(step_fn, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=replicated(mesh))
