"""KV-cache generation equals recomputing the whole sequence at every step."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from research.models.generate import generate, sample_tokens
from tests.models.tiny_llama import random_llama


_logits = nnx.jit(lambda m, t: m(t)[0])  # one program for every prompt and step of the reference


def greedy_without_cache(model, prompt, steps, length=16):
    """Greedy decoding that runs the whole sequence through the model at every step. The sequence is
    right-padded to ``length`` (one compiled shape): causal attention keeps the padding invisible to
    the last real position, whose logits pick the next token."""
    tokens = list(prompt)
    for _ in range(steps):
        logits = _logits(model, jnp.asarray([tokens + [0] * (length - len(tokens))]))
        tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
    return tokens[len(prompt):]


def test_cached_greedy_equals_full_recompute_for_ragged_prompts():
    model = random_llama()
    prompts = [[5, 9, 2, 33, 7, 1, 8], [3], [11, 12, 13, 14]]
    out = generate(model, prompts, 6)
    assert out.shape == (3, 6)
    for prompt, row in zip(prompts, out):
        assert list(row) == greedy_without_cache(model, prompt, 6)


def test_eos_then_padding():
    model = random_llama()
    first = generate(model, [[5, 9, 2]], 4)[0]
    out = generate(model, [[5, 9, 2]], 4, eos_id=int(first[1]), pad_id=63)[0]
    assert list(out[:2]) == list(first[:2]) and list(out[2:]) == [63, 63]


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_tokens(logits, jax.random.key(i), 1.0, 0.7)[0]) for i in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert int(sample_tokens(logits, jax.random.key(0), 0.0)[0]) == 0
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(logits, jax.random.key(0), 1.0, 0.0)


def test_sampling_is_seeded():
    model = random_llama()
    a = generate(model, [[1, 2, 3]] * 2, 5, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, [[1, 2, 3]] * 2, 5, temperature=1.0, top_p=0.9, seed=3)
    np.testing.assert_array_equal(a, b)
