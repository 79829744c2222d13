"""KD loss: known values, zero at equality, masking, temperature scaling."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from research.distill import kd_loss_sums, language_model_metrics


def test_kl_matches_a_direct_computation_and_masks_tokens():
    rng = np.random.RandomState(0)
    s, t = rng.randn(2, 3, 7), rng.randn(2, 3, 7)
    mask = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
    loss, sums = kd_loss_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), temperature=2.0)
    ps, pt = (np.exp(x / 2) / np.exp(x / 2).sum(-1, keepdims=True) for x in (s, t))
    expected = (4 * (pt * np.log(pt / ps)).sum(-1) * mask).sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(sums["count"]) == 4


def test_zero_when_student_equals_teacher_and_ce_adds():
    logits = jax.random.normal(jax.random.key(0), (1, 4, 11))
    labels = jnp.array([[1, 2, 3, 4]])
    loss, sums = kd_loss_sums(logits, logits, jnp.ones((1, 4)), labels=labels, ce_weight=0.5)
    assert abs(float(sums["kl"])) < 1e-5
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1).sum()
    np.testing.assert_allclose(float(loss), 0.5 * float(ce), rtol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        kd_loss_sums(logits, logits, jnp.ones((1, 4)), ce_weight=0.5)


def test_perplexity_sums_and_agreement():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    sums = language_model_metrics(logits, jnp.array([[0, 2]]), jnp.ones((1, 2)), reference_logits=logits[:, ::-1])
    np.testing.assert_allclose(float(sums["nll"]), -np.log(0.5) - np.log(0.8), rtol=1e-6)
    assert float(sums["agree"]) == 0 and float(sums["count"]) == 2

