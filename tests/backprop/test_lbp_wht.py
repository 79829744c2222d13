"""LBP-WHT: sequency bases, exact forward, backward = the paper's projected-gradient formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.backprop.lbp_wht import (
    LbpWhtDotGeneral,
    lbp_wht_cost,
    lbp_wht_matmul,
    lbp_wht_matmul_reference,
    lowpass_indices,
    sequency_hadamard,
    wht_bases,
)

C_IN, C_OUT = 6, 4


def inputs(grid, prefix, batch=2, seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    t = prefix + grid[0] * grid[1]
    return (jax.random.normal(kx, (batch, t, C_IN)), jax.random.normal(kw, (C_IN, C_OUT)),
            jax.random.normal(kg, (batch, t, C_OUT)))


def grads(fn, x, w, g):
    return jax.vjp(fn, x, w)[1](g)


def exact(x, w, g):
    return grads(lambda x, w: x @ w, x, w, g)


def spec_grads(x, w, g, grid, prefix, k, block=8):
    """The spec's equations with explicit loops over blocks and bases, zero padding, in float64."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    n, h, wd = x.shape[0], *grid
    hp, wp = -(-h // block) * block, -(-wd // block) * block
    xg, gg = np.zeros((n, hp, wp, C_IN)), np.zeros((n, hp, wp, C_OUT))
    xg[:, :h, :wd] = x[:, prefix:].reshape(n, h, wd, C_IN)
    gg[:, :h, :wd] = g[:, prefix:].reshape(n, h, wd, C_OUT)
    hadamard = sequency_hadamard(block)
    gx = np.zeros_like(xg)
    gw = x[:, :prefix].reshape(-1, C_IN).T @ g[:, :prefix].reshape(-1, C_OUT)  # prefix: exact
    for bi in range(hp // block):
        for bj in range(wp // block):
            blk = (slice(None), slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block))
            for r in range(block):
                for c in range(block):
                    if r + c >= k:
                        continue
                    basis = np.outer(hadamard[r], hadamard[c])
                    x_t = np.einsum("nijc,ij->nc", xg[blk], basis)                  # X~_s
                    g_t = np.einsum("nijo,ij->no", gg[blk], basis) / block**2       # G~_s
                    gx[blk] += (g_t @ w.T)[:, None, None, :] * basis[None, :, :, None]
                    gw += x_t.T @ g_t
    gx_prefix = g[:, :prefix] @ w.T
    return np.concatenate([gx_prefix, gx[:, :h, :wd].reshape(n, h * wd, C_IN)], axis=1), gw


def test_sequency_hadamard():
    for n in (1, 2, 4, 8, 16):
        h = sequency_hadamard(n)
        assert set(np.unique(h)) <= {-1.0, 1.0}
        np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
        np.testing.assert_array_equal((np.diff(h, axis=1) != 0).sum(axis=1), np.arange(n))
    with pytest.raises(ValueError, match="power of two"):
        sequency_hadamard(6)


def test_lowpass_indices():
    for k in range(1, 9):
        s = lowpass_indices(k)
        assert len(s) == k * (k + 1) // 2 == len(set(s))
        assert all(r + c < k for r, c in s)
    assert lowpass_indices(3) == ((0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0))
    assert sorted(lowpass_indices(15)) == [(r, c) for r in range(8) for c in range(8)]
    assert len(lowpass_indices(12)) == 64 - 6  # the 6 highest (r + c >= 12) dropped
    for bad in (0, 16):
        with pytest.raises(ValueError, match=r"\[1, 15\]"):
            lowpass_indices(bad)


def test_wht_bases_orthogonal():
    bases = wht_bases(6).reshape(21, 64)
    np.testing.assert_array_equal(bases @ bases.T, 64 * np.eye(21))
    np.testing.assert_array_equal(wht_bases(1)[0], np.ones((8, 8)))


def test_forward_is_exact():
    x, w, _ = inputs((10, 9), 1)
    np.testing.assert_array_equal(lbp_wht_matmul(x, w, grid=(10, 9), num_prefix_tokens=1), x @ w)
    y_ref = lbp_wht_matmul_reference(x, w, grid=(10, 9), num_prefix_tokens=1)
    np.testing.assert_array_equal(y_ref, x @ w)


@pytest.mark.parametrize("grid, prefix", [((7, 7), 1), ((5, 12), 0), ((8, 16), 2)])
def test_all_bases_give_exact_gradients(grid, prefix):
    # With all 64 bases the projection is the identity; zero padding must add no bias to grad_W.
    x, w, g = inputs(grid, prefix)
    got = grads(lambda x, w: lbp_wht_matmul(x, w, grid=grid, num_prefix_tokens=prefix, k=15), x, w, g)
    for a, b in zip(got, exact(x, w, g), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 4, 6])
def test_matches_spec_formulas(k):
    x, w, g = inputs((10, 9), 1)
    got = grads(lambda x, w: lbp_wht_matmul(x, w, grid=(10, 9), num_prefix_tokens=1, k=k), x, w, g)
    want = spec_grads(x, w, g, (10, 9), 1, k)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
    assert not np.allclose(got[1], exact(x, w, g)[1], atol=1e-2)  # really low-rank, not exact


@pytest.mark.parametrize("k", [1, 6, 15])
def test_reference_matches_custom_vjp(k):
    x, w, g = inputs((10, 9), 1)
    kw = {"grid": (10, 9), "num_prefix_tokens": 1, "k": k}
    got = grads(lambda x, w: lbp_wht_matmul(x, w, **kw), x, w, g)
    want = grads(lambda x, w: lbp_wht_matmul_reference(x, w, **kw), x, w, g)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_prefix_tokens_are_exact():
    x, w, g = inputs((10, 9), 3)
    g = g.at[:, 3:].set(0.0)  # gradient only on the prefix tokens
    gx, gw = grads(lambda x, w: lbp_wht_matmul(x, w, grid=(10, 9), num_prefix_tokens=3, k=2), x, w, g)
    gx_exact, gw_exact = exact(x, w, g)
    np.testing.assert_allclose(gx, gx_exact, atol=1e-5)
    np.testing.assert_allclose(gw, gw_exact, atol=1e-5)


def test_residuals_are_projected_activations():
    x, w, _ = inputs((10, 9), 1)
    _, vjp = jax.vjp(lambda x, w: lbp_wht_matmul(x, w, grid=(10, 9), num_prefix_tokens=1, k=6), x, w)
    shapes = sorted(leaf.shape for leaf in jax.tree.leaves(vjp))
    # kernel, prefix tokens, X~ with 21 bases of 2 x (2x2) blocks; never the full x.
    assert shapes == sorted([(C_IN, C_OUT), (2, 1, C_IN), (21, 2 * 4, C_IN)])


def test_batch_dims_jit_vmap():
    x, w, g = inputs((5, 12), 1, batch=6)
    fn = jax.jit(lambda x, w: lbp_wht_matmul(x, w, grid=(5, 12), num_prefix_tokens=1, k=4))
    want = grads(fn, x, w, g)
    x3, g3 = x.reshape(2, 3, *x.shape[1:]), g.reshape(2, 3, *g.shape[1:])
    gx, gw = grads(fn, x3, w, g3)  # two leading batch dims
    np.testing.assert_allclose(gx.reshape(x.shape), want[0], atol=1e-5)
    np.testing.assert_allclose(gw, want[1], atol=1e-5)
    # vmap over examples: per-example kernel gradients sum to the batch gradient.
    per_example = jax.vmap(lambda x, g: grads(fn, x, w, g))(x, g)
    np.testing.assert_allclose(per_example[0], want[0], atol=1e-5)
    np.testing.assert_allclose(per_example[1].sum(0), want[1], atol=1e-4)


def test_bfloat16():
    x, w, g = inputs((10, 9), 1)
    def fn(x, w):
        return lbp_wht_matmul(x, w, grid=(10, 9), num_prefix_tokens=1, k=6)
    y, vjp = jax.vjp(fn, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    gx, gw = vjp(g.astype(jnp.bfloat16))
    assert y.dtype == gx.dtype == gw.dtype == jnp.bfloat16
    want = grads(fn, x, w, g)
    for a, b in zip((gx, gw), want, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.1, rtol=0.05)


def test_bad_arguments():
    x, w, _ = inputs((10, 9), 1)
    with pytest.raises(ValueError, match="tokens"):
        lbp_wht_matmul(x, w, grid=(9, 9), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"\[1, 15\]"):
        lbp_wht_matmul(x, w, grid=(10, 9), num_prefix_tokens=1, k=0)
    with pytest.raises(ValueError, match="nnx.Linear"):
        LbpWhtDotGeneral(grid=(10, 9), num_prefix_tokens=1)(x, w, (((1,), (0,)), ((), ())))


def test_nnx_linear():
    x, _, g = inputs((10, 9), 1)
    kw = {"grid": (10, 9), "num_prefix_tokens": 1, "k": 4}
    plain = nnx.Linear(C_IN, C_OUT, rngs=nnx.Rngs(0))
    layer = nnx.Linear(C_IN, C_OUT, rngs=nnx.Rngs(0))
    layer.dot_general = LbpWhtDotGeneral(**kw)
    np.testing.assert_array_equal(layer(x), plain(x))

    kernel = layer.kernel[...]
    want_x, want_kernel = grads(lambda x, w: lbp_wht_matmul_reference(x, w, **kw), x, kernel, g)
    graphdef, state = nnx.split(layer)
    hash(graphdef)  # static under jit
    assert nnx.merge(graphdef, state).dot_general == LbpWhtDotGeneral(**kw)

    @jax.jit
    def step(state, x):
        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x) * g)
        return jax.grad(loss, argnums=(0, 1))(state, x)

    grad_state, grad_x = step(state, x)
    np.testing.assert_allclose(grad_state["kernel"][...], want_kernel, atol=1e-4)
    np.testing.assert_allclose(grad_state["bias"][...], g.sum((0, 1)), atol=1e-4)  # bias exact
    np.testing.assert_allclose(grad_x, want_x, atol=1e-5)


def test_cost():
    full = lbp_wht_cost((14, 14), 1, 384, 384, k=15)
    assert full["num_bases"] == 64 and full["num_blocks"] == 4
    assert full["lbp_matmul_flops"] >= full["exact_flops"]
    big = lbp_wht_cost((16, 16), 0, 4096, 4096, k=6, batch=8)
    assert big["lbp_matmul_flops"] * 64 == big["exact_flops"] * 21
    assert big["flops_ratio"] == pytest.approx(64 / 21, rel=0.02)  # transforms: ~1% here
    assert big["exact_activation_bytes"] == 8 * 256 * 4096 * 4
    assert big["lbp_activation_bytes"] * 64 == big["exact_activation_bytes"] * 21
