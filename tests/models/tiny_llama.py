"""A tiny random Llama for unit tests (weights larger than the 0.02 init, so every term matters)."""
import jax
from flax import nnx

from research.models.llama import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                   rope_theta=500.0)


def random_llama(config=TINY, seed=0):
    model = Llama(config, rngs=nnx.Rngs(seed))
    # Larger weights than the 0.02 init, so that greedy choices depend on the whole context.
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), state))
    return model
