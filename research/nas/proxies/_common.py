"""What the proxies share: kernel filters, the loss, gradients at initialisation, activity weights.

A proxy sees a network as an NNX module ``model(images) -> logits``. "Layer weights" are the
kernels of its conv and linear layers (the ``kernel`` parameters); biases and norm parameters are
not layer weights. A masked super-network (``research.nas.nb201``) tells through
``model.active_weight(path)`` which parameters its chosen cell switches off; every other model has
all of them active.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def is_kernel(path, value) -> bool:
    return isinstance(value, nnx.Param) and path[-1] == "kernel"


def active_weight(model: nnx.Module, path: tuple):
    fn = getattr(model, "active_weight", None)
    return 1.0 if fn is None else fn(tuple(path))


def train_copy(graphdef, *states) -> nnx.Module:
    """A fresh module from split states, in training mode (BN uses batch statistics)."""
    model = nnx.merge(graphdef, *states, copy=True)  # fresh Variables: safe to mutate in a trace
    model.train()
    return model


def require_taps(recorded: list, proxy: str) -> list:
    """``recorded`` (the taps a forward pass recorded); a ValueError naming ``proxy`` when the network
    called none: it reads activations through ``research.models.taps``, and a network that calls
    ``jax.nn.relu`` directly would otherwise score -inf or 0 without a word."""
    if not recorded:
        raise ValueError(f"proxy {proxy} reads the network's activations through research.models.taps, and this "
                         f"network records none: call taps.relu (relu6, gelu) in its __call__ instead of jax.nn.relu")
    return recorded


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def kernel_loss(model: nnx.Module):
    """(loss(kernels, images, labels), kernels): the mean CE as a function of the layer weights,
    the rest of the state held fixed (network in training mode)."""
    graphdef, kernels, rest = nnx.split(model, is_kernel, ...)

    def loss(k, images, labels):
        return cross_entropy(train_copy(graphdef, k, rest)(images), labels)

    return loss, kernels


def kernel_grads(model: nnx.Module, images: jax.Array, labels: jax.Array):
    """(kernels, dL/dkernels) as flat {path: array} dicts, at the model's current weights."""
    loss, kernels = kernel_loss(model)
    grads = jax.grad(loss)(kernels, images, labels)
    return flat(kernels), flat(grads)


def flat(state) -> dict:
    return {path: v.get_value() if hasattr(v, "get_value") else v
            for path, v in nnx.to_flat_state(state)}
