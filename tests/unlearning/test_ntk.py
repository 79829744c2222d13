"""Empirical NTK: both modes against a jax.jacrev reference, the ridge solve in both spaces, sharding,
and NTK scrubbing's exactness on a model that is linear in its parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.core.mesh import make_mesh
from research.data.pipeline import ImageArrays
from research.models.filters import bn_and_head, head
from research.unlearning import ntk
from research.unlearning.model import ForgetProblem, Unlearnable
from research.unlearning.ntk_scrub import NTKScrubConfig, ntk_scrub, trapezium_scale
from tests.unlearning.small_problems import EXACT, linear_problem, tiny_cnn, train_to_convergence


def images(n, seed=0, size=6):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def reference_ntk(fn, theta, xa, xb):
    ja = jax.jacrev(fn)(theta, jnp.asarray(xa))  # (Na, C, P): per-sample because samples are independent
    jb = jax.jacrev(fn)(theta, jnp.asarray(xb))
    return np.einsum("ncp,mdp->ncmd", ja, jb).reshape(ja.shape[0] * ja.shape[1], -1)


@pytest.mark.parametrize("subset", ["all", "bn_and_head"])
@pytest.mark.parametrize("mode", ntk.NTK_MODES)
def test_ntk_modes_equal_jacrev_reference(subset, mode):
    model = tiny_cnn()
    u = Unlearnable.from_model(model, nnx.Param if subset == "all" else bn_and_head(model))
    theta, fn, _ = u.flat()
    xa, xb = images(7, 0), images(5, 1)
    want = reference_ntk(fn, theta, xa, xb)
    got = np.asarray(ntk.empirical_ntk(fn, theta, xa, xb, mode=mode, chunk_size=3))
    assert got.shape == (21, 15)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    sym = np.asarray(ntk.empirical_ntk(fn, theta, xa, mode=mode, chunk_size=4))
    np.testing.assert_allclose(sym, reference_ntk(fn, theta, xa, xa), atol=1e-5 * np.abs(want).max())


def test_subset_jacobian_is_the_full_jacobians_columns():
    model = tiny_cnn()
    full = Unlearnable.from_model(model, nnx.Param)
    part = Unlearnable.from_model(tiny_cnn(), head(model))
    x = images(4)
    j_full = np.asarray(ntk.jacobian(*full.flat()[1::-1], x, chunk_size=4))
    j_head = np.asarray(ntk.jacobian(*part.flat()[1::-1], x, chunk_size=4))
    # ravel_pytree orders leaves by path: bn, conv, head -> the head's bias and kernel come last.
    np.testing.assert_allclose(j_full[..., -j_head.shape[-1]:], j_head, atol=1e-6)


def test_ntk_vector_product_equals_kernel_times_vector():
    u = Unlearnable.from_model(tiny_cnn())
    theta, fn, _ = u.flat()
    x = images(9)
    v = np.random.default_rng(2).normal(size=(9, 3)).astype(np.float32)
    want = reference_ntk(fn, theta, x, x) @ v.reshape(-1)
    got = np.asarray(ntk.ntk_vector_product(fn, theta, x, v, chunk_size=4)).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_ridge_solve_in_sample_and_parameter_space_agree():
    rng = np.random.default_rng(0)
    for m, p in [(12, 40), (40, 12)]:
        j = jnp.asarray(rng.normal(size=(m, p)), jnp.float32)
        r = rng.normal(size=m)
        a = np.asarray(ntk.ridge_solve(j, r, 0.3, space="samples"))
        b = np.asarray(ntk.ridge_solve(j, r, 0.3, space="parameters"))
        jn = np.asarray(j, np.float64)
        want = jn.T @ np.linalg.solve(jn @ jn.T + 0.3 * np.eye(m), r)
        np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="solve space"):
        ntk.ridge_solve(j, r, 0.3, space="rows")


@pytest.mark.parametrize("threaded_max_n", [ntk.THREADED_CHOLESKY_MAX_N, 0])  # threaded, then one thread
def test_cholesky_solve_matches_numpy_and_leaves_its_input_alone(monkeypatch, threaded_max_n):
    monkeypatch.setattr(ntk, "THREADED_CHOLESKY_MAX_N", threaded_max_n)
    rng = np.random.default_rng(3)
    a = rng.normal(size=(30, 12))
    kernel = a @ a.T  # rank 12 < 30: only the ridge makes it invertible
    before = kernel.copy()
    rhs = rng.normal(size=30)
    got = ntk.cholesky_solve(kernel, rhs, 0.1)
    np.testing.assert_allclose(got, np.linalg.solve(kernel + 0.1 * np.eye(30), rhs), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(kernel, before)


@pytest.mark.slow
def test_cholesky_solve_of_a_20000_kernel_does_not_crash():
    """Regression: the threaded OpenBLAS Cholesky segfaulted here (kills the process); 3.2 GB, ~1 min."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 64))
    rhs = rng.normal(size=20000)
    x = ntk.cholesky_solve(a @ a.T, rhs, 1.0)
    np.testing.assert_allclose(a @ (a.T @ x) + x, rhs, rtol=1e-6, atol=1e-6)


