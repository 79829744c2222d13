"""Deterministic batching, padded evaluation batches, and on-device augmentation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.data import pipeline
from research.data.augment import make_preprocess, normalize, random_crop, random_flip


def arrays(n=50):
    rng = np.random.default_rng(0)
    return pipeline.ImageArrays(rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8), np.arange(n, dtype=np.int32) % 10,
                                tuple("0123456789"))


def test_training_order_is_a_function_of_seed_and_step():
    per_epoch = pipeline.steps_per_epoch(50, 8)
    epoch0 = np.concatenate([pipeline.train_indices(50, 8, 1, s) for s in range(per_epoch)])
    assert len(set(epoch0)) == 48  # a permutation, remainder dropped
    np.testing.assert_array_equal(pipeline.train_indices(50, 8, 1, 3), pipeline.train_indices(50, 8, 1, 3))
    assert not np.array_equal(pipeline.train_indices(50, 8, 1, 0), pipeline.train_indices(50, 8, 1, per_epoch))
    assert not np.array_equal(pipeline.train_indices(50, 8, 1, 0), pipeline.train_indices(50, 8, 2, 0))


def test_eval_batches_cover_every_example_once_and_pad_with_mask():
    data = arrays(50)
    batches = list(pipeline.eval_batches(data, 16))
    assert [len(b["labels"]) for b in batches] == [16] * 4
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])[mask > 0]
    assert mask.sum() == 50
    np.testing.assert_array_equal(labels, data.labels)


def test_crop_and_flip():
    images = jnp.asarray(arrays().images[:8])
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(random_crop(images, key, 0), images)
    cropped = random_crop(images, key, 2)
    assert cropped.shape == images.shape
    np.testing.assert_array_equal(cropped, random_crop(images, key, 2))  # reproducible from the key
    # Each crop is a window of the zero-padded image.
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(8):
        found = any(np.array_equal(np.asarray(cropped[i]), padded[i, y:y + 6, x:x + 6]) for y in range(5) for x in range(5))
        assert found
    flipped = random_flip(images, key)
    for i in range(8):
        assert np.array_equal(flipped[i], images[i]) or np.array_equal(flipped[i], images[i, :, ::-1])


def test_normalize_and_preprocess_only_augment_in_training():
    images = jnp.asarray(arrays().images[:4])
    x = normalize(images, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    np.testing.assert_allclose(x, (np.asarray(images) / 255.0 - 0.5) / 0.25, atol=1e-6)
    pre = make_preprocess([0.5] * 3, [0.25] * 3, crop_padding=2, flip=True)
    np.testing.assert_allclose(pre(images, jax.random.PRNGKey(1), False), x)
    assert not np.allclose(pre(images, jax.random.PRNGKey(1), True), x)


def test_hold_out_splits_each_class_into_a_held_slice_and_the_rest_in_data_order():
    data = arrays(100)  # 10 per class
    rest, held = pipeline.hold_out(data, 3, seed=0)
    assert np.bincount(held.labels).tolist() == [3] * 10 and np.bincount(rest.labels).tolist() == [7] * 10
    # disjoint, together every example once (rows are told apart by their pixels)
    rows = {img.tobytes() for img in data.images}
    assert {img.tobytes() for img in held.images} | {img.tobytes() for img in rest.images} == rows
    assert not {img.tobytes() for img in held.images} & {img.tobytes() for img in rest.images}
    assert held.images.tobytes() == pipeline.per_class(data, 3, seed=0).images.tobytes()
    assert pipeline.hold_out(data, 3, seed=1)[1].images.tobytes() != held.images.tobytes()
    with pytest.raises(ValueError, match="cannot hold out 10 examples per class: the smallest class has 10"):
        pipeline.hold_out(data, 10, seed=0)
