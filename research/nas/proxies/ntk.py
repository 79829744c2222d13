"""TE-NAS's NTK condition number (Chen et al., ICLR 2021), oriented so that higher is better:

    ntk = -lambda_max(Theta) / lambda_min(Theta),  Theta = J J^T

J (N x P): row n is the gradient of sample n's summed logits with respect to the layer weights
(conv and linear kernels), on one batch in training mode. TE-NAS prefers a small condition number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.nas.proxies._common import is_kernel, train_copy


def ntk(model: nnx.Module, batch: dict, key=None) -> jax.Array:
    graphdef, kernels, rest = nnx.split(model, is_kernel, ...)
    images = batch["image"]

    def per_sample_sums(k):
        return jnp.sum(train_copy(graphdef, k, rest)(images), axis=1)  # (N,)

    jac = jax.jacrev(per_sample_sums)(kernels)
    rows = jnp.concatenate([j.reshape(images.shape[0], -1) for j in jax.tree.leaves(jac)], axis=1)
    eigenvalues = jnp.linalg.eigvalsh(rows @ rows.T)
    return -eigenvalues[-1] / eigenvalues[0]
