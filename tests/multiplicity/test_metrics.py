"""Multiplicity metrics on hand-made sets, and Blahut-Arimoto against closed forms."""
import numpy as np
import pytest

from research.multiplicity import metrics


def _entropy_bits(q):
    return -(q * np.log2(q) + (1 - q) * np.log2(1 - q))


def test_identical_rows_have_capacity_zero_and_rashomon_capacity_one():
    channel = np.tile([[0.2, 0.5, 0.3]], (4, 1))
    assert metrics.channel_capacity_bits(channel) == pytest.approx(0.0, abs=1e-12)
    probs = np.tile(channel[:, None, :], (1, 3, 1))  # 4 models agree on 3 points
    np.testing.assert_allclose(metrics.rashomon_capacity(probs), 1.0, atol=1e-12)


def test_a_permutation_channel_reaches_the_number_of_classes():
    channel = np.eye(5)[[3, 0, 4, 1, 2]]
    assert metrics.channel_capacity_bits(channel) == pytest.approx(np.log2(5), abs=1e-9)
    np.testing.assert_allclose(metrics.rashomon_capacity(channel[:, None, :]), 5.0, atol=1e-8)


@pytest.mark.parametrize("q", [0.05, 0.2, 0.35])
def test_binary_symmetric_channel_has_capacity_one_minus_its_entropy(q):
    channel = np.array([[1 - q, q], [q, 1 - q]])
    assert metrics.channel_capacity_bits(channel) == pytest.approx(1 - _entropy_bits(q), abs=1e-10)


def test_an_asymmetric_channel_matches_its_closed_form():
    # Z-channel: input 0 always gives 0, input 1 gives 1 with probability 1 - q.
    # its known capacity: C = log2(1 + (1 - q) q^{q / (1 - q)}).
    q = 0.3
    channel = np.array([[1.0, 0.0], [q, 1 - q]])
    closed = np.log2(1 + (1 - q) * q ** (q / (1 - q)))
    assert metrics.channel_capacity_bits(channel) == pytest.approx(closed, abs=1e-9)


def test_capacity_never_leaves_one_to_the_number_of_classes():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.3, size=(7, 20))
    rc = metrics.rashomon_capacity(probs)
    assert rc.shape == (20,) and np.all(rc >= 1.0) and np.all(rc <= 4.0)


def test_each_metric_on_a_hand_made_set():
    # 3 models, 4 points, 2 classes; the reference predicts class 0 everywhere.
    probs = np.array([
        [[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.7, 0.3]],
        [[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.7, 0.3]],   # flips point 1
        [[0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.7, 0.3]],   # flips points 0 and 1
    ])
    labels = np.array([0, 1, 0, 0])
    reference = np.zeros(4, int)
    assert metrics.ambiguity(probs, reference) == pytest.approx(0.5)       # points 0, 1
    assert metrics.discrepancy(probs, reference) == pytest.approx(0.5)     # model 2 flips 2 of 4
    np.testing.assert_allclose(metrics.viable_prediction_range(probs, labels), [0.7, 0.5, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(metrics.score_variance(probs, labels),
                               [np.var([0.9, 0.9, 0.2]), np.var([0.2, 0.6, 0.7]), 0.0, 0.0], atol=1e-6)
    summary = metrics.summarize(probs, labels, reference)
    assert summary["num_models"] == 3
    assert summary["accuracy"] == pytest.approx(np.mean(probs.argmax(-1) == labels))
    assert summary["rashomon_capacity"] > 1.0


def test_an_empty_set_is_refused():
    with pytest.raises(ValueError, match="probs must be"):
        metrics.ambiguity(np.zeros((0, 3, 2)), np.zeros(3, int))
