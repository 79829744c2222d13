"""Switching efficient backprop on for chosen layers of the framework's models, also on a mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.backprop.apply import (enable_gradient_filter, enable_lbp_wht, layer_params_filter, select_layers,
                                     trace_layers)
from research.core.mesh import make_mesh, shard_batch
from research.core.train import classification_loss, create_train_state, jit_train_step, make_train_step, place_on_mesh
from research.models import build_model


def _model(name, shape=(16, 16, 3), **kw):
    model = build_model(name, num_classes=5, input_shape=shape, rngs=nnx.Rngs(0), **kw)
    model.eval()
    return model


def _grads(model, x):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(params)


def test_trace_finds_convs_in_execution_order():
    calls = trace_layers(_model("resnet20"), (16, 16, 3))
    convs = [c.path for c in calls if c.kind == "conv"]
    assert convs[0] == "stem_conv" and len(convs) == 19
    assert [c.path for c in select_layers(calls, "conv", last_n=2)] == ["blocks/8/conv1", "blocks/8/conv2"]
    assert calls[-1].path == "head" and calls[-1].kind == "linear"
    mobilenet = trace_layers(_model("mobilenet_v2", width_multiplier=0.25), (16, 16, 3))
    assert [c.path for c in select_layers(mobilenet, "conv", last_n=2)] == ["blocks/16/project/conv", "last_conv/conv"]
    block_convs = select_layers(mobilenet, "conv", pattern=r"^blocks/1[56]/")
    assert [c.path.split("/")[-2] for c in block_convs] == ["expand", "depthwise", "project"] * 2
    assert block_convs[1].conv_args[3] == block_convs[1].input_shape[-1]  # depthwise: groups = channels


def test_unknown_pattern_lists_the_layers():
    calls = trace_layers(_model("resnet20"), (16, 16, 3))
    with pytest.raises(ValueError, match="blocks/8/conv2"):
        select_layers(calls, "conv", pattern="nothing")


def test_patch_size_one_on_every_conv_is_exact_backprop():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    model = _model("resnet20")
    want = _grads(model, x)
    enable_gradient_filter(model, select_layers(trace_layers(model, (16, 16, 3)), "conv"), patch_size=1)
    got = _grads(model, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_filter_on_last_convs_changes_only_their_backward():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
    model = _model("resnet20")
    logits, want = model(x), _grads(model, x)
    chosen = select_layers(trace_layers(model, (16, 16, 3)), "conv", last_n=2)
    enable_gradient_filter(model, chosen, patch_size=2)
    np.testing.assert_array_equal(model(x), logits)  # forward untouched
    got = _grads(model, x)
    np.testing.assert_allclose(got["head"]["kernel"][...], want["head"]["kernel"][...], rtol=1e-5)
    kernel = got["blocks"][8]["conv2"]["kernel"][...]
    np.testing.assert_allclose(kernel, jnp.broadcast_to(kernel[0, 0], kernel.shape))  # one value per tap
    assert not np.allclose(kernel, want["blocks"][8]["conv2"]["kernel"][...], rtol=1e-2)


def test_lbp_wht_with_all_bases_is_exact_and_low_pass_is_not():
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
    model = _model("vit_tiny", depth=2, patch_size=2)  # 8x8 token grid + class token
    logits, want = model(x), _grads(model, x)
    chosen = select_layers(trace_layers(model, (16, 16, 3)), "linear", pattern=r"^blocks/0/")
    assert len(chosen) == 6  # q, k, v, out, fc1, fc2
    enable_lbp_wht(model, chosen, k=15)
    np.testing.assert_array_equal(model(x), logits)
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(want))  # float32 round-off of sums
    for a, b in zip(jax.tree.leaves(_grads(model, x)), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)
    enable_lbp_wht(model, chosen, k=2)
    low = _grads(model, x)
    # block 0: its grid tokens reach the class token through block 1's attention (block 1's MLP
    # on grid tokens would not: only the class token is classified)
    assert not np.allclose(low["blocks"][0]["mlp"]["fc1"]["kernel"][...],
                           want["blocks"][0]["mlp"]["fc1"]["kernel"][...], rtol=1e-2)


def test_params_filter_selects_the_chosen_layers_and_head():
    model = _model("resnet20")
    chosen = select_layers(trace_layers(model, (16, 16, 3)), "conv", last_n=2)
    params = nnx.state(model, layer_params_filter(chosen))
    paths = sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(params))
    assert paths == ["blocks/8/conv1/kernel", "blocks/8/conv2/kernel", "head/bias", "head/kernel"]


def _filtered_step(mesh, model_name, method):
    """One SGD step of the chosen layers with filtered / LBP-WHT backward on ``mesh``."""
    kwargs = {"depth": 2} if model_name.startswith("vit") else {}  # each block is the same code path
    model = build_model(model_name, num_classes=10, input_shape=(16, 16, 3), rngs=nnx.Rngs(0), **kwargs)
    calls = trace_layers(model, (16, 16, 3))
    if method == "filter":
        chosen = select_layers(calls, "conv", last_n=4)
        enable_gradient_filter(model, chosen, patch_size=2)
    else:
        chosen = select_layers(calls, "linear", pattern=r"^blocks/")
        enable_lbp_wht(model, chosen, k=4)
    tx = optax.sgd(0.1)
    defs, state = create_train_state(model, tx, layer_params_filter(chosen), train_mode=False)
    state, shardings = place_on_mesh(state, mesh)
    loss_fn, _ = classification_loss(lambda images, rng, train: images.astype(jnp.float32) / 255.0)
    step = jit_train_step(make_train_step(defs, tx, loss_fn), shardings, mesh)
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
             "labels": rng.integers(0, 10, 16).astype(np.int32), "mask": np.ones(16, np.float32)}
    return step(state, shard_batch(batch, mesh))


@pytest.mark.parametrize("model_name,method", [("resnet20", "filter"), ("vit_tiny", "lbp")])
def test_filtered_train_step_same_on_one_device_and_on_data4_model2_mesh(model_name, method):
    single, s1 = _filtered_step(make_mesh({"data": 1, "model": 1}, jax.devices()[:1]), model_name, method)
    sharded, s8 = _filtered_step(make_mesh({"data": 4, "model": 2}), model_name, method)
    np.testing.assert_allclose(s1["loss"], s8["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(single.params)), jax.tree.leaves(jax.device_get(sharded.params)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