def test_nested_ridge_solves_equal_two_separate_solves_in_both_spaces():
    rng = np.random.default_rng(1)
    for n, c, p in [(6, 3, 40), (10, 3, 8)]:  # sample space wins, then parameter space
        jac = jnp.asarray(rng.normal(size=(n, c, p)), jnp.float32)
        r = rng.normal(size=(n, c))
        for space in ("auto", "samples", "parameters"):
            got_all, got_first = ntk.nested_ridge_solves(jac, r, 4, 0.5, 0.2, space=space)
            want_all = ntk.ridge_solve(jac, r, 0.5, space="samples")
            want_first = ntk.ridge_solve(jac[:4], r[:4], 0.2, space="samples")
            np.testing.assert_allclose(np.asarray(got_all), np.asarray(want_all), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.asarray(got_first), np.asarray(want_first), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="n_first"):
        ntk.nested_ridge_solves(jac, r, 0, 0.5, 0.2)


def test_jacobian_sharded_on_eight_devices_equals_one_device():
    u = Unlearnable.from_model(tiny_cnn())
    theta, fn, _ = u.flat()
    x = images(20)
    one = np.asarray(ntk.jacobian(fn, theta, x, chunk_size=8))
    mesh = make_mesh({"data": 8, "model": 1})
    eight = np.asarray(ntk.jacobian(fn, theta, x, chunk_size=8, mesh=mesh))
    np.testing.assert_allclose(eight, one, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the mesh"):
        ntk.jacobian(fn, theta, x, chunk_size=6, mesh=mesh)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown NTK mode 'exact'"):
        ntk.empirical_ntk(lambda t, x: x, jnp.zeros(1), images(2), mode="exact")
    with pytest.raises(ValueError, match="NTKScrubConfig.scale = 'half' is not allowed; choose one of: trapezium, none"):
        NTKScrubConfig(scale="half")


# ---------------------------------------------------------------- scrubbing a linear model is retraining

@pytest.fixture(scope="module")
def linear_forget_problem():
    """(problem, weights retrained on D_r) for the linear model, both trained to convergence."""
    u, retain, forget, test = linear_problem()
    init = u.params
    both = ImageArrays(np.concatenate([retain.images, forget.images]), np.concatenate([retain.labels, forget.labels]),
                       retain.label_names)
    trained = u.with_params(train_to_convergence(u, both, init))
    retrained = train_to_convergence(u, retain, init)
    return ForgetProblem(trained, init, retain, forget, test, EXACT), retrained


def test_ntk_scrub_of_a_linear_model_equals_retraining_on_the_retain_set(linear_forget_problem):
    problem, retrained = linear_forget_problem
    want = jax.flatten_util.ravel_pytree(retrained)[0]
    before = float(jnp.abs(jax.flatten_util.ravel_pytree(problem.trained.params)[0] - want).max())
    assert before > 1e-2  # forgetting must move the weights
    for space in ("samples", "parameters"):
        for mode in ntk.NTK_MODES if space == "samples" else ("jacobian",):
            config = NTKScrubConfig(scale="none", linearize_at="init", mode=mode, space=space, chunk_size=16)
            scrubbed, info = ntk_scrub(problem, config)
            got = jax.flatten_util.ravel_pytree(scrubbed)[0]
            assert float(jnp.abs(got - want).max()) <= 1e-5, (space, mode)
            assert info["space"] == space


def test_the_trapezium_scale_of_an_exactly_linear_model_is_three(linear_forget_problem):
    # w(D) - w_init = w_complete exactly, so e = -dw and the notebook's rule predicts 3 |dw|:
    # the trapezium overshoots where the theory is exact, hence scale="none" for MSE to convergence.
    problem, _ = linear_forget_problem
    _, info = ntk_scrub(problem, NTKScrubConfig(scale="trapezium", linearize_at="init", chunk_size=16))
    assert info["cos"] == pytest.approx(-1.0, abs=1e-6)
    assert info["scale"] == pytest.approx(3.0, rel=1e-5)
    assert info["linear_error"] < 1e-5  # training moved w exactly as the linearisation predicts


def test_trapezium_scale_values():
    dw = np.array([1.0, 0.0])
    assert trapezium_scale(dw, -dw)[0] == pytest.approx(3.0)           # exactly linear model: e = -dw
    assert trapezium_scale(dw, np.array([0.0, 2.0]))[0] == pytest.approx(1.0)   # orthogonal error
    s, cos = trapezium_scale(dw, np.array([0.5, 0.0]))
    assert cos == pytest.approx(1.0) and s == pytest.approx(2.0)        # |dw| + 2 * 1 * 0.5


def test_fisher_noise_on_top_of_the_scrub_has_the_fisher_std():
    u, retain, forget, test = linear_problem()
    problem = ForgetProblem(u, u.params, retain, forget, test, EXACT)
    plain, _ = ntk_scrub(problem, NTKScrubConfig(scale="none"))
    noisy, _ = ntk_scrub(problem, NTKScrubConfig(scale="none", fisher_alpha=1e-4), seed=3)
    from research.unlearning.baselines import fisher_diagonal, fisher_noise_std
    std = jax.flatten_util.ravel_pytree(fisher_noise_std(fisher_diagonal(u, retain, params=plain), 1e-4))[0]
    z = (jax.flatten_util.ravel_pytree(noisy)[0] - jax.flatten_util.ravel_pytree(plain)[0]) / std
    assert abs(float(jnp.mean(z))) < 0.2 and abs(float(jnp.std(z)) - 1) < 0.15  # 51 entries of N(0, 1)
