"""Attention kernels keep their head axis, so a `model` mesh axis places whole heads per device; a
head count the axis does not divide is a clear error; a sharded train step equals the 1-device step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.attention.gqa import GQAttention
from research.core.mesh import IndivisibleDimError, LogicalRules, make_mesh, shard_batch, shard_module
from research.core.train import create_train_state, jit_train_step, make_train_step, place_on_mesh
from research.models.llama import Llama, LlamaConfig

SMOLLM2 = LlamaConfig()  # the defaults are SmolLM2-135M's: D 576, 9 query / 3 KV heads of 64
# SmolLM2's attention widths with 8 query / 4 KV heads, one layer and a small vocabulary.
EVEN = dataclasses.replace(SMOLLM2, vocab_size=128, num_layers=1, num_heads=8, num_kv_heads=4, mlp_dim=256)


def _mesh():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    return make_mesh({"data": 4, "model": 2})


def test_each_device_holds_whole_heads_of_every_attention_kernel():
    attn = GQAttention(EVEN, rngs=nnx.Rngs(0))
    shard_module(attn, _mesh())
    heads = {"q": EVEN.num_heads, "k": EVEN.num_kv_heads, "v": EVEN.num_kv_heads, "o": EVEN.num_heads}
    for name, h in heads.items():
        kernel = getattr(attn, name).kernel[...]
        head_axis = 0 if name == "o" else 1
        assert kernel.shape[head_axis] == h and kernel.shape[head_axis + 1] == EVEN.head_dim
        for shard in kernel.addressable_shards:
            assert shard.data.shape[head_axis] == h // 2             # half of the heads ...
            assert shard.data.shape[head_axis + 1] == EVEN.head_dim  # ... each one whole
    # The KV heads a device holds are the ones its query heads read (group g(h) = h // 2).
    q_spec, k_spec = attn.q.kernel[...].sharding.spec, attn.k.kernel[...].sharding.spec
    assert q_spec == k_spec == jax.sharding.PartitionSpec(None, "model", None)


def test_smollm2_heads_on_a_model_axis_of_two_fail_naming_the_kernel_and_the_heads():
    attn = GQAttention(SMOLLM2, rngs=nnx.Rngs(0))
    with pytest.raises(IndivisibleDimError, match=r"^parameter \w/kernel: dimension '(q|kv)_heads' of size (9|3) "
                                                   r"\(shape .*\) does not divide over mesh axis 'model' of size 2"):
        shard_module(attn, _mesh())
    shard_module(attn, _mesh(), LogicalRules(replicate_indivisible=True))  # the explicit opt-in replicates
    assert attn.k.kernel[...].addressable_shards[0].data.shape == (576, 3, 64)


def _train_one_step(mesh):
    model = Llama(EVEN, rngs=nnx.Rngs(0))
    tx = optax.sgd(0.5)
    defs, state = create_train_state(model, tx, nnx.Param, seed=0)
    state, shardings = place_on_mesh(state, mesh)

    def loss_fn(m, batch, rng):
        logits, _ = m(batch["tokens"][:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][:, 1:, None], -1)
        return nll.sum(), {"loss": nll.sum(), "count": jnp.asarray(float(nll.size))}

    step = jit_train_step(make_train_step(defs, tx, loss_fn), shardings, mesh)
    tokens = np.random.default_rng(0).integers(0, EVEN.vocab_size, (8, 12)).astype(np.int32)
    return step(state, shard_batch({"tokens": tokens}, mesh))


def test_a_train_step_on_data4_model2_equals_the_one_device_step():
    single, s1 = _train_one_step(make_mesh({"data": 1, "model": 1}, jax.devices()[:1]))
    sharded, s8 = _train_one_step(_mesh())
    q = sharded.params["segments"][0]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, "model", None)  # (L, D, H, Dh): heads split
    np.testing.assert_allclose(s8["loss"], s1["loss"], rtol=1e-5)
    initial = nnx.state(Llama(EVEN, rngs=nnx.Rngs(0)), nnx.Param)["segments"][0]["attn"]["q"]["kernel"][...]
    assert float(np.abs(np.asarray(q) - np.asarray(initial)).max()) > 1e-4  # the step moved the heads it compares
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), single.params, sharded.params)
    scale = jax.tree.map(lambda a: float(np.abs(np.asarray(a)).max()), single.params)
    assert max(jax.tree.leaves(moved)) < 1e-5 * max(jax.tree.leaves(scale))
