"""Prefill / training attention through tokamax equals the XLA reference (values and gradients),
with d_v != d_qk; without a GPU the pallas ops fall back to the reference and say so once."""
import logging

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from research.attention import ops

tokamax = pytest.importorskip("tokamax", reason="the `kernels` extra")
from research.kernels import prefill  # noqa: E402


def ragged_positions(b, t):
    """Causal prefill positions, with a cache-style kv_positions: the second row's keys start later."""
    q_positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    kv_positions = q_positions.at[1].add(2)
    return q_positions, kv_positions


def test_mla_through_tokamax_equals_the_reference_in_values_and_gradients():
    b, t, h, dn, dr, dv, rope_heads = 2, 12, 6, 16, 8, 20, 3   # d_qk = 16 + 8 = 24 != d_v = 20
    keys = jax.random.split(jax.random.key(0), 5)
    shapes = [(b, t, h, dn), (b, t, h, dr), (b, t, h, dn), (b, t, rope_heads, dr), (b, t, h, dv)]
    args = [jax.random.normal(k, s) for k, s in zip(keys, shapes)]
    q_positions, kv_positions = ragged_positions(b, t)

    def loss(fn, *a):
        out = fn(*a, q_positions, kv_positions, scale=0.3)
        return (out * jnp.cos(out)).sum(), out

    tk = lambda *a, **k: prefill.mla_attention(*a, **k, implementation="xla")
    (want, want_out), want_grads = jax.value_and_grad(lambda *a: loss(ops.mla_attention, *a), argnums=range(5), has_aux=True)(*args)
    (got, got_out), got_grads = jax.value_and_grad(lambda *a: loss(tk, *a), argnums=range(5), has_aux=True)(*args)
    assert got_out.shape == (b, t, h, dv)
    np.testing.assert_allclose(got_out, want_out, atol=1e-5, rtol=0)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_gqa_through_tokamax_equals_the_reference():
    b, t, h, k_heads, d = 2, 10, 4, 2, 16
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (b, t, n, d)) for key, n in zip(keys, (h, k_heads, k_heads)))
    q_positions, kv_positions = ragged_positions(b, t)
    got = prefill.gqa_attention(q, k, v, q_positions, kv_positions, scale=0.25, implementation="xla")
    np.testing.assert_allclose(got, ops.gqa_attention(q, k, v, q_positions, kv_positions, scale=0.25), atol=1e-5)


def test_pallas_prefill_on_cpu_falls_back_to_the_reference_with_one_log_line(caplog):
    if jax.default_backend() != "cpu":
        pytest.skip("the fallback is for machines without a GPU or TPU")
    q = jax.random.normal(jax.random.key(2), (1, 5, 2, 8))
    positions = jnp.arange(5)[None]
    ops._LOGGED.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            got = ops.attention_ops("pallas").gqa(q, q, q, positions, scale=0.3)
    np.testing.assert_array_equal(got, ops.gqa_attention(q, q, q, positions, scale=0.3))
    lines = [r.getMessage() for r in caplog.records if "falls back to xla" in r.getMessage()]
    assert lines == ["attention_impl=pallas: prefill attention falls back to xla: "
                     "tokamax's attention kernels need a GPU or TPU, not cpu"]
