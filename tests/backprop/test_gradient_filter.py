"""Gradient filtering: exact forward, the spec's backward, and the invariants that pin it down."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from research.backprop.gradient_filter import FilteredConv, backward_cost, filtered_conv, make_geometry

DN = ("NHWC", "HWIO", "NHWC")


def _conv_args(rng, n=2, hw=8, ci=4, co=6, k=3, groups=1):
    kx, kw = jax.random.split(rng)
    x = jax.random.normal(kx, (n, hw, hw, ci), jnp.float32)
    w = jax.random.normal(kw, (k, k, ci // groups, co), jnp.float32)
    return x, w


def _exact(x, w, stride, pad, groups, dilation=1):
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                    rhs_dilation=(dilation, dilation), dimension_numbers=DN,
                                    feature_group_count=groups)


def _filtered(x, w, stride, pad, groups, r, dilation=1):
    geometry = make_geometry(r, x.shape, w.shape, (stride, stride), ((pad, pad), (pad, pad)),
                             (dilation, dilation), groups)
    return filtered_conv(x, w, geometry)


def _grads(conv, x, w, g):
    _, pullback = jax.vjp(conv, x, w)
    return pullback(g)


def spec_filtered_grads(x, w, g, r, stride, groups):
    """The spec's backward written with explicit loops in numpy: pool, matmul, upsample."""
    x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
    n, h, wd, ci = x.shape
    _, _, ci_g, co = w.shape
    _, ho, wo, _ = g.shape
    co_g = co // groups
    p_h, p_w = math.ceil(ho / r), math.ceil(wo / r)
    before_h, before_w = (p_h * r - ho) // 2, (p_w * r - wo) // 2
    g_mean = np.zeros((n, p_h, p_w, co))
    x_sum = np.zeros((n, p_h, p_w, ci))
    for p in range(p_h):
        for q in range(p_w):
            rows = [i for i in range(p * r - before_h, (p + 1) * r - before_h) if 0 <= i < ho]
            cols = [j for j in range(q * r - before_w, (q + 1) * r - before_w) if 0 <= j < wo]
            g_mean[:, p, q] = g[:, rows][:, :, cols].mean(axis=(1, 2))
            in_rows = [i for i in range(stride * (p * r - before_h), stride * ((p + 1) * r - before_h)) if 0 <= i < h]
            in_cols = [j for j in range(stride * (q * r - before_w), stride * ((q + 1) * r - before_w)) if 0 <= j < wd]
            x_sum[:, p, q] = x[:, in_rows][:, :, in_cols].sum(axis=(1, 2))
    w_sum = w.sum(axis=(0, 1))  # (Ci/G, Co)
    gx_coarse = np.zeros((n, p_h, p_w, ci))
    grad_io = np.zeros((ci_g, co))
    for c_out in range(co):
        group = c_out // co_g
        for c_local in range(ci_g):
            c_in = group * ci_g + c_local
            gx_coarse[..., c_in] += w_sum[c_local, c_out] * g_mean[..., c_out]
            grad_io[c_local, c_out] = (x_sum[..., c_in] * g_mean[..., c_out]).sum()
    grad_x = np.zeros_like(x)
    for i in range(h):
        for j in range(wd):
            p, q = (i + stride * before_h) // (r * stride), (j + stride * before_w) // (r * stride)
            if p < p_h and q < p_w:
                grad_x[:, i, j] = gx_coarse[:, p, q]
    return grad_x, np.broadcast_to(grad_io, w.shape)


CASES = [  # (hw, ci, co, k, stride, pad, groups, r)
    (8, 4, 6, 3, 1, 1, 1, 2),     # divisible grid
    (7, 4, 6, 3, 2, 1, 1, 2),     # stride 2, odd input: partial blocks at the border
    (7, 3, 5, 3, 1, 1, 1, 4),     # R = 4 on 7x7: one padded block row and column
    (8, 6, 6, 3, 1, 1, 6, 2),     # depthwise
    (8, 6, 12, 3, 2, 1, 6, 4),    # depthwise with channel multiplier 2, stride 2
    (8, 4, 6, 3, 1, 1, 2, 2),     # grouped
    (6, 4, 8, 1, 1, 0, 1, 4),     # 1x1 conv, 6 = one full and one half block
]


@pytest.mark.parametrize("hw,ci,co,k,stride,pad,groups,r", CASES)
def test_forward_is_exact_and_backward_is_the_spec(hw, ci, co, k, stride, pad, groups, r):
    x, w = _conv_args(jax.random.PRNGKey(hw * 7 + r), hw=hw, ci=ci, co=co, k=k, groups=groups)
    y = _filtered(x, w, stride, pad, groups, r)
    np.testing.assert_array_equal(y, _exact(x, w, stride, pad, groups))
    g = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    grad_x, grad_w = _grads(lambda a, b: _filtered(a, b, stride, pad, groups, r), x, w, g)
    want_x, want_w = spec_filtered_grads(x, w, g, r, stride, groups)
    np.testing.assert_allclose(grad_x, want_x, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(grad_w, want_w, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (2, 2), (1, 4)])
