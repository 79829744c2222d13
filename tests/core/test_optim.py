"""The optimiser schema and chain: weight decay on matrices only by default, on every parameter
with ``decay_vectors`` (torch's SGD L2, which the unlearning recipes use)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.core.config import FieldError
from research.core.optim import OptimConfig, make_optimizer
from research.unlearning.train import sgd


def run(tx, params, steps=5):
    state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), params)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


PARAMS = {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.arange(3.0), "scale": jnp.ones(3)}


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_unlearning_sgd_is_torch_l2_sgd_on_every_parameter(schedule):
    lr_fn = optax.cosine_decay_schedule(0.1, 5) if schedule == "cosine" else 0.1
    torch_like = optax.chain(optax.add_decayed_weights(0.05), optax.sgd(lr_fn, momentum=0.9))
    ours = run(sgd(0.1, 0.9, 0.05, steps=5, schedule=schedule), PARAMS)
    for key, expected in run(torch_like, PARAMS).items():
        np.testing.assert_allclose(ours[key], expected, rtol=1e-6)


def test_default_weight_decay_skips_vectors():
    config = OptimConfig(name="sgd", lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.5, schedule="constant")
    zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
    tx = make_optimizer(config, 1)
    updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * PARAMS["kernel"])
    assert not np.any(updates["bias"]) and not np.any(updates["scale"])


def test_a_bad_value_names_the_field():
    with pytest.raises(FieldError, match=r"OptimConfig.schedule = 'cyclic' is not allowed; choose one of: constant"):
        OptimConfig(schedule="cyclic")
    with pytest.raises(FieldError, match=r"OptimConfig.lr = 0.0 is not allowed; expected a positive float"):
        OptimConfig(lr=0.0)
