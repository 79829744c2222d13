"""ZiCo (Li et al., ICLR 2023): zero-shot proxy from the inverse coefficient of variation of the
gradients.

    ZiCo = sum_l log( sum_{w in layer l} mean_b |g_b(w)| / std_b(g_b(w)) )

g_b is the gradient of the mean cross-entropy on batch b at initialisation (network in training
mode, never updated). Layers are the kernels of every conv and linear layer. std is the
population std (ddof 0) of the signed gradients; a weight whose std is 0 is dropped, a layer whose
sum is 0 is skipped. The paper uses 2 batches of 128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.nas.proxies._common import flat, kernel_loss


def layer_scores(model: nnx.Module, batch: dict, num_batches: int = 2) -> dict:
    """{kernel path: log-term (0 for a skipped layer)}; ``batch`` is split into ``num_batches``
    equal batches (leftover images are not used)."""
    images, labels = batch["image"], batch["label"]
    size = images.shape[0] // num_batches
    if size == 0:
        raise ValueError(f"ZiCo needs >= {num_batches} images, got {images.shape[0]}")
    loss, kernels = kernel_loss(model)
    grad = jax.grad(loss)
    # Per-batch gradients: (num_batches, *kernel shape) for every kernel.
    per_batch = [flat(grad(kernels, images[b * size:(b + 1) * size], labels[b * size:(b + 1) * size]))
                 for b in range(num_batches)]
    scores = {}
    for path in per_batch[0]:
        g = jnp.stack([p[path] for p in per_batch]).astype(jnp.float32)
        std = jnp.std(g, axis=0)
        ratio = jnp.where(std > 0, jnp.mean(jnp.abs(g), axis=0) / jnp.where(std > 0, std, 1.0), 0.0)
        total = jnp.sum(ratio)
        scores[path] = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)), 0.0)
    return scores


def zico(model: nnx.Module, batch: dict, key=None, *, num_batches: int = 2) -> jax.Array:
    return sum(layer_scores(model, batch, num_batches).values(), jnp.zeros((), jnp.float32))
