"""Mesh construction, logical sharding rules, and 1-device vs 8-device equality of a train step."""
import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from research.core.config import ConfigError, apply_overrides, build, section
from research.core.mesh import (IndivisibleDimError, LogicalRules, MeshConfig, logical_to_spec, make_mesh, mesh_shape,
                                shard_batch)
from research.core.train import (classification_loss, create_train_state, jit_train_step, make_train_step,
                                 place_on_mesh)
from research.data.augment import make_preprocess
from research.models import build_model


def test_mesh_shape_resolves_minus_one():
    assert mesh_shape({"data": -1, "model": 2}, 8) == (4, 2)
    assert mesh_shape({"data": -1}, 8) == (8, 1)
    assert mesh_shape({"data": 2, "model": -1}, 8) == (2, 4)


@pytest.mark.parametrize("axes", [{"data": 3, "model": -1}, {"data": -1, "model": -1}, {"data": 2, "model": 2}, {"pipe": 2}])
def test_mesh_shape_rejects_what_does_not_fit(axes):
    with pytest.raises(ConfigError):
        mesh_shape(axes, 8)


def test_logical_rules_split_divisible_dimensions_once_per_array():
    mesh = make_mesh({"data": 4, "model": 2})
    assert logical_to_spec((None, None, "conv_in", "conv_out"), (3, 3, 16, 32), mesh) == P(None, None, None, "model")
    assert logical_to_spec(("embed", "classes"), (64, 10), mesh) == P(None, None)
    assert logical_to_spec(("embed", "q_heads", "head_dim"), (64, 4, 16), mesh) == P(None, "model", None)
    assert logical_to_spec(("mlp", "vocab"), (8, 16), mesh) == P("model", None)  # `model` already used


def test_an_indivisible_dimension_fails_naming_it_unless_replication_is_opted_in():
    mesh = make_mesh({"data": 4, "model": 2})
    with pytest.raises(IndivisibleDimError, match=r"'mlp' of size 7 \(shape \(64, 7\)\).*'model' of size 2"):
        logical_to_spec(("embed", "mlp"), (64, 7), mesh)
    assert logical_to_spec(("embed", "mlp"), (64, 7), mesh, LogicalRules(replicate_indivisible=True)) == P(None, None)


def test_mesh_section_takes_rules_from_the_command_line_and_rejects_an_unknown_axis():
    config = ml_collections.ConfigDict({"mesh": section(MeshConfig)})
    changed = apply_overrides(config, {"mesh.model": "2", "mesh.rules": "(('mlp', None), ('embed', 'model'))"},
                              from_strings=True)
    layout = build(MeshConfig, changed, "mesh")
    assert layout.axes == {"data": -1, "model": 2}
    assert dict(layout.logical.table) == {"mlp": None, "embed": "model"}
    bad = apply_overrides(config, {"mesh.rules": "(('mlp', 'pipe'),)"}, from_strings=True)
    with pytest.raises(ConfigError, match=r"^config key 'mesh.rules' .*mesh axis in \('data', 'model'\) or None"):
        build(MeshConfig, bad, "mesh")


def _one_step(mesh, model_name, input_shape):
    kwargs = {"depth": 2} if model_name.startswith("vit") else {}  # each block is the same code path
    model = build_model(model_name, num_classes=10, input_shape=input_shape, rngs=nnx.Rngs(0), **kwargs)
    tx = optax.sgd(0.1, momentum=0.9)
    defs, state = create_train_state(model, tx, nnx.Param, seed=0)
    state, shardings = place_on_mesh(state, mesh)
    loss_fn, _ = classification_loss(make_preprocess([0.5] * input_shape[-1], [0.25] * input_shape[-1], 1, True), 0.1)
    step = jit_train_step(make_train_step(defs, tx, loss_fn), shardings, mesh)
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (16,) + input_shape, dtype=np.uint8),
             "labels": rng.integers(0, 10, 16).astype(np.int32), "mask": np.ones(16, np.float32)}
    new_state, sums = step(state, shard_batch(batch, mesh))
    return new_state, sums


@pytest.mark.parametrize("model_name,input_shape", [("resnet20", (8, 8, 3)), ("vit_tiny", (8, 8, 3))])
def test_train_step_same_on_one_device_and_on_data4_model2_mesh(model_name, input_shape):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    single, s1 = _one_step(make_mesh({"data": 1, "model": 1}, jax.devices()[:1]), model_name, input_shape)
    sharded, s8 = _one_step(make_mesh({"data": 4, "model": 2}), model_name, input_shape)

    # The mesh really splits parameters over `model` (not everything replicated).
    specs = [x.sharding.spec for x in jax.tree.leaves(sharded.params)]
    assert any("model" in spec for spec in specs)

    np.testing.assert_allclose(s1["loss"] / s1["count"], s8["loss"] / s8["count"], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(single)), jax.tree.leaves(jax.device_get(sharded)), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-5)
