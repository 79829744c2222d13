"""Gradient-based pruning-at-init saliencies used as NAS proxies (Abdelfattah et al., ICLR 2021),
each summed over the layer weights (conv and linear kernels) at initialisation, mean CE loss on one
batch, network in training mode:

    grad_norm = sum_l ||dL/dW_l||_2
    SNIP      = sum |W * dL/dW|
    GraSP     = -sum W * (H g),  g = dL/dW held constant, H the Hessian of L (a Hessian-vector
                product, one forward-over-reverse pass)
    Fisher    = sum over activations a, channels c of 1/2 mean_n (sum_spatial a * dL/da)^2,
                a the output of every ReLU-like nonlinearity (``research.models.taps``)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.models import taps
from research.nas.proxies._common import cross_entropy, flat, kernel_grads, kernel_loss, require_taps, train_copy


def grad_norm(model: nnx.Module, batch: dict, key=None) -> jax.Array:
    _, grads = kernel_grads(model, batch["image"], batch["label"])
    return sum((jnp.linalg.norm(g.ravel()) for g in grads.values()), jnp.zeros(()))


def snip(model: nnx.Module, batch: dict, key=None) -> jax.Array:
    weights, grads = kernel_grads(model, batch["image"], batch["label"])
    return sum((jnp.sum(jnp.abs(weights[p] * grads[p])) for p in grads), jnp.zeros(()))


def grasp(model: nnx.Module, batch: dict, key=None) -> jax.Array:
    loss, kernels = kernel_loss(model)
    images, labels = batch["image"], batch["label"]
    grad = lambda k: jax.grad(loss)(k, images, labels)  # noqa: E731
    g = jax.lax.stop_gradient(grad(kernels))
    _, hg = jax.jvp(grad, (kernels,), (g,))
    weights, hg = flat(kernels), flat(hg)
    return -sum((jnp.sum(weights[p] * hg[p]) for p in hg), jnp.zeros(()))


def fisher(model: nnx.Module, batch: dict, key=None) -> jax.Array:
    graphdef, state = nnx.split(model)
    images, labels = batch["image"], batch["label"]

    def run(probes):
        with taps.recording(probes) as recorder:
            loss = cross_entropy(train_copy(graphdef, state)(images), labels)
        return loss, recorder.taps

    _, shapes = jax.eval_shape(lambda: run(None))
    probes = taps.zeros_like_outputs(require_taps(shapes, "fisher"))
    (_, recorded), grads = jax.value_and_grad(run, has_aux=True)(probes)
    total = jnp.zeros(())
    for tap, g in zip(recorded, grads):
        a = tap.post.reshape(tap.post.shape[0], -1, tap.post.shape[-1])  # (N, positions, C)
        per_channel = jnp.sum(a * g.reshape(a.shape), axis=1)  # (N, C)
        total += tap.active * jnp.sum(0.5 * jnp.mean(per_channel**2, axis=0))
    return total
