"""Batched KV-cache generation for the decoder LMs of research.models.llama (GQA, MLA or hybrid).

One jitted program: a prefill of the right-padded prompts writes the cache, then ``lax.scan``
runs ``max_new_tokens`` decode steps. Sequence b continues from its own length ``lengths[b]``:
its next token is written at cache slot ``lengths[b]`` and RoPE position ``lengths[b]``, so prompts
of different lengths share one batch without left padding. Sampling is greedy
(``temperature=0``), with temperature, or nucleus (``top_p < 1``, Holtzman et al. 2020).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from research.core.mesh import batch_sharding


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
    """logits (B, V) -> tokens (B,) int32: argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the smallest set of tokens whose mass reaches top_p."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)  # the top token always stays
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p", "eos_id", "pad_id"))
def _generate(graphdef, state, tokens, lengths, key, *, max_new_tokens, temperature, top_p, eos_id, pad_id):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = tokens.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model(tokens, None, cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    def step(carry, step_key):
        cache, logits, position, done = carry
        token = jnp.where(done, pad_id, sample_tokens(logits, step_key, temperature, top_p))
        if eos_id is not None:
            done = done | (token == eos_id)
        logits, cache = model(token[:, None], position[:, None], cache)
        return (cache, logits[:, 0], position + 1, done), token

    carry = (cache, last, lengths.astype(jnp.int32), jnp.zeros((batch,), bool))
    _, new_tokens = jax.lax.scan(step, carry, jax.random.split(key, max_new_tokens))
    return new_tokens.T


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists: -> tokens (B, T_max) int32 and lengths (B,) int32."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             pad_id: int = 0, mesh: Mesh | None = None) -> np.ndarray:
    """Continues each prompt (a list of token ids) by ``max_new_tokens`` tokens -> (B, max_new_tokens).

    After ``eos_id`` a sequence emits ``pad_id``. The model may be sharded (``place_on_mesh``):
    parameters keep their placement; with ``mesh`` the prompts are split over its ``data`` axis.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokens, lengths = pad_prompts(prompts, pad_id)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    if mesh is not None and len(prompts) % mesh.shape["data"] == 0:
        tokens, lengths = (jax.device_put(a, batch_sharding(mesh)) for a in (tokens, lengths))
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, tokens, lengths, jax.random.key(seed),
                    max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                    eos_id=eos_id, pad_id=pad_id)
    return np.asarray(out)
