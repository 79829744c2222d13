"""The proposition check's Jacobians: identity for an all-skip path, autodiff's per-sample Jacobian
for chains, and its sampled paths and correlations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.anytime import proposition


def path_forward(params, routes):
    """h_0 -> output of the last block along the path, for one sample (W,) -> (W,)."""
    def f(h):
        for route, layers in zip(routes, params["blocks"]):
            if route == "conv":
                for w, b in layers:
                    h = jax.nn.relu(h @ w + b)
        return h
    return f


@pytest.mark.parametrize("init", proposition.INITS)
def test_path_singular_values_are_those_of_the_autodiff_jacobian(init):
    params = proposition.init_mlp(jax.random.key(0), depth=3, width=6, in_dim=5, init=init)
    x = jax.random.normal(jax.random.key(1), (4, 5))
    routes = ("conv", "skip", "conv")
    got = proposition.path_singular_values(params, x, routes)
    w0, b0 = params["stem"]
    h0 = jax.nn.relu(x @ w0 + b0)
    jac = jax.vmap(jax.jacfwd(path_forward(params, routes)))(h0)  # (B, W, W)
    np.testing.assert_allclose(got, jnp.linalg.svd(jac, compute_uv=False), rtol=1e-5, atol=1e-6)
    assert float(got.std()) > 0
    # Skipping every block leaves d h / d h_0 = I: every singular value is 1.
    np.testing.assert_allclose(proposition.path_singular_values(params, x, ("skip",) * 3), 1.0)


def test_sampled_paths_cover_every_mix_without_repeats():
    paths = proposition.sample_paths(4, per_mix=2, rng=np.random.default_rng(0))
    counts = [sum(r == "conv" for r in p) for p in paths]
    assert sorted(set(counts)) == [0, 1, 2, 3, 4] and len(set(paths)) == len(paths)
    assert counts.count(0) == 1 and counts.count(2) == 2 and counts.count(4) == 1


def test_check_records_tps_and_sigma_per_path_and_correlates_them():
    x = np.random.default_rng(0).random((16, 3, 3), dtype=np.float32)
    records = proposition.check(x, depths=(2, 3), width=5, per_mix=2)
    assert {r.depth for r in records} == {2, 3}
    assert all(r.nodes == 1 + sum(3 if q == "conv" else 1 for q in r.routes) for r in records)
    rho = proposition.rank_correlations(records)
    assert set(rho) == {"spearman_sum", "spearman_sum_equal_nodes", "spearman_product", "spearman_product_equal_nodes"}
    assert all(-1.0 <= v <= 1.0 for v in rho.values() if not np.isnan(v))
    with pytest.raises(ValueError, match="one route per block: 2, got 1"):
        proposition.path_singular_values(proposition.init_mlp(jax.random.key(0), 2, 5, 9), jnp.ones((1, 9)), ("conv",))
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        proposition.init_mlp(jax.random.key(0), 2, init="xavier")
