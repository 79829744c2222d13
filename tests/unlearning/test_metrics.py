"""Unlearning metrics: accuracy by hand, p_y, MIA on confidences of known membership, output distance, gaps."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.data.pipeline import ImageArrays
from research.unlearning.metrics import (METRIC_KEYS, accuracy, balanced_rows, gap_to_retrain, mia_efficacy,
                                         mia_from_confidences, output_distance, true_class_confidence,
                                         unlearning_metrics)
from research.unlearning.model import ForgetProblem, Unlearnable

NAMES = ("a", "b", "c")


class FirstPixels(nnx.Module):
    """logits = scale * (the first 3 pixel values / 32): a model whose outputs the test writes directly."""

    def __init__(self):
        self.scale = nnx.Param(jnp.ones(()))

    def __call__(self, x):
        return self.scale * x.reshape(x.shape[0], -1)[:, :3] / 32.0


def pixel_model() -> Unlearnable:
    return Unlearnable.from_model(FirstPixels(), preprocess=lambda x: x.astype(jnp.float32))


def images_with_logits(pixels: np.ndarray) -> np.ndarray:
    """(N, 3) pixel values -> (N, 2, 2, 1) uint8 images whose first three pixels are those."""
    out = np.zeros((len(pixels), 4), np.uint8)
    out[:, :3] = pixels
    return out.reshape(-1, 2, 2, 1)


def confident_split(rng, n: int, true_pixel: int, other_pixel: int) -> ImageArrays:
    """n samples whose true-class logit is true_pixel/32 (+ noise) and the others other_pixel/32."""
    labels = rng.integers(0, 3, n).astype(np.int32)
    pixels = np.full((n, 3), other_pixel) + rng.integers(0, 8, (n, 3))
    pixels[np.arange(n), labels] = true_pixel + rng.integers(0, 8, n)
    return ImageArrays(images_with_logits(pixels), labels, NAMES)


def test_accuracy_is_the_hand_count_and_uses_the_given_params():
    pixels = np.array([[9, 1, 1], [1, 9, 1], [1, 1, 9], [9, 1, 1], [1, 9, 1]])
    labels = np.array([0, 1, 0, 2, 1], np.int32)   # right, right, wrong, wrong, right
    data = ImageArrays(images_with_logits(pixels), labels, NAMES)
    model = pixel_model()
    assert accuracy(model, data) == pytest.approx(60.0)
    # scale -1 turns argmax into argmin (first index on ties): [1, 0, 0, 1, 0]: only sample 2 right
    flipped = nnx.State({"scale": nnx.Param(-jnp.ones(()))})
    assert accuracy(model, data, params=flipped) == pytest.approx(20.0)
    assert accuracy(model, data, batch_size=2) == pytest.approx(60.0)   # batching and padding


def test_true_class_confidence_is_softmax_at_the_label():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(7, 4)) * 3, rng.integers(0, 4, 7)
    expected = np.exp(logits[np.arange(7), labels]) / np.exp(logits).sum(1)
    np.testing.assert_allclose(true_class_confidence(logits, labels), expected, rtol=1e-10)
    # large logits do not overflow
    np.testing.assert_allclose(true_class_confidence(np.array([[1000.0, 0.0]]), np.array([0])), [1.0])


def test_balanced_rows_draw_equal_counts_reproducibly():
    members, nonmembers = balanced_rows(100, 30, seed=3)
    assert len(members) == len(nonmembers) == 30 and len(set(members)) == 30 and members.max() < 100
    np.testing.assert_array_equal(members, balanced_rows(100, 30, seed=3)[0])
    assert len(balanced_rows(100, 30, seed=3, max_samples=10)[0]) == 10


def test_mia_calls_test_like_forget_samples_non_members_and_retain_like_ones_members():
    rng = np.random.default_rng(0)
    retain_conf = rng.uniform(0.9, 1.0, 300)      # members: confident
    test_conf = rng.uniform(0.1, 0.6, 100)        # non-members: unsure
    assert mia_from_confidences(retain_conf, test_conf, rng.uniform(0.1, 0.6, 50)) > 95
    assert mia_from_confidences(retain_conf, test_conf, rng.uniform(0.9, 1.0, 50)) < 5
    half = np.concatenate([rng.uniform(0.1, 0.6, 25), rng.uniform(0.9, 1.0, 25)])
    assert 40 <= mia_from_confidences(retain_conf, test_conf, half) <= 60


def test_mia_efficacy_reads_the_confidence_at_the_true_label():
    rng = np.random.default_rng(1)
    retain = confident_split(rng, 120, 200, 0)    # p_y ~ 1
    test = confident_split(rng, 60, 40, 30)       # p_y ~ 0.4
    model = pixel_model()
    assert mia_efficacy(model, None, retain, test, confident_split(rng, 40, 40, 30)) > 95
    assert mia_efficacy(model, None, retain, test, confident_split(rng, 40, 200, 0)) < 5
    # the same images with a wrong label have tiny p_y: they look like non-members
    members = confident_split(rng, 40, 200, 0)
    relabelled = ImageArrays(members.images, (members.labels + 1) % 3, NAMES)
    assert mia_efficacy(model, None, retain, test, relabelled) > 95


def test_unlearning_metrics_agree_with_the_single_metrics():
    rng = np.random.default_rng(2)
    retain, test, forget = confident_split(rng, 50, 200, 0), confident_split(rng, 30, 40, 30), \
        confident_split(rng, 20, 40, 30)
    model = pixel_model()
    problem = ForgetProblem(model, model.params, retain, forget, test)
    metrics = unlearning_metrics(model, None, problem, seed=4)
    assert tuple(metrics) == METRIC_KEYS
    assert metrics["retain_acc"] == accuracy(model, retain)
    assert metrics["forget_acc"] == accuracy(model, forget)
    assert metrics["test_acc"] == accuracy(model, test)
    assert metrics["mia"] == mia_efficacy(model, None, retain, test, forget, seed=4)


def test_output_distance_is_zero_for_equal_outputs_and_two_for_disjoint_ones():
    logits = np.random.default_rng(0).normal(size=(5, 3))
    assert output_distance(logits, logits) == pytest.approx(0.0, abs=1e-12)
    a = np.array([[30.0, 0.0, 0.0], [0.0, 30.0, 0.0]])
    assert output_distance(a, np.roll(a, 1, axis=1)) == pytest.approx(2.0, abs=1e-6)
    # one row equal, one row swapped: mean of 0 and |[.5,.5]-[1,0]|_1 = 1 -> 0.5
    b = np.array([[0.0, 0.0], [50.0, 0.0]])
    assert output_distance(b, np.array([[0.0, 0.0], [0.0, 0.0]])) == pytest.approx(0.5, abs=1e-6)


def test_gap_to_retrain_is_the_mean_absolute_difference():
    metrics = {"retain_acc": 99.0, "forget_acc": 90.0, "test_acc": 80.0, "mia": 10.0, "other": 5.0}
    retrain = {"retain_acc": 100.0, "forget_acc": 82.0, "test_acc": 81.0, "mia": 20.0}
    assert gap_to_retrain(metrics, retrain) == pytest.approx((1 + 8 + 1 + 10) / 4)
