"""Inference-time dropout on the outputs of every conv and linear layer: one mask, one model.

Hsu, Li, Hu, Chen (ICLR 2024) explore the Rashomon set of a trained network by dropout at
inference. With y_l the output of layer l (conv or linear, the logits layer included) for one
input, model m computes

    bernoulli:  y_l <- y_l * b_l / (1 - p),   b_l ~ Bernoulli(1 - p)   (element-wise)
    gaussian:   y_l <- y_l * (1 + p z_l),     z_l ~ N(0, 1)

with b_l, z_l of the shape of one sample's output (H, W, C) or (F,), drawn from
fold_in(key_m, l): **the mask is fixed per model across the whole evaluation set** (the reference
code resamples it per batch, so its "model" changes between batches; we do not), and model m is
reproducible from its key. p = 0 is the reference model exactly.

``with_output_dropout(model)`` returns a copy whose conv and linear layers are wrapped; the wrapped
model is the original unless it runs inside ``output_dropout(key, kind, rate)`` (read at trace
time, so it works under jit and vmap). ``DropoutEnsemble`` evaluates many models at once: vmap over
keys, chunked to fit memory, the points split over the mesh's ``data`` axis.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from research.core.mesh import to_host
from research.models.filters import conv_and_linear_layers

DROPOUT_KINDS = ("bernoulli", "gaussian")
_local = threading.local()


@dataclasses.dataclass(frozen=True)
class _Noise:
    key: jax.Array
    kind: str
    rate: jax.Array


@contextlib.contextmanager
def output_dropout(key: jax.Array, kind: Literal[DROPOUT_KINDS], rate) -> Iterator[None]:
    """Inside the block, wrapped layers apply the mask of model ``key`` at ``rate``."""
    if kind not in DROPOUT_KINDS:
        raise ValueError(f"dropout kind must be one of {DROPOUT_KINDS}, got {kind!r}")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(_Noise(key, kind, jnp.asarray(rate, jnp.float32)))
    try:
        yield
    finally:
        stack.pop()


def perturb(y: jax.Array, key: jax.Array, kind: str, rate: jax.Array) -> jax.Array:
    """Apply one model's noise to a batch of outputs y (B, ...): the same mask for every row."""
    shape = y.shape[1:]
    if kind == "bernoulli":
        keep = jax.random.bernoulli(key, 1.0 - rate, shape)
        return jnp.where(keep, y / (1.0 - rate).astype(y.dtype), jnp.zeros((), y.dtype))
    return y * (1.0 + rate * jax.random.normal(key, shape)).astype(y.dtype)


class OutputDropout(nnx.Module):
    """A conv or linear layer followed by the active model's mask (identity outside
    ``output_dropout``). ``index`` numbers the layer, so its mask is fold_in(key, index)."""

    def __init__(self, layer: nnx.Module, index: int):
        self.layer = layer
        self.index = index

    def __call__(self, x, *args, **kwargs):
        y = self.layer(x, *args, **kwargs)
        stack = getattr(_local, "stack", None)
        if not stack:
            return y
        noise = stack[-1]
        return perturb(y, jax.random.fold_in(noise.key, self.index), noise.kind, noise.rate)


def _child(node, name):
    return node[name] if isinstance(name, int) else getattr(node, name)


def _set_child(model: nnx.Module, path: tuple, child) -> None:
    node = model
    for name in path[:-1]:
        node = _child(node, name)
    if isinstance(path[-1], int):
        node[path[-1]] = child
    else:
        setattr(node, path[-1], child)


def with_output_dropout(model: nnx.Module) -> tuple[nnx.Module, int]:
    """(copy of ``model`` with every conv and linear layer wrapped in ``OutputDropout``, the number
    of wrapped layers). The original model is not changed."""
    copy = nnx.clone(model)
    layers = [(path, layer) for path, _, layer in conv_and_linear_layers(copy)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nnx.Conv or nnx.Linear layer to apply dropout to")
    for index, (path, layer) in enumerate(layers):
        _set_child(copy, path, OutputDropout(layer, index))
    return copy, len(layers)


class DropoutEnsemble:
    """Evaluates dropout models of one trained classifier on a fixed set of points.

    ``model`` must be in evaluation mode (BatchNorm with running statistics). ``preprocess(x)`` maps
    a host batch to the model's input. ``evaluate(keys, rate)`` returns the models' softmax outputs
    (M, N, C) float32 and their mean cross-entropy (M,) on (inputs, labels)."""

    def __init__(self, model: nnx.Module, kind: Literal[DROPOUT_KINDS], *, preprocess=lambda x: x,
                 mesh: Mesh | None = None, models_per_chunk: int = 16, batch_size: int = 512):
        if kind not in DROPOUT_KINDS:
            raise ValueError(f"dropout kind must be one of {DROPOUT_KINDS}, got {kind!r}")
        if models_per_chunk < 1 or batch_size < 1:
            raise ValueError(f"models_per_chunk and batch_size must be >= 1, got {models_per_chunk}, {batch_size}")
        wrapped, self.num_layers = with_output_dropout(model)
        self.graphdef, self.state = nnx.split(wrapped)
        self.kind, self.mesh = kind, mesh
        self.models_per_chunk, self.batch_size = models_per_chunk, batch_size
        self.preprocess = preprocess
        self._forward = jax.jit(self._probs)

    def _probs(self, state, x, keys, rate):
        def one(key):
            model = nnx.merge(self.graphdef, state)
            with output_dropout(key, self.kind, rate):
                return jax.nn.softmax(model(self.preprocess(x)).astype(jnp.float32), -1)
        return jax.vmap(one)(keys)

    def _batches(self, inputs: np.ndarray) -> Iterator[tuple[jax.Array, int]]:
        shards = self.mesh.shape["data"] if self.mesh is not None else 1
        size = -(-min(self.batch_size, len(inputs)) // shards) * shards
        for start in range(0, len(inputs), size):
            chunk = inputs[start:start + size]
            valid = len(chunk)
            if valid < size:  # pad so every batch splits over `data`; padded rows are dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - valid, 0)])
            x = jnp.asarray(chunk)
            if self.mesh is not None:
                x = jax.device_put(x, NamedSharding(self.mesh, P("data")))
            yield x, valid

    def reference(self, inputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        """Softmax outputs (N, C) and mean cross-entropy of the model itself (rate 0: no noise)."""
        probs, losses = self.evaluate(jax.random.PRNGKey(0)[None], 0.0, inputs, labels)
        return probs[0], float(losses[0])

    def evaluate(self, keys: jax.Array, rate: float, inputs: np.ndarray, labels: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Softmax outputs (M, N, C) and mean cross-entropy (M,) of the models ``keys`` (M, 2)."""
        if not 0.0 <= rate < 1.0 and self.kind == "bernoulli":
            raise ValueError(f"bernoulli dropout rate must be in [0, 1), got {rate}")
        if rate < 0.0:
            raise ValueError(f"dropout rate must be >= 0, got {rate}")
        batches = list(self._batches(inputs))  # placed on the mesh once, read by every chunk of models
        outs = []
        for first in range(0, len(keys), self.models_per_chunk):
            chunk_keys = keys[first:first + self.models_per_chunk]
            rows = [to_host(self._forward(self.state, x, chunk_keys, rate))[:, :valid] for x, valid in batches]
            outs.append(np.concatenate(rows, 1))
        probs = np.concatenate(outs, 0)
        picked = np.take_along_axis(probs, np.asarray(labels)[None, :, None].astype(np.int64), -1)[..., 0]
        losses = -np.mean(np.log(np.maximum(picked, 1e-12)), 1)
        return probs, losses
