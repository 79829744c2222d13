"""LoRA on the scanned layers of the Llama decoder: one adapter per layer, exact no-op and merge."""
import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.adapters import lora
from research.core.train import create_train_state, make_train_step
from tests.models.tiny_llama import TINY, random_llama

TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 10)))


def adapted_llama():
    model = random_llama()
    paths = lora.add_lora(model, lora.LoraSpec(r"attn/(q|v)$", rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    return model, paths


def test_stacked_adapters_are_a_no_op_then_merge_exactly():
    model, paths = adapted_llama()
    assert paths == ["segments/0/attn/q", "segments/0/attn/v"]
    q = model.segments[0].attn.q
    assert q.lora["default"].a.shape == (TINY.num_layers, TINY.dim, 2)  # one factor pair per layer
    assert q.lora["default"].b.shape == (TINY.num_layers, 2, TINY.num_heads, TINY.head_dim)  # B keeps the heads
    before, _ = random_llama()(TOKENS)
    np.testing.assert_array_equal(np.asarray(model(TOKENS)[0]), np.asarray(before))

    # Give B values: the adapted model changes, merging reproduces it, unmerging restores W.
    keys = iter(jax.random.split(jax.random.key(2), 8))
    for layer in (q, model.segments[0].attn.v):
        layer.lora["default"].b.set_value(jax.random.normal(next(keys), layer.lora["default"].b.shape))
    adapted, _ = model(TOKENS)
    assert float(jnp.abs(adapted - before).max()) > 1e-2
    w = np.asarray(q.base.kernel[...])
    lora.merge(model)
    np.testing.assert_allclose(np.asarray(model(TOKENS)[0]), np.asarray(adapted), atol=1e-4)
    lora.unmerge(model)
    np.testing.assert_allclose(np.asarray(q.base.kernel[...]), w, atol=1e-6)


def test_a_train_step_changes_only_the_adapters_of_every_layer():
    model, _ = adapted_llama()
    tx = optax.sgd(0.1)
    defs, state = create_train_state(model, tx, lora.trainable_filter(model, modules_to_save=()))

    def loss_fn(m, batch, rng):
        logits, _ = m(batch["tokens"])
        loss = -jnp.sum(jax.nn.log_softmax(logits)[..., 0])
        return loss, {"loss": loss, "count": jnp.asarray(float(batch["tokens"].size))}

    step = jax.jit(make_train_step(defs, tx, loss_fn))
    new_state, _ = step(*step(state, {"tokens": TOKENS})[:1], {"tokens": TOKENS})  # two steps: B = 0 stops A's first
    # A and B of q and v moved in every layer (axis 0 is the layer)
    changed = jax.tree.map(lambda a, b: bool(jnp.all(jnp.any(a != b, axis=(1, 2)))), state.params, new_state.params)
    assert all(jax.tree.leaves(changed))
    frozen_same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state.frozen, new_state.frozen)
    assert all(jax.tree.leaves(frozen_same))


def test_adapter_dropout_on_stacked_layers_draws_one_mask_per_layer_and_call():
    model = random_llama(TINY)
    lora.add_lora(model, lora.LoraSpec(r"attn/(q|v)$", rank=4, dropout=0.5), rngs=nnx.Rngs(params=1, dropout=2))
    for _, layer in lora.lora_layers(model):
        layer.lora["default"].b.set_value(jax.random.normal(jax.random.key(3), layer.lora["default"].b[...].shape))
        keys = layer.lora["default"].dropout.rngs.key[...]
        assert keys.shape == (TINY.num_layers,) and not jnp.array_equal(jax.random.key_data(keys[0]),
                                                                        jax.random.key_data(keys[1]))
    first, second = model(TOKENS)[0], model(TOKENS)[0]                 # train mode: masks change per call
    assert not np.allclose(first, second)
    model.eval()
    np.testing.assert_array_equal(model(TOKENS)[0], model(TOKENS)[0])


def test_generate_runs_a_model_with_adapter_dropout_in_eval_mode():
    from research.models.generate import generate

    model = random_llama(TINY)
    lora.add_lora(model, lora.LoraSpec(r"attn/(q|v)$", rank=4, dropout=0.1), rngs=nnx.Rngs(params=1, dropout=2))
    model.eval()
    assert generate(model, [[1, 2, 3]], 4).shape == (1, 4)
