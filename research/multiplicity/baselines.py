"""The two baselines dropout exploration is compared with (Hsu et al., ICLR 2024, Sec. 5).

**Re-training** (the expensive reference): the same recipe trained from other seeds; each run is
one model of the set R(eps) = {m : L(m) <= L_0 + eps}, L_0 the loss of the seed the dropout
models start from. ``retrained_set`` takes the training as a function, so an experiment passes
its own loop (research.recipes.classify.fit_classifier).

**Adversarial weight perturbation** (AWP; Hsu & Calmon, NeurIPS 2022): for each evaluation point
x_i and each class c, start from the reference weights w_0 and ascend the log-probability of c
at x_i,

    w_{t+1} = w_t + eta |w_0| g_t / |g_t|,     g_t = grad_w log softmax(f_{w_t}(x_i))_c,

(a normalised step of ``step_size`` times the weights' norm: one eta fits every model), until the
loss on the evaluation set leaves the set. For each eps the model kept for target (i, c) is the
last iterate before the first one with L > L_0 + eps. Every kept model is evaluated on all N
points, so the AWP set is a set of models like the others: (T = points x classes, N, C).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from research.core import config as config_lib
from research.multiplicity.dropout import DropoutEnsemble


@dataclasses.dataclass(frozen=True)
class AWPConfig:
    """The ``awp`` section: which targets and how far each is pushed."""
    points: int = 0                # the first N evaluation points are targets (0 = all of them)
    steps: int = 30                # ascent steps per target
    step_size: float = 5e-4        # eta: each step moves the weights by eta |w_0|
    targets_per_chunk: int = 4     # targets vmapped in one call

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "points", self.points >= 0, "an int >= 0 (0 = every evaluation point)")
        config_lib.require(self, "steps", self.steps >= 1, "an int >= 1")
        config_lib.require(self, "step_size", self.step_size > 0, "a positive float")
        config_lib.require(self, "targets_per_chunk", self.targets_per_chunk >= 1, "an int >= 1")


@dataclasses.dataclass
class ModelSet:
    """Models of a baseline evaluated on the N points: the set at each eps and the cost."""
    probs_by_eps: dict[float, np.ndarray]  # eps -> (M_eps, N, C), the reference first
    losses: np.ndarray                     # (models explored,) loss of each explored model
    seconds: float
    models_explored: int

    @property
    def seconds_per_model(self) -> float:
        return self.seconds / max(self.models_explored, 1)

    def set_probs(self, eps: float) -> np.ndarray:
        return self.probs_by_eps[float(eps)]


def retrained_set(train: Callable[[int], tuple[nnx.Module, float]], seeds: Sequence[int], inputs: np.ndarray, labels: np.ndarray,
                  reference_probs: np.ndarray, reference_loss: float, epsilons: Sequence[float], *,
                  preprocess=lambda x: x, batch_size: int = 512, mesh=None) -> ModelSet:
    """``train(seed)`` -> (eval-mode model, seconds its training took) for every seed; keep the models
    within each eps. The cost is the training seconds (as ``train`` reports them, so a run restored
    from its checkpoint keeps its first measurement) plus the evaluation."""
    probs, losses, train_seconds = [], [], 0.0
    for seed in seeds:
        model, seconds = train(seed)
        train_seconds += seconds
        t0 = time.perf_counter()
        p, loss = DropoutEnsemble(model, "bernoulli", preprocess=preprocess, batch_size=batch_size,
                                  mesh=mesh).reference(inputs, labels)
        probs.append(p)
        losses.append(loss)
        train_seconds += time.perf_counter() - t0
    probs, losses = np.stack(probs), np.asarray(losses)
    by_eps = {float(eps): np.concatenate([reference_probs[None], probs[losses <= reference_loss + eps]])
              for eps in epsilons}
    return ModelSet(by_eps, losses, train_seconds, len(seeds))


def awp_set(model: nnx.Module, inputs: np.ndarray, labels: np.ndarray, points: Sequence[int],
            reference_probs: np.ndarray, reference_loss: float, epsilons: Sequence[float],
            config: AWPConfig = AWPConfig(), *, preprocess=lambda x: x, progress: bool = False) -> ModelSet:
    """AWP around ``model`` (eval mode) for the targets (i, c), i in ``points``, c every class.
    All N points are evaluated together at every step (N x targets_per_chunk rows per call)."""
    steps, step_size = config.steps, config.step_size
    start = time.perf_counter()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x_all = jnp.asarray(inputs)
    y_all = jnp.asarray(labels)
    bounds = reference_loss + jnp.asarray(epsilons, jnp.float32)  # (E,)
    num_classes = reference_probs.shape[-1]
    w0_norm = jnp.sqrt(sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params)))

    def logits(p, x):
        return nnx.merge(graphdef, p, rest)(preprocess(x)).astype(jnp.float32)

    def one_target(point, cls):
        x_i = x_all[point][None]

        def objective(p):
            return jax.nn.log_softmax(logits(p, x_i))[0, cls]

        def step(carry, _):
            p, kept, alive = carry
            g = jax.grad(objective)(p)
            g_norm = jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(g)))
            p = jax.tree.map(lambda w, d: w + step_size * w0_norm * d / (g_norm + 1e-12), p, g)
            probs = jax.nn.softmax(logits(p, x_all), -1)
            loss = -jnp.mean(jnp.log(jnp.maximum(jnp.take_along_axis(probs, y_all[:, None], -1)[:, 0], 1e-12)))
            alive = alive & (loss <= bounds)
            kept = jnp.where(alive[:, None, None], probs[None], kept)
            return (p, kept, alive), loss

        kept0 = jnp.broadcast_to(jnp.asarray(reference_probs)[None], (len(bounds),) + reference_probs.shape)
        (_, kept, _), losses = jax.lax.scan(step, (params, kept0, jnp.ones(len(bounds), bool)), None, length=steps)
        return kept, losses

    run = jax.jit(jax.vmap(one_target))
    targets = np.array([(i, c) for i in points for c in range(num_classes)], np.int32)
    kept, losses = [], []
    for first in tqdm.trange(0, len(targets), config.targets_per_chunk, desc="AWP targets", unit="chunk",
                             disable=not progress):
        chunk = targets[first:first + config.targets_per_chunk]
        k, loss = run(jnp.asarray(chunk[:, 0]), jnp.asarray(chunk[:, 1]))
        kept.append(np.asarray(k))
        losses.append(np.asarray(loss))
    kept = np.concatenate(kept)  # (T, E, N, C)
    by_eps = {float(eps): np.concatenate([reference_probs[None], kept[:, e]]) for e, eps in enumerate(epsilons)}
    return ModelSet(by_eps, np.concatenate(losses).reshape(-1), time.perf_counter() - start, len(targets))
