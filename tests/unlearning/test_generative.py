"""Generative unlearning: only the encoder moves, student and teacher see one mask, the decoder is
never touched, and each baseline's target is where the method puts it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.models import mae
from research.unlearning import generative
from research.unlearning.generative import GenerativeUnlearnConfig

SMALL = mae.MAEConfig(dim=32, depth=1, num_heads=4, mlp_dim=64, decoder_dim=32, decoder_depth=1)
MASKS = mae.MaskConfig()


@pytest.fixture(scope="module")
def model():
    return mae.build((16, 16, 1), SMALL, seed=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (24, 16, 16, 1), dtype=np.uint8), rng.integers(0, 256, (24, 16, 16, 1), dtype=np.uint8)


def _params(m, which):
    return jax.tree.leaves(nnx.state(m, nnx.All(nnx.Param, which)))


def _max_change(a, b, which):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(_params(a, which), _params(b, which)))


def test_retain_term_is_zero_at_the_start_so_student_and_teacher_share_the_mask(model, images):
    graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, mae.ENCODER), ...)
    loss = generative.unlearning_loss(GenerativeUnlearnConfig(alpha=0.0), graphdef, model.grid, MASKS)
    batch = {"retain": jnp.asarray(images[0][:8], jnp.float32) / 255, "forget": jnp.asarray(images[1][:8], jnp.float32) / 255}
    assert float(loss(params, params, rest, batch, jax.random.PRNGKey(0))) == 0.0
    # Random masks too: one draw serves student and teacher.
    other = generative.unlearning_loss(GenerativeUnlearnConfig(alpha=0.0), graphdef, model.grid,
                                       mae.MaskConfig(kinds=("random",)))
    assert float(other(params, params, rest, batch, jax.random.PRNGKey(0))) == 0.0


@pytest.mark.parametrize("method", ["ours", "random_encoder"])
def test_alpha_zero_on_retain_data_leaves_the_encoder_at_e0(model, images, method):
    # E_0 is a stationary point of the retain term: its gradient there is float noise. (Adam rescales
    # any nonzero gradient to lr-sized steps, noise included, so the invariant is checked on the
    # gradient, against the gradient with the forget term on.)
    graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, mae.ENCODER), ...)
    batch = {"retain": jnp.asarray(images[0][:8], jnp.float32) / 255, "forget": jnp.asarray(images[0][8:16], jnp.float32) / 255}

    def grad_norm(alpha):
        loss = generative.unlearning_loss(GenerativeUnlearnConfig(method=method, alpha=alpha), graphdef, model.grid, MASKS)
        return float(optax.global_norm(jax.grad(loss)(params, params, rest, batch, jax.random.PRNGKey(3))))
    assert grad_norm(0.0) < 1e-5 * grad_norm(1.0)
    assert grad_norm(1.0) > 1e-4


def test_the_pixel_retain_term_is_the_baselines_reconstruction_loss(model, images):
    # At alpha 0, ours with retain_loss="pixels" is the objective every pixel-space baseline has at alpha 0.
    graphdef, params, rest = nnx.split(model, nnx.All(nnx.Param, mae.ENCODER), ...)
    batch = {"retain": jnp.asarray(images[0][:8], jnp.float32) / 255, "forget": jnp.asarray(images[1][:8], jnp.float32) / 255}

    def value(**kwargs):
        loss = generative.unlearning_loss(GenerativeUnlearnConfig(alpha=0.0, **kwargs), graphdef, model.grid, MASKS)
        return float(loss(params, params, rest, batch, jax.random.PRNGKey(5)))
    pixels = value(method="ours", retain_loss="pixels")
    assert pixels > 1e-3 and value(method="ours") == 0.0
    assert pixels == pytest.approx(value(method="noisy_label"), rel=1e-6)
    assert pixels == pytest.approx(value(method="max_loss"), rel=1e-6)


@pytest.mark.parametrize("method", generative.METHODS)
def test_only_the_encoder_changes(model, images, method):
    config = GenerativeUnlearnConfig(method=method, alpha=0.5, steps=3, batch_size=8, warmup_steps=1)
    out = generative.unlearn(model, images[0], images[1], config, MASKS, seed=1).model
    assert _max_change(out, model, mae.DECODER) == 0.0
    assert _max_change(out, model, mae.ENCODER) > 0.0
    assert all(np.isfinite(np.asarray(x)).all() for x in _params(out, mae.ENCODER))


@pytest.mark.parametrize("method", generative.TARGET_METHODS)
def test_a_reached_target_keeps_the_visible_pixels_and_fills_the_hidden_ones_with_the_target(model, images, method):
    x = jnp.asarray(images[1][:6], jnp.float32) / 255.0
    mask = mae.fixed_mask("center", 6, model.grid, MASKS)
    key = jax.random.PRNGKey(3)
    out = np.asarray(generative.reached_target(model, x, mask, key, method))
    hidden = np.asarray(model.pixel_mask(mask)).astype(bool)[..., 0]
    np.testing.assert_array_equal(out[~hidden], np.asarray(x)[~hidden])
    n = generative.noise_like(key, x)  # the noise image the loss would draw with this key
    # ours: the decoder of E_0(T(n)), the feature target; noisy label: n, the pixel target
    fill = model.decode(model.encode(n, mask)) if method == "ours" else n
    np.testing.assert_allclose(out[hidden], np.clip(np.asarray(fill), 0, 1)[hidden], atol=1e-6)
    assert np.abs(out[hidden] - np.asarray(x)[hidden]).mean() > 0.05
    with pytest.raises(ValueError, match="retain_label"):
        generative.reached_target(model, x, mask, key, "retain_label")


def test_gaussian_noise_matches_the_batch_and_stays_in_range():
    x = jax.random.uniform(jax.random.PRNGKey(0), (64, 16, 16, 1)) * 0.4 + 0.3
    n = generative.noise_like(jax.random.PRNGKey(1), x, "gaussian")
    assert float(n.min()) >= 0.0 and float(n.max()) <= 1.0
    assert abs(float(n.mean()) - float(x.mean())) < 0.01
    assert float(generative.noise_like(jax.random.PRNGKey(1), x, "constant").std()) == 0.0


def test_paired_batches_balance_the_sets_and_repeat_the_smaller():
    retain, forget = np.arange(40)[:, None], np.arange(100, 106)[:, None]
    next_batch = generative.paired_batches(retain, forget, 8, seed=0)
    first, second = next_batch(0), next_batch(1)
    assert first["retain"].shape == first["forget"].shape == (8, 1)
    assert set(first["forget"].ravel()) <= set(range(100, 106))
    assert not np.array_equal(first["retain"], second["retain"])


def test_lr_scales_with_the_batch():
    assert GenerativeUnlearnConfig(base_lr=1e-4, batch_size=512).lr == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="batch_size"):
        GenerativeUnlearnConfig(batch_size=7)
