"""The masked-autoencoder generator: its masks, the composite that keeps visible pixels, and
training it end to end (resumable)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import train_generator
from research.core.config import ConfigError, load_config
from research.models import mae
from research.recipes.mae_train import pad_images

SMALL = mae.MAEConfig(dim=32, depth=1, num_heads=4, mlp_dim=64, decoder_dim=32, decoder_depth=1)


def test_center_mask_hides_the_central_quarter_of_an_8x8_grid():
    mask = mae.center_mask((8, 8), 0.25).reshape(8, 8)
    expected = np.zeros((8, 8), bool)
    expected[2:6, 2:6] = True
    np.testing.assert_array_equal(mask, expected)


def test_border_mask_hides_everything_but_the_centre():
    mask = mae.border_mask((8, 8), 2).reshape(8, 8)
    assert mask.sum() == 64 - 16 and not mask[2:6, 2:6].any()


def test_hidden_box_is_the_pixel_bounding_box_of_the_hidden_tokens():
    assert mae.hidden_box(mae.center_mask((8, 8), 0.25), (8, 8), 4) == (slice(8, 24), slice(8, 24))
    assert mae.hidden_box(mae.border_mask((8, 8), 2), (8, 8), 4) == (slice(0, 32), slice(0, 32))
    one = np.zeros(12, bool)
    one[5] = True  # row 1, column 1 of a 3 x 4 grid
    assert mae.hidden_box(one, (3, 4), 2) == (slice(2, 4), slice(2, 4))
    with pytest.raises(ValueError, match="hides no token"):
        mae.hidden_box(np.zeros(64, bool), (8, 8), 4)


def test_random_masks_hide_a_ratio_in_range_and_differ_per_image():
    masks = np.asarray(mae.random_mask(jax.random.PRNGKey(0), 200, 64, 0.25, 0.75))
    counts = masks.sum(1)
    assert counts.min() >= 16 and counts.max() <= 48
    assert len({m.tobytes() for m in masks}) == 200


def test_make_masks_gives_each_image_one_of_the_kinds():
    config = mae.MaskConfig(kinds=("center", "outpaint"))
    masks = np.asarray(mae.make_masks(jax.random.PRNGKey(1), 64, (8, 8), config))
    center, border = mae.center_mask((8, 8)), mae.border_mask((8, 8), 2)
    is_center = (masks == center).all(1)
    is_border = (masks == border).all(1)
    assert (is_center ^ is_border).all() and is_center.any() and is_border.any()


def test_patchify_round_trips():
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 16, 12, 3))
    tokens = mae.patchify(x, 4)
    assert tokens.shape == (3, 12, 48)
    np.testing.assert_array_equal(mae.unpatchify(tokens, 4, (16, 12, 3)), x)


def test_generator_keeps_visible_pixels_and_fills_hidden_ones():
    model = mae.build((16, 16, 1), SMALL)
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 16, 16, 1))
    mask = mae.fixed_mask("center", 2, model.grid, mae.MaskConfig())
    out = model(x, mask)
    hidden = np.asarray(model.pixel_mask(mask)).astype(bool)
    np.testing.assert_array_equal(np.asarray(out)[~hidden], np.asarray(x)[~hidden])
    assert not np.allclose(np.asarray(out)[hidden], np.asarray(x)[hidden])
    assert model.encode(x, mask).shape == (2, 16, SMALL.dim)


def test_the_encoder_ignores_hidden_pixels():
    model = mae.build((16, 16, 1), SMALL)
    x = jax.random.uniform(jax.random.PRNGKey(3), (1, 16, 16, 1))
    mask = mae.fixed_mask("center", 1, model.grid, mae.MaskConfig())
    changed = jnp.where(model.pixel_mask(mask) > 0, 1.0 - x, x)
    np.testing.assert_allclose(model.encode(changed, mask), model.encode(x, mask), atol=1e-6)


def test_pad_images_centres_on_zeros():
    images = np.full((2, 28, 28, 1), 7, np.uint8)
    out = pad_images(images, 32)
    assert out.shape == (2, 32, 32, 1) and out[:, 2:30, 2:30].min() == 7 and out.sum() == images.sum()
    with pytest.raises(ValueError, match="smaller"):
        pad_images(images, 16)


def test_smoke_training_writes_samples_and_resumes(tmp_path):
    overrides = {"data.name": "digits", "data.pad_to": 16}
    results = train_generator.main(load_config("configs/train_generator.py:smoke", overrides), str(tmp_path))
    assert results["steps"] == 3 and np.isfinite(results["test_mse_center"])
    assert {"samples.png", "results.json", "curves.png", "checkpoints", "tb"} <= {p.name for p in tmp_path.iterdir()}
    again = train_generator.main(load_config("configs/train_generator.py:smoke", overrides), str(tmp_path))
    assert again["test_mse_center"] == pytest.approx(results["test_mse_center"], rel=1e-6)
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 3


@pytest.mark.parametrize("override, key", [
    ({"masks.kinds": ("center", "ring")}, "masks.kinds"),
    ({"model.num_heads": 5}, "model.num_heads"),
    ({"data.name": "imagenet"}, "data.name"),
])
def test_bad_values_name_the_key(tmp_path, override, key):
    config = load_config("configs/train_generator.py:smoke", {"data.name": "digits", "data.pad_to": 16, **override})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train_generator.main(config, str(tmp_path))
    assert not (tmp_path / "results.json").exists()
