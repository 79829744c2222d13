"""Proxies read from activations on one batch (network in training mode):

NASWOT (Mellor et al., ICML 2021):  log|K|,  K = sum over nonlinearities of c c^T + (1-c)(1-c)^T,
    c in {0,1}^(N x units) the codes "pre-activation > 0" of the batch; each nonlinearity of a
    switched-off operation (masked network) has weight 0.
Jacob_cov (Mellor et al., 2020):  -sum_i [log(l_i + k) + 1/(l_i + k)], k = 1e-5, l_i the
    eigenvalues of the correlation matrix of the per-sample input gradients of the summed output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.models import taps
from research.nas.proxies._common import require_taps, train_copy


def naswot(model: nnx.Module, batch: dict, key=None) -> jax.Array:
    images = batch["image"]
    with taps.recording() as recorder:
        model_copy = train_copy(*nnx.split(model))
        model_copy(images)
    require_taps(recorder.taps, "naswot")
    n = images.shape[0]
    kernel = jnp.zeros((n, n), jnp.float32)
    for tap in recorder.taps:
        c = (tap.pre.reshape(n, -1) > 0).astype(jnp.float32)
        kernel += tap.active * (c @ c.T + (1.0 - c) @ (1.0 - c).T)
    return jnp.linalg.slogdet(kernel)[1]


def input_jacobian(model: nnx.Module, images: jax.Array) -> jax.Array:
    """(N, H*W*C): row n is d(sum of all outputs)/d(image n) (training-mode forward)."""
    graphdef, state = nnx.split(model)
    grads = jax.grad(lambda x: jnp.sum(train_copy(graphdef, state)(x)))(images)
    return grads.reshape(images.shape[0], -1)


def jacob_cov(model: nnx.Module, batch: dict, key=None) -> jax.Array:
    jacobian = input_jacobian(model, batch["image"])
    eigenvalues = jnp.linalg.eigvalsh(jnp.corrcoef(jacobian))
    k = 1e-5
    return -jnp.sum(jnp.log(eigenvalues + k) + 1.0 / (eigenvalues + k))
