"""Test helper: BatchNorm layers with non-trivial values, so an eval-mode comparison tests them."""
import jax.numpy as jnp
import numpy as np
from flax import nnx


def randomise_batch_norms(model: nnx.Module, seed: int) -> None:
    """Set every BN layer's scale, bias, running mean and variance to random values (numpy draws:
    no per-shape JAX compilation)."""
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            c = node.scale.shape
            node.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            node.bias[...] = jnp.asarray(0.1 * rng.standard_normal(c), jnp.float32)
            node.mean[...] = jnp.asarray(0.1 * rng.standard_normal(c), jnp.float32)
            node.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
