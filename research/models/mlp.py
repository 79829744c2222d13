"""Multi-layer perceptron on flattened images.

(N, H, W, C) -> (N, H*W*C) -> hidden Linear + ReLU layers ``model.layers`` -> ``head``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from research.models import taps
from research.core.mesh import HEAD_SHARDING, logical

_init = nnx.initializers.lecun_normal()


class MLP(nnx.Module):
    """Input (N, H, W, C), or any (N, ...) of in_features per row; output (N, classes) float32."""

    def __init__(self, in_features: int, hidden_sizes: Sequence[int] = (512, 256), *,
                 num_classes: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.dtype = dtype
        layers = []
        for size in hidden_sizes:
            layers.append(nnx.Linear(
                in_features, size,
                kernel_init=logical(_init, ("embed", "mlp")),
                dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
            ))
            in_features = size
        self.layers = nnx.List(layers)
        self.head = nnx.Linear(
            in_features, num_classes,
            kernel_init=logical(_init, HEAD_SHARDING),
            dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )

    def embedding(self, x: jax.Array) -> jax.Array:
        """The head's input: the last hidden layer (N, hidden_sizes[-1]), or the flat input."""
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for layer in self.layers:
            x = taps.relu(layer(x))
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.embedding(x)).astype(jnp.float32)


def mlp(*, num_classes: int, input_shape: tuple[int, int, int], rngs: nnx.Rngs,
        dtype=jnp.float32, hidden_sizes: Sequence[int] = (512, 256)) -> MLP:
    """MLP with ``hidden_sizes`` ReLU layers (``()`` gives logistic regression)."""
    height, width, channels = input_shape
    return MLP(height * width * channels, tuple(hidden_sizes), num_classes=num_classes,
               rngs=rngs, dtype=dtype)
