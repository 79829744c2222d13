"""The optimiser schema and chain: weight decay on matrices only by default, on every parameter
with ``decay_vectors`` (torch's SGD L2, which the unlearning recipes use), toward 0 or, proximal,
toward the initial weights."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.core.config import FieldError
from research.core.optim import OptimConfig, make_optimizer
from research.unlearning.recipe import TrainRecipe
from research.unlearning.train import recipe_optimizer


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
    recipe = TrainRecipe(lr=0.1, momentum=0.9, weight_decay=0.05, decay_toward="zero", schedule=schedule)
    ours = run(recipe_optimizer(recipe, 5), PARAMS)
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


def _sgd(decay_toward, weight_decay=0.5, **kwargs):
    return OptimConfig(name="sgd", lr=0.1, momentum=0.0, nesterov=False, weight_decay=weight_decay,
                       schedule="constant", decay_vectors=True, decay_toward=decay_toward, **kwargs)


def test_proximal_decay_leaves_the_initial_weights_where_they_are():
    tx = make_optimizer(_sgd("init"), 1)
    zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
    assert not any(np.any(u) for u in jax.tree.leaves(updates))
    toward_zero = make_optimizer(_sgd("zero"), 1)
    updates, _ = toward_zero.update(zero_grads, toward_zero.init(PARAMS), PARAMS)
    assert np.any(updates["kernel"])  # the usual decay would move them


def test_proximal_decay_pulls_a_moved_weight_back_toward_init_by_lr_wd_d():
    d = jax.tree.map(lambda p: jnp.full_like(p, 2.0) * (1 + jnp.arange(p.size).reshape(p.shape) % 3), PARAMS)
    moved = jax.tree.map(jnp.add, PARAMS, d)
    zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
    tx = make_optimizer(_sgd("init"), 1)
    updates, _ = tx.update(zero_grads, tx.init(PARAMS), moved)  # anchored where it was initialised
    for key in PARAMS:
        np.testing.assert_allclose(updates[key], -0.1 * 0.5 * d[key], rtol=1e-6)
    # An explicit anchor: a run that starts at `moved` (a baseline from w(D)) still decays to PARAMS.
    tx = make_optimizer(_sgd("init"), 1, anchor=PARAMS)
    updates, _ = tx.update(zero_grads, tx.init(moved), moved)
    for key in PARAMS:
        np.testing.assert_allclose(updates[key], -0.1 * 0.5 * d[key], rtol=1e-6)


def test_proximal_sgd_minimises_the_loss_plus_the_proximal_penalty():
    # min_w (1/2)|w - t|^2 + (wd/2)|w - w0|^2 has w* = (t + wd w0) / (1 + wd).
    w0, target, wd = jnp.array([1.0, -2.0, 3.0]), jnp.array([4.0, 0.0, -1.0]), 0.5
    tx = make_optimizer(_sgd("init", weight_decay=wd), 200)
    w, state = w0, tx.init(w0)
    for _ in range(200):
        updates, state = tx.update(w - target, state, w)
        w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(w, (target + wd * w0) / (1 + wd), rtol=1e-5)


def test_proximal_adamw_is_decoupled_and_anchored():
    cfg = OptimConfig(name="adamw", lr=0.1, weight_decay=0.5, schedule="constant", decay_vectors=True,
                      decay_toward="init")
    tx = make_optimizer(cfg, 1)
    zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
    moved = jax.tree.map(lambda p: p + 1.0, PARAMS)
    updates, _ = tx.update(zero_grads, tx.init(PARAMS), moved)
    for key in PARAMS:  # Adam's step of a zero gradient is 0; the decoupled decay is -lr wd (w - w0)
        np.testing.assert_allclose(updates[key], -0.1 * 0.5 * np.ones_like(PARAMS[key]), rtol=1e-6)


def test_an_anchor_without_proximal_decay_and_adam_with_it_are_refused():
    with pytest.raises(ValueError, match="an anchor is only used with decay_toward='init', not 'zero'"):
        make_optimizer(_sgd("zero"), 1, anchor=PARAMS)
    with pytest.raises(FieldError, match=r"OptimConfig.decay_toward = 'init' is not allowed; expected zero with name=adam"):
        OptimConfig(name="adam", decay_toward="init")
