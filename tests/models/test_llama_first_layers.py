"""first_layers: the prefix of a Llama, as a model of its own."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from research.attention.gqa import GQAttention
from research.models.llama import Llama, first_layers
from tests.models.tiny_llama import TINY, random_llama


def test_first_layers_equals_the_full_model_with_the_later_layers_silenced():
    """A layer whose output projections (attn.o, mlp.down) are zero passes x through unchanged, so
    the full model with layers n.. silenced must give first_layers(model, n)'s logits; n = 3 of
    two 2-layer segments cuts inside the second segment."""
    config = dataclasses.replace(TINY, num_layers=4)
    rngs = nnx.Rngs(3)
    segments = [Llama.stacked_layers(config, lambda r: GQAttention(config, rngs=r), 2, rngs) for _ in range(2)]
    model = random_llama(config)
    hybrid = Llama(config, rngs=rngs, segments=segments, layer_kinds=["gqa"] * 4)
    nnx.update(hybrid, jax.tree.map(lambda a: a + 0.3, nnx.state(hybrid, nnx.Param)))
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, config.vocab_size)
    logits = nnx.jit(lambda m: m(tokens)[0])  # one compile per model structure, not op by op
    for full in (model, hybrid):
        whole = logits(full)
        assert jnp.array_equal(logits(first_layers(full, 4)), whole)
        short = first_layers(full, 3)
        assert short.config.num_layers == 3 and sum(short.segment_sizes()) == 3
        # Silence layer 3 (the last of the last segment) in the full model.
        last = full.segments[-1]
        for kernel in (last.attn.o.kernel, last.mlp.down.kernel):
            kernel[...] = kernel[...].at[-1].set(0.0)
        silenced = logits(full)
        assert not jnp.allclose(silenced, whole)
        assert jnp.allclose(logits(short), silenced, atol=1e-5)
    with pytest.raises(ValueError, match=r"num_layers must lie in \[1, 4\]"):
        first_layers(model, 5)
