"""A classifier seen as a pure function of one parameter subset: the object every unlearning method takes.

``Unlearnable.from_model(model, subset, preprocess)`` splits an NNX model (in eval mode: BatchNorm
uses its running statistics, dropout is off) into

  params  the Params chosen by ``subset`` (an NNX filter): all of them for NTK scrubbing, the
          BatchNorm affine parameters (and head) or the visual prompts for Fast-NTK;
  others  everything else (frozen Params, BatchNorm statistics, RNG state), held fixed.

``logits(params, images)`` is then a pure, jit-able function of the subset, so ``jax.grad``,
``jax.jacrev`` and ``jax.jvp`` apply to it directly. Unlearning never switches BatchNorm to train
mode: the model stays a function of its parameters alone, which the NTK linearisation assumes.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from research.data.pipeline import ImageArrays
from research.unlearning.recipe import TrainRecipe

# preprocess(uint8 images (N, H, W, C)) -> model inputs; runs inside jit.
Preprocess = Callable[[jax.Array], jax.Array]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(graphdef, preprocess, params, others, images):
    model = nnx.merge(graphdef, params, others)
    return model(preprocess(images)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Unlearnable:
    """An eval-mode classifier split into the parameter subset being unlearned and the rest."""
    graphdef: nnx.GraphDef
    params: nnx.State
    others: nnx.State
    preprocess: Preprocess

    @classmethod
    def from_model(cls, model: nnx.Module, subset: nnx.filterlib.Filter = nnx.Param,
                   preprocess: Preprocess = lambda x: x.astype(jnp.float32) / 255.0) -> "Unlearnable":
        model.eval()
        graphdef, params, others = nnx.split(model, nnx.All(nnx.Param, subset), ...)
        if not jax.tree.leaves(params):
            raise ValueError("the parameter subset selects no Param of the model")
        return cls(graphdef, params, others, preprocess)

    def logits(self, params: nnx.State, images: jax.Array) -> jax.Array:
        """(N, H, W, C) uint8 -> (N, C) float32 logits with the subset set to ``params``."""
        return _logits(self.graphdef, self.preprocess, params, self.others, images)

    def with_params(self, params: nnx.State) -> "Unlearnable":
        return dataclasses.replace(self, params=params)

    def to_model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.others)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    def flat(self) -> tuple[jax.Array, Callable[[jax.Array, jax.Array], jax.Array], Callable]:
        """(theta (P,), fn(theta, images) -> logits, unravel(theta) -> params): the subset as one vector."""
        theta, unravel = ravel_pytree(self.params)

        def fn(theta, images):
            return self.logits(unravel(theta), images)
        return theta, fn, unravel

    def predict(self, images: np.ndarray, batch_size: int = 500, params: nnx.State | None = None) -> np.ndarray:
        """Logits of every image, in batches: (N, C) float32 numpy."""
        params = self.params if params is None else params
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            # Pad the last batch so every call has one shape (one compilation).
            padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), 0)]) \
                if len(chunk) < batch_size and len(images) > batch_size else chunk
            out.append(np.asarray(self.logits(params, jnp.asarray(padded)))[:len(chunk)])
        return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class ForgetProblem:
    """One unlearning request.

    trained      the model trained on D = retain + forget, w(D) (its subset ``params``);
    init_params  the subset's values before that training, w_init (pre-trained weights, fresh head):
                 where retraining on D_r starts, and the anchor of the recipe's proximal decay;
    retain, forget, test  the three splits (uint8 images, int labels of ``trained``'s classes);
    recipe       how w(D) was trained: retraining repeats it on D_r, the baselines keep its weight
                 decay, the NTK scrub linearises its objective (loss, ridge N * weight_decay).
    """
    trained: Unlearnable
    init_params: nnx.State
    retain: ImageArrays
    forget: ImageArrays
    test: ImageArrays
    recipe: TrainRecipe = TrainRecipe()

    @property
    def num_classes(self) -> int:
        return self.retain.num_classes

    @property
    def init(self) -> Unlearnable:
        """The model at w_init."""
        return self.trained.with_params(self.init_params)
