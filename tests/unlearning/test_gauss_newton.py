"""Gauss-Newton training of the exact-theory recipe: one iteration solves a model linear in its
parameters, and on a network that is not linear it stops at a stationary point of the objective."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from research.core.config import FieldError
from research.data.pipeline import ImageArrays
from research.models.filters import bn_and_head
from research.unlearning.gauss_newton import fit_gauss_newton
from research.unlearning.model import Unlearnable
from research.unlearning.recipe import TrainRecipe
from research.unlearning.train import fit, recipe_gradient_norm
from tests.unlearning.small_problems import EXACT, WD, gradient_norm, linear_problem, tiny_cnn, train_to_convergence


def test_one_gauss_newton_iteration_trains_a_linear_model_to_its_minimum():
    u, retain, _, _ = linear_problem()
    want = ravel_pytree(train_to_convergence(u, retain, u.params))[0]  # L-BFGS, |grad| < 1e-6
    got, info = fit_gauss_newton(u, retain, WD, anchor=u.params, max_iterations=1)
    assert info["iterations"] == 1
    np.testing.assert_allclose(ravel_pytree(got)[0], want, atol=2e-6)
    # From there it finds nothing left to do: the predicted decrease is at float precision.
    _, again = fit_gauss_newton(u, retain, WD, anchor=u.params, params=got, max_iterations=5)
    assert (again["iterations"], again["stopped"]) == (0, "converged")


@pytest.fixture(scope="module")
def nonlinear_problem():
    """TinyCNN's BatchNorm affine parameters and head (not linear in them), 48 images of 3 classes."""
    model = tiny_cnn()
    u = Unlearnable.from_model(model, bn_and_head(model))
    rng = np.random.default_rng(5)
    data = ImageArrays(rng.integers(0, 256, (48, 6, 6, 1), dtype=np.uint8), rng.integers(0, 3, 48).astype(np.int32),
                       ("a", "b", "c"))
    return u, data


def test_gauss_newton_stops_at_a_stationary_point_of_a_nonlinear_model(nonlinear_problem):
    u, data = nonlinear_problem
    start = gradient_norm(u, data, u.params, u.params)
    got, info = fit_gauss_newton(u, data, WD, anchor=u.params, max_iterations=30, chunk_size=16)
    # Large residuals (random labels) make Gauss-Newton converge linearly, not in one step; the
    # damping adapts (13 iterations, |grad| 0.45 -> 2.0e-4, mu 0 -> 0.3).
    assert 1 < info["iterations"] < 30 and info["stopped"] == "converged" and info["mu"] > 0
    assert gradient_norm(u, data, got, u.params) < 1e-3 * start
    assert info["objective"] < 0.5 * float(jnp.mean(jnp.sum(
        (u.logits(u.params, jnp.asarray(data.images)) - jax.nn.one_hot(data.labels, 3)) ** 2, -1)))


def test_the_recipe_dispatches_to_gauss_newton_with_the_proximal_anchor(nonlinear_problem):
    u, data = nonlinear_problem
    recipe = TrainRecipe(subset="bn_and_head", loss="mse", optimizer="gauss_newton", epochs=30, weight_decay=WD)
    got = fit(u, data, recipe)
    want, _ = fit_gauss_newton(u, data, WD, anchor=u.params, max_iterations=30)
    np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(want)[0], atol=1e-6)
    assert recipe.steps(len(data)) == 30


def test_gauss_newton_with_cross_entropy_is_refused_naming_the_field():
    with pytest.raises(FieldError, match="TrainRecipe.optimizer = 'gauss_newton' is not allowed; expected sgd or lbfgs"):
        TrainRecipe(loss="ce", optimizer="gauss_newton")
    assert EXACT.optimizer == "lbfgs"  # the linear reference above stays L-BFGS: two optimisers, one minimum


def test_recipe_gradient_norm_is_the_gradient_of_the_full_objective_over_padded_chunks(nonlinear_problem):
    u, data = nonlinear_problem
    recipe = TrainRecipe(loss="mse", weight_decay=WD)
    moved = jax.tree.map(lambda p: p + 0.1, u.params)  # away from the anchor, so the decay term counts
    want = gradient_norm(u, data, moved, u.params)
    assert recipe_gradient_norm(u, data, recipe, moved, u.params, chunk_size=20) == pytest.approx(want, rel=1e-5)
