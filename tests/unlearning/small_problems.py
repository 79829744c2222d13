"""Small unlearning problems shared by the NTK and Gauss-Newton tests: a conv-BN net whose Jacobian
is cheap, a model linear in its trainable parameters, and the exact-theory recipe with its gradient."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from research.data.pipeline import ImageArrays
from research.models import build_model
from research.models.filters import head
from research.unlearning.model import Unlearnable
from research.unlearning.recipe import TrainRecipe
from research.unlearning.train import fit


class TinyCNN(nnx.Module):
    """conv-BN-relu-pool-head: small enough that the full Jacobian is cheap."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=(1, 2)))


def tiny_cnn() -> nnx.Module:
    model = TinyCNN(nnx.Rngs(0))
    # Non-trivial BN statistics and affine parameters, so eval mode is not the identity.
    model.bn.mean.value = jnp.linspace(-0.1, 0.1, 4)
    model.bn.var.value = jnp.linspace(0.5, 2.0, 4)
    model.bn.scale.value = jnp.linspace(0.8, 1.2, 4)
    model.bn.bias.value = jnp.linspace(-0.2, 0.2, 4)
    return model


WD = 0.05


def linear_problem(n_retain=30, n_forget=10, classes=3):
    """A model linear in its trainable parameters: a frozen random-feature MLP whose head alone is trained."""
    model = build_model("mlp", num_classes=classes, input_shape=(4, 4, 1), rngs=nnx.Rngs(1), hidden_sizes=(16,))
    u = Unlearnable.from_model(model, head(model))
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (n_retain + n_forget + 10, 4, 4, 1), dtype=np.uint8)
    y = rng.integers(0, classes, len(x)).astype(np.int32)
    names = tuple(map(str, range(classes)))
    split = lambda a, b: ImageArrays(x[a:b], y[a:b], names)
    return u, split(0, n_retain), split(n_retain, n_retain + n_forget), split(n_retain + n_forget, len(x))


# The exact-theory recipe: mean MSE to one-hot targets + (WD/2)|w - w_init|^2, full-batch L-BFGS.
EXACT = TrainRecipe(subset="head", loss="mse", optimizer="lbfgs", epochs=100, weight_decay=WD, decay_toward="init")


def gradient_norm(u: Unlearnable, data: ImageArrays, params, anchor) -> float:
    """|grad L| of the mean MSE to one-hot + (WD/2)|w - anchor|^2 at ``params``, by jax.grad on the
    whole data at once (the independent reference for the library's chunked gradients)."""
    theta, fn, _ = u.with_params(params).flat()
    w0 = ravel_pytree(anchor)[0]
    x, targets = jnp.asarray(data.images), jax.nn.one_hot(data.labels, data.num_classes)

    def objective(t):
        return 0.5 * jnp.mean(jnp.sum((fn(t, x) - targets) ** 2, -1)) + 0.5 * WD * jnp.sum((t - w0) ** 2)
    return float(jnp.linalg.norm(jax.grad(objective)(theta)))


def train_to_convergence(u, data, init):
    """``fit`` with the exact-theory recipe, checked to have converged (the gradient vanishes)."""
    trained = fit(u, data, EXACT, params=init)
    assert gradient_norm(u, data, trained, init) < 1e-6
    return trained
