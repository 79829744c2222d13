"""Dropout models: one mask per model, fixed across the evaluation set; p = 0 is the model itself."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.core.mesh import make_mesh
from research.models import build_model
from research.models.mlp import MLP
from research.multiplicity.dropout import DropoutEnsemble, output_dropout, perturb, with_output_dropout


@pytest.fixture(scope="module")
def mlp_and_data():
    model = MLP(6, (16, 8), num_classes=3, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    return model, rng.normal(size=(40, 6)).astype(np.float32), np.arange(40) % 3


def _keys(n, seed=0):
    return jax.vmap(lambda j: jax.random.fold_in(jax.random.PRNGKey(seed), j))(jnp.arange(n))


def test_every_conv_and_linear_layer_is_wrapped_and_the_original_is_untouched(mlp_and_data):
    model, x, _ = mlp_and_data
    wrapped, count = with_output_dropout(model)
    assert count == 3  # two hidden layers and the logits layer
    assert type(model.head) is nnx.Linear
    np.testing.assert_array_equal(wrapped(jnp.asarray(x)), model(jnp.asarray(x)))  # no noise outside the context


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian"])
def test_rate_zero_is_the_reference_model_exactly(mlp_and_data, kind):
    model, x, y = mlp_and_data
    probs, _ = DropoutEnsemble(model, kind, models_per_chunk=3).evaluate(_keys(5), 0.0, x, y)
    np.testing.assert_array_equal(probs, np.broadcast_to(jax.nn.softmax(model(jnp.asarray(x))), probs.shape))


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian"])
def test_a_mask_is_fixed_across_batches(mlp_and_data, kind):
    """The same model on the set in batches of 7 (padded) and in one batch gives the same outputs."""
    model, x, y = mlp_and_data
    keys = _keys(6)
    split, loss_split = DropoutEnsemble(model, kind, batch_size=7, models_per_chunk=4).evaluate(keys, 0.3, x, y)
    whole, loss_whole = DropoutEnsemble(model, kind, batch_size=40, models_per_chunk=6).evaluate(keys, 0.3, x, y)
    np.testing.assert_allclose(split, whole, atol=1e-6)
    np.testing.assert_allclose(loss_split, loss_whole, atol=1e-6)
    assert np.abs(split[0] - split[1]).max() > 1e-3  # different keys are different models


def test_vmapped_models_equal_one_model_at_a_time(mlp_and_data):
    model, x, y = mlp_and_data
    keys = _keys(4)
    ensemble = DropoutEnsemble(model, "gaussian", models_per_chunk=4)
    together, _ = ensemble.evaluate(keys, 0.2, x, y)
    wrapped, _ = with_output_dropout(model)
    for m, key in enumerate(keys):
        with output_dropout(key, "gaussian", 0.2):
            alone = jax.nn.softmax(wrapped(jnp.asarray(x)))
        np.testing.assert_allclose(together[m], alone, atol=1e-6)


def test_bernoulli_masks_drop_the_rate_and_rescale():
    y = jnp.ones((3, 20_000))
    out = np.asarray(jax.jit(lambda k: _perturb(y, k, "bernoulli", 0.25))(jax.random.PRNGKey(1)))
    assert np.all(out[0] == out[1])  # one mask for every row
    assert np.mean(out[0] == 0) == pytest.approx(0.25, abs=0.01)
    np.testing.assert_allclose(out[0][out[0] != 0], 1 / 0.75, rtol=1e-6)


def test_gaussian_noise_has_the_rate_as_its_standard_deviation():
    out = np.asarray(_perturb(jnp.ones((2, 50_000)), jax.random.PRNGKey(2), "gaussian", 0.1))
    assert out[0].mean() == pytest.approx(1.0, abs=0.003) and out[0].std() == pytest.approx(0.1, rel=0.02)


def _perturb(y, key, kind, rate):
    return perturb(y, key, kind, jnp.float32(rate))


def test_a_batchnorm_cnn_on_an_eight_device_mesh_equals_one_device():
    model = build_model("resnet20", num_classes=10, input_shape=(8, 8, 3), rngs=nnx.Rngs(0))
    model.eval()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 8, 8, 3)).astype(np.float32), rng.integers(0, 10, 12)
    keys = _keys(3)
    one, _ = DropoutEnsemble(model, "bernoulli").evaluate(keys, 0.1, x, y)
    sharded, _ = DropoutEnsemble(model, "bernoulli", mesh=make_mesh({"data": 8, "model": 1})).evaluate(keys, 0.1, x, y)
    np.testing.assert_allclose(one, sharded, atol=1e-5)


def test_bad_rates_and_kinds_fail_with_one_line(mlp_and_data):
    model, x, y = mlp_and_data
    with pytest.raises(ValueError, match="kind must be one of"):
        DropoutEnsemble(model, "uniform")
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
        DropoutEnsemble(model, "bernoulli").evaluate(_keys(1), 1.0, x, y)