def test_patch_size_one_is_exact_backprop(stride, groups):
    x, w = _conv_args(jax.random.PRNGKey(3), ci=4, co=8, groups=groups)
    g = jax.random.normal(jax.random.PRNGKey(4), _exact(x, w, stride, 1, groups).shape)
    got = _grads(lambda a, b: _filtered(a, b, stride, 1, groups, 1), x, w, g)
    want = _grads(lambda a, b: _exact(a, b, stride, 1, groups), x, w, g)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r,groups", [(2, 1), (4, 1), (2, 2)])
def test_one_by_one_conv_with_block_constant_gradient_is_exact(r, groups):
    """No approximation is left when g_y is constant on the blocks and the kernel has one tap."""
    x, w = _conv_args(jax.random.PRNGKey(5), hw=8, ci=4, co=6, k=1, groups=groups)
    coarse = jax.random.normal(jax.random.PRNGKey(6), (2, 8 // r, 8 // r, 6))
    g = jnp.repeat(jnp.repeat(coarse, r, axis=1), r, axis=2)
    got = _grads(lambda a, b: _filtered(a, b, 1, 0, groups, r), x, w, g)
    want = _grads(lambda a, b: _exact(a, b, 1, 0, groups), x, w, g)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_dilated_rule_is_the_coarse_convolution():
    """Dilation d >= R: taps d / R patches apart on the patch grid, each tap its own gradient."""
    r, d = 2, 4
    x, w = _conv_args(jax.random.PRNGKey(7), hw=16, ci=3, co=5)
    g = jax.random.normal(jax.random.PRNGKey(8), _exact(x, w, 1, d, 1, dilation=d).shape)
    grad_x, grad_w = _grads(lambda a, b: _filtered(a, b, 1, d, 1, r, dilation=d), x, w, g)
    xn, wn, gn = (np.asarray(a, np.float64) for a in (x, w, g))
    x_sum = xn.reshape(2, 8, r, 8, r, 3).sum(axis=(2, 4))
    g_mean = gn.reshape(2, 8, r, 8, r, 5).mean(axis=(2, 4))
    step = d // r
    want_w = np.zeros(w.shape)
    gx_coarse = np.zeros(x_sum.shape)
    for i in range(3):
        for j in range(3):
            di, dj = step * (i - 1), step * (j - 1)
            for p in range(8):
                for q in range(8):
                    if 0 <= p + di < 8 and 0 <= q + dj < 8:
                        want_w[i, j] += x_sum[:, p + di, q + dj].T @ g_mean[:, p, q]
                        gx_coarse[:, p + di, q + dj] += g_mean[:, p, q] @ wn[i, j].T
    want_x = np.repeat(np.repeat(gx_coarse, r, axis=1), r, axis=2)
    np.testing.assert_allclose(grad_w, want_w, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(grad_x, want_x, atol=1e-4, rtol=1e-5)


def test_only_pooled_input_and_summed_kernel_are_saved():
    x, w = _conv_args(jax.random.PRNGKey(9), n=4, hw=16, ci=8, co=16)
    _, pullback = jax.vjp(lambda a, b: _filtered(a, b, 1, 1, 1, 4), x, w)
    shapes = sorted(leaf.shape for leaf in jax.tree.leaves(pullback))
    assert shapes == [(4, 4, 4, 8), (8, 16)], shapes  # x~ (N, 16/4, 16/4, Ci) and W~ (Ci, Co)
    saved = sum(leaf.size for leaf in jax.tree.leaves(pullback) if leaf.ndim == 4)
    assert saved / x.size == pytest.approx(1 / 16)


def test_nnx_conv_uses_filter_through_split_merge_and_jit():
    conv = nnx.Conv(4, 6, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(10), (2, 8, 8, 4))
    y_exact = conv(x)
    conv.conv_general_dilated = FilteredConv(patch_size=2)
    graphdef, params = nnx.split(conv)
    assert hash(graphdef) == hash(nnx.split(conv)[0])

    @jax.jit
    def loss_grads(params, x):
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)

    grads = loss_grads(params, x)
    np.testing.assert_array_equal(nnx.merge(graphdef, params)(x), y_exact)
    g = 2 * y_exact
    _, want_w = spec_filtered_grads(x, conv.kernel[...], g, 2, 2, 1)
    np.testing.assert_allclose(grads["kernel"][...], want_w, atol=1e-3, rtol=1e-5)
    np.testing.assert_allclose(grads["bias"][...], g.sum(axis=(0, 1, 2)), rtol=1e-5)  # exact bias


def test_bad_convolutions_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="multiples of the patch size"):
        make_geometry(2, (1, 8, 8, 2), (3, 3, 2, 2), 1, "SAME", 3, 1)
    with pytest.raises(ValueError, match="patch_size"):
        FilteredConv(patch_size=0)(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), (1, 1), "SAME")


def test_backward_cost_matches_the_paper_scaling():
    x, w, y = (8, 56, 56, 64), (3, 3, 64, 64), (8, 56, 56, 64)
    exact = backward_cost(x, w, y, None)
    geometry = make_geometry(4, x, w, 1, "SAME", 1, 1)
    filtered = backward_cost(x, w, y, geometry)
    # about R^2 k^2 = 144 fewer matmul FLOPs (the pooling adds are small), 1 - 1/R^2 less memory
    assert 100 < exact["flops"] / filtered["flops"] <= 144
    assert filtered["activation_elements"] / exact["activation_elements"] == pytest.approx(1 / 16)
