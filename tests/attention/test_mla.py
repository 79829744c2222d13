"""MLA: absorbed decode equals naive decode; the cache holds only the latent and the RoPE key."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from research.attention.mla import set_mla_decode
from research.upcycling.upcycle import UpcycleConfig, upcycle_gqa_to_mla
from research.core.mesh import make_mesh, shard_module
from research.models.generate import generate
from tests.models.tiny_llama import TINY, random_llama

PROMPT = np.random.RandomState(1).randint(0, TINY.vocab_size, (3, 9))


@pytest.fixture(scope="module")
def student():
    model, _ = upcycle_gqa_to_mla(random_llama(TINY), UpcycleConfig(kv_rank=12, rope_dim=4, q_rank=16, rope_mode="uniform"))
    return model


def decode_logits(model, steps=4):
    """Logits of a prefill followed by ``steps`` single-token decode steps (B, steps, V)."""
    cache = model.init_cache(PROMPT.shape[0], PROMPT.shape[1] + steps)
    logits, cache = model(jnp.asarray(PROMPT), None, cache)
    token = jnp.argmax(logits[:, -1], -1)
    out = []
    for i in range(steps):
        position = jnp.full((PROMPT.shape[0], 1), PROMPT.shape[1] + i)
        logits, cache = model(token[:, None], position, cache)
        out.append(logits[:, 0])
        token = jnp.argmax(logits[:, 0], -1)
    return np.stack(out, axis=1), cache


def test_absorbed_and_naive_decode_agree(student):
    set_mla_decode(student, "naive")
    naive, _ = decode_logits(student)
    set_mla_decode(student, "absorbed")
    absorbed, cache = decode_logits(student)
    np.testing.assert_allclose(absorbed, naive, atol=1e-5, rtol=0)
    assert set(cache[0]) == {"c_kv", "k_pe"}
    assert cache[0]["c_kv"].shape == (TINY.num_layers, 3, PROMPT.shape[1] + 4, 12)
    assert cache[0]["k_pe"].shape == (TINY.num_layers, 3, PROMPT.shape[1] + 4, 1, 4)


def test_cached_decode_equals_full_recompute(student):
    set_mla_decode(student, "absorbed")
    steps, _ = decode_logits(student, steps=2)
    tokens = jnp.asarray(PROMPT)
    for _ in range(2):  # the same greedy tokens, each step recomputing the whole sequence
        logits, _ = student(tokens)
        tokens = jnp.concatenate([tokens, jnp.argmax(logits[:, -1], -1)[:, None]], axis=1)
    full, _ = student(tokens)
    np.testing.assert_allclose(steps, np.asarray(full[:, PROMPT.shape[1]:]), atol=1e-5, rtol=0)


def test_kv_values_per_token(student):
    assert student.kv_values_per_token() == TINY.num_layers * (12 + 4)


def test_generation_sharded_on_eight_devices_equals_one_device(student):
    prompts = [list(p[: 3 + i % 5]) for i, p in enumerate(np.tile(PROMPT, (3, 1))[:8])]
    expected = generate(student, prompts, 5)
    mesh = make_mesh({"data": 4, "model": 2})
    shard_module(student, mesh)
    assert len(jax.tree.leaves(student)[0].sharding.device_set) == 8
    got = generate(student, prompts, 5, mesh=mesh)
    np.testing.assert_array_equal(got, expected)
