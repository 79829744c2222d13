"""LoRA: zero-init no-op, the update's math per layer kind, merge/unmerge, named adapters,
adapters-only checkpoints, training only the adapters, and 1-device vs 8-device equality."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from research.adapters.lora import (LoraAdapter, LoraLayer, LoraSpec, add_lora, delete_adapter, load_adapters,
                                    lora_filter, merge, merge_and_unload, save_adapters, set_active,
                                    trainable_filter, unmerge)
from research.core.checkpoint import CheckpointMismatchError
from research.core.mesh import make_mesh, shard_batch
from research.core.train import (classification_loss, create_train_state, jit_train_step, make_train_step,
                                 place_on_mesh)
from research.data.augment import make_preprocess
from research.models import build_model

VIT_TARGETS = r"attn/(q|v)$|mlp/fc1$"


def vit(seed=0, depth=2):
    return build_model("vit_tiny", num_classes=10, input_shape=(8, 8, 3), rngs=nnx.Rngs(seed), depth=depth)


def images(n=4, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, 8, 8, 3))


def randomize(model, name=None, seed=1, which=("b",)):
    """Random values for the adapters' factors (B is zero after add_lora, which hides bugs)."""
    key = jax.random.key(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LoraLayer):
            for key_name, adapter in node.lora.items():
                if name is None or key_name == name:
                    for ab in which:
                        key, sub = jax.random.split(key)
                        var = getattr(adapter, ab)
                        var.set_value(0.1 * jax.random.normal(sub, var[...].shape))


def params(model, filt=nnx.Param) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, filt))}


class Holder(nnx.Module):
    """A one-layer model: add_lora replaces attributes of a parent, so the layer needs one."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


# --- zero-init and the update's math ------------------------------------------------------------

@pytest.mark.parametrize("name,pattern,expected", [
    ("vit_tiny", r"attn/(q|k|v|out)$|mlp/fc\d$|patch_embed", 13),
    ("resnet20", r"conv", 19),
])
def test_fresh_adapter_is_a_no_op_and_random_b_is_not(name, pattern, expected):
    kwargs = {"depth": 2} if name == "vit_tiny" else {}
    model = build_model(name, num_classes=10, input_shape=(8, 8, 3), rngs=nnx.Rngs(0), **kwargs)
    model.eval()
    forward = nnx.jit(lambda m, x: m(x))  # one compile per graph is faster than op-by-op here
    x = images()
    before = np.asarray(forward(model, x))
    wrapped = add_lora(model, LoraSpec(pattern, rank=4), rngs=nnx.Rngs(1))
    assert len(wrapped) == expected
    model.eval()
    np.testing.assert_array_equal(np.asarray(forward(model, x)), before)
    randomize(model)
    assert np.max(np.abs(np.asarray(forward(model, x)) - before)) > 1e-3


def test_linear_equals_hand_computed_lora():
    holder = Holder(nnx.Linear(5, 7, rngs=nnx.Rngs(0)))
    holder.layer.bias.set_value(jax.random.normal(jax.random.key(3), (7,)))
    add_lora(holder, LoraSpec("layer", rank=3, alpha=6.0), rngs=nnx.Rngs(1))
    randomize(holder)
    layer = holder.layer
    w, bias = np.asarray(layer.base.kernel[...], np.float64), np.asarray(layer.base.bias[...], np.float64)
    a, b = (np.asarray(layer.lora["default"].a[...], np.float64), np.asarray(layer.lora["default"].b[...], np.float64))
    assert a.shape == (5, 3) and b.shape == (3, 7)
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 4, 5)))
    expected = x @ w + bias + (6.0 / 3) * (x @ a @ b)
    np.testing.assert_allclose(holder(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding,lax_padding,strides,dilation", [
    ("SAME", "SAME", 1, 1),
    (((1, 0), (2, 1)), ((1, 0), (2, 1)), 2, (1, 2)),
    (1, ((1, 1), (1, 1)), (2, 1), 1),
])
def test_conv_equals_lax_conv_with_merged_kernel(padding, lax_padding, strides, dilation):
    conv = nnx.Conv(4, 6, (3, 3), strides=strides, padding=padding, kernel_dilation=dilation, rngs=nnx.Rngs(0))
    conv.bias.set_value(jax.random.normal(jax.random.key(3), (6,)))
    holder = Holder(conv)
    add_lora(holder, LoraSpec("layer", rank=2, alpha=3.0), rngs=nnx.Rngs(1))
    randomize(holder)
    adapter = holder.layer.lora["default"]
    assert adapter.a[...].shape == (3, 3, 4, 2) and adapter.b[...].shape == (2, 6)
    x = jax.random.normal(jax.random.key(2), (2, 9, 8, 4))
    kernel = conv.kernel[...] + 1.5 * jnp.einsum("hwir,ro->hwio", adapter.a[...], adapter.b[...])
    strides2 = (strides,) * 2 if isinstance(strides, int) else strides
    dilation2 = (dilation,) * 2 if isinstance(dilation, int) else dilation
    expected = lax.conv_general_dilated(x, kernel, strides2, lax_padding, rhs_dilation=dilation2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=lax.Precision.HIGHEST) + conv.bias[...]
    np.testing.assert_allclose(holder(x), expected, rtol=1e-5, atol=1e-5)
    merge(holder)  # the merged base conv computes the same function
    np.testing.assert_allclose(holder(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("einsum_str,kernel_shape,bias_shape,x_shape,delta_str", [
    ("btd,dhk->bthk", (5, 2, 3), (2, 3), (2, 4, 5), "dr,rhk->dhk"),
    ("nd,kd->nk", (4, 5), (4,), (3, 5), "dr,rk->kd"),  # output axis first in the kernel
    ("bthk,hkd->btd", (2, 3, 5), (5,), (2, 4, 2, 3), "hkr,rd->hkd"),  # attention output: heads contracted
    ("bhd,hdk->bhk", (2, 5, 3), (2, 3), (4, 2, 5), "hdr,rk->hdk"),  # h batched: the dense-delta path
])
def test_einsum_equals_dense_delta(einsum_str, kernel_shape, bias_shape, x_shape, delta_str):
    layer = nnx.Einsum(einsum_str, kernel_shape, bias_shape, rngs=nnx.Rngs(0))
    holder = Holder(layer)
    add_lora(holder, LoraSpec("layer", rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    randomize(holder)
    adapter = holder.layer.lora["default"]
    x = jax.random.normal(jax.random.key(2), x_shape)
    kernel = layer.kernel[...] + 2.0 * jnp.einsum(delta_str, adapter.a[...], adapter.b[...])
    expected = layer(x) - jnp.einsum(einsum_str, x, layer.kernel[...]) + jnp.einsum(einsum_str, x, kernel)
    np.testing.assert_allclose(holder(x), expected, rtol=1e-5, atol=1e-5)
    before = np.asarray(layer.kernel[...])
    merge(holder)
    np.testing.assert_allclose(holder(x), expected, rtol=1e-5, atol=1e-5)
    unmerge(holder)
    np.testing.assert_allclose(layer.kernel[...], before, atol=1e-6)


def test_dropout_on_adapter_input_follows_train_and_eval_mode():
    holder = Holder(nnx.Linear(16, 8, rngs=nnx.Rngs(0)))
    add_lora(holder, LoraSpec("layer", rank=4, alpha=8.0, dropout=0.5), rngs=nnx.Rngs(params=1, dropout=2))
    randomize(holder)
    x = jax.random.normal(jax.random.key(2), (3, 16))
    layer = holder.layer
    adapter = layer.lora["default"]
    clean = layer.base(x) + 2.0 * x @ adapter.a[...] @ adapter.b[...]
    holder.eval()
    np.testing.assert_allclose(holder(x), clean, rtol=1e-5, atol=1e-5)
    holder.train()
    first, second = holder(x), holder(x)
    assert not np.allclose(first, clean) and not np.allclose(first, second)  # fresh mask per call


def test_layers_held_in_an_nnx_list_are_wrapped_and_unwrapped_in_place():
    model = build_model("mlp", num_classes=10, input_shape=(4, 4, 1), rngs=nnx.Rngs(0), hidden_sizes=(16, 8))
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    before = np.asarray(model(x))
    assert add_lora(model, LoraSpec(r"^layers/\d+$", rank=2), rngs=nnx.Rngs(1)) == ["layers/0", "layers/1"]
    assert isinstance(model.layers[1], LoraLayer) and "layers/1/base/kernel" in params(model)
    np.testing.assert_array_equal(np.asarray(model(x)), before)
    delete_adapter(model, "default")
    assert isinstance(model.layers[1], nnx.Linear) and not params(model, lora_filter())


# --- merge, unmerge, merge_and_unload ---------------------------------------------------------

def test_merge_then_unmerge_restores_weights_and_merged_outputs_match():
    model = vit()
    add_lora(model, LoraSpec(VIT_TARGETS, rank=4), rngs=nnx.Rngs(1))
    randomize(model)
    x = images()
    adapted = np.asarray(model(x))
    base = {k: v for k, v in params(model).items() if "/lora/" not in k}
    merge(model)
    merged_base = {k: v for k, v in params(model).items() if "/lora/" not in k}
    assert not np.allclose(merged_base["blocks/0/attn/q/base/kernel"], base["blocks/0/attn/q/base/kernel"])
    np.testing.assert_array_equal(merged_base["blocks/0/attn/k/kernel"], base["blocks/0/attn/k/kernel"])
    np.testing.assert_allclose(model(x), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        merge(model)
    unmerge(model)
    for k, v in params(model).items():
        if "/lora/" not in k:
            np.testing.assert_allclose(v, base[k], rtol=0, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(model(x), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not merged"):
        unmerge(model)


def test_merge_and_unload_gives_original_param_paths_and_adapted_outputs():
    model = vit()
    original_paths = set(params(model))
    add_lora(model, [LoraSpec(r"attn/q$", rank=2), LoraSpec(VIT_TARGETS, rank=4, alpha=8.0)], rngs=nnx.Rngs(1))
    assert model.blocks[0].attn.q.lora["default"].rank == 2  # first matching spec wins
    assert model.blocks[0].attn.v.lora["default"].rank == 4
    randomize(model)
    x = images()
    adapted = np.asarray(model(x))
    out = merge_and_unload(model)
    assert out is model
    assert set(params(model)) == original_paths
    assert isinstance(model.blocks[1].mlp.fc1, nnx.Linear)
    np.testing.assert_allclose(model(x), adapted, rtol=1e-5, atol=1e-5)


# --- several named adapters --------------------------------------------------------------------

def test_two_named_adapters_add_up_switch_and_delete():
    holder = Holder(nnx.Linear(6, 5, rngs=nnx.Rngs(0)))
    add_lora(holder, LoraSpec("layer", rank=2), name="one", rngs=nnx.Rngs(1))
    add_lora(holder, LoraSpec("layer", rank=3, alpha=4.0), name="two", rngs=nnx.Rngs(2))
    randomize(holder, seed=5)
    x = jax.random.normal(jax.random.key(0), (4, 6))
    both = holder(x)  # new adapters are active
    set_active(holder, [])
    base = holder(x)
    set_active(holder, "one")
    one = holder(x)
    set_active(holder, ["two"])
    two = holder(x)
    np.testing.assert_allclose(both - base, (one - base) + (two - base), rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(one - two)) > 1e-3

    model = vit()
    add_lora(model, LoraSpec(r"attn/(q|v)$", rank=2), name="one", rngs=nnx.Rngs(1))
    add_lora(model, LoraSpec(r"attn/q$|mlp/fc1$", rank=4), name="two", rngs=nnx.Rngs(2))
    randomize(model, seed=7)
    x = images()
    set_active(model, "two")
    only_two = np.asarray(model(x))
    set_active(model, "one")
    assert np.max(np.abs(np.asarray(model(x)) - only_two)) > 1e-4
    set_active(model, ["one", "two"])
    delete_adapter(model, "one")
    assert not any("/lora/one/" in k for k in params(model))
    assert "blocks/0/attn/v/kernel" in params(model)  # left without adapters: unwrapped
    np.testing.assert_array_equal(np.asarray(model(x)), only_two)
    with pytest.raises(ValueError, match="unknown LoRA adapter"):
        set_active(model, "one")


# --- adapters-only checkpoints -----------------------------------------------------------------

def test_adapter_checkpoint_round_trip_holds_only_adapters(tmp_path):
    model = vit()
    add_lora(model, LoraSpec(r"attn/(q|v)$", rank=4), rngs=nnx.Rngs(1))
    randomize(model, which=("a", "b"))
    x = images()
    expected = np.asarray(model(x))
    directory = tmp_path / "adapters"
    saved = save_adapters(model, str(directory))
    assert len(saved) == 8 and all("/lora/default/" in p for p in saved)
    stored = ocp.StandardCheckpointer().metadata(str(directory / "arrays")).item_metadata.tree
    shapes = sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(stored, is_leaf=lambda x: hasattr(x, "shape")))
    assert shapes == [(4, 192)] * 4 + [(192, 4)] * 4  # only the 2 x 4 adapter factors

    fresh = vit()
    add_lora(fresh, LoraSpec(r"attn/(q|v)$", rank=4), rngs=nnx.Rngs(9))
    assert np.max(np.abs(np.asarray(fresh(x)) - expected)) > 1e-3
    load_adapters(fresh, str(directory))
    np.testing.assert_allclose(fresh(x), expected, rtol=1e-6, atol=1e-6)

    wrong_rank = vit()
    add_lora(wrong_rank, LoraSpec(r"attn/(q|v)$", rank=8), rngs=nnx.Rngs(9))
    untouched = params(wrong_rank, lora_filter())
    with pytest.raises(CheckpointMismatchError, match=r"blocks/0/attn/q/lora/default/a.*\(192, 4\).*\(192, 8\)"):
        load_adapters(wrong_rank, str(directory))
    for k, v in params(wrong_rank, lora_filter()).items():
        np.testing.assert_array_equal(v, untouched[k])

    missing = vit()
    add_lora(missing, LoraSpec(r"attn/q$", rank=4), rngs=nnx.Rngs(9))
    with pytest.raises(CheckpointMismatchError, match="blocks/0/attn/v.*missing"):
        load_adapters(missing, str(directory))
    with pytest.raises(ValueError):  # no silent overwrite of an existing checkpoint
        save_adapters(model, str(directory))


# --- training only the adapters ----------------------------------------------------------------

def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).astype(np.int32), "mask": np.ones(n, np.float32)}


def _loss_fn():
    return classification_loss(make_preprocess([0.5] * 3, [0.25] * 3))[0]


@pytest.mark.parametrize("modules_to_save", [(), ("head",)])
def test_train_step_changes_only_adapter_params(modules_to_save):
    model = vit(depth=1)
    add_lora(model, LoraSpec(VIT_TARGETS, rank=4), rngs=nnx.Rngs(1))
    before = params(model)
    tx = optax.sgd(0.1)
    defs, state = create_train_state(model, tx, trainable_filter(model, modules_to_save=modules_to_save))
    trained = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state.params)}
    assert all("/lora/" in k or k.startswith("head/") for k in trained)
    new_state, _ = jax.jit(make_train_step(defs, tx, _loss_fn()))(state, _batch())
    after = params(nnx.merge(defs.train, new_state.params, new_state.frozen, new_state.rest))
    assert set(after) == set(before)
    for k, v in after.items():
        if "/lora/" in k and k.endswith("/b"):
            assert np.max(np.abs(v - before[k])) > 0, k  # B starts at zero, its gradient does not
        elif "/lora/" not in k and not (modules_to_save and k.startswith("head/")):
            np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert (np.max(np.abs(after["head/kernel"] - before["head/kernel"])) > 0) == bool(modules_to_save)


def _one_lora_step(mesh):
    model = vit(depth=1)
    add_lora(model, LoraSpec(VIT_TARGETS, rank=4), rngs=nnx.Rngs(1))
    randomize(model)  # non-zero B, so gradients reach A too
    tx = optax.sgd(0.1, momentum=0.9)
    defs, state = create_train_state(model, tx, trainable_filter(model), seed=0)
    state, shardings = place_on_mesh(state, mesh)
    step = jit_train_step(make_train_step(defs, tx, _loss_fn()), shardings, mesh)
    return step(state, shard_batch(_batch(16), mesh))


def test_sharded_lora_train_step_equals_one_device_and_adapters_shard_like_base():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    single, s1 = _one_lora_step(make_mesh({"data": 1, "model": 1}, jax.devices()[:1]))
    sharded, s8 = _one_lora_step(make_mesh({"data": 4, "model": 2}))

    specs = {"/".join(map(str, p)): v.get_value().sharding.spec for p, v in nnx.to_flat_state(sharded.params)}
    assert specs["blocks/0/attn/q/lora/default/b"] == P(None, "model")  # kernel ("embed", "heads")
    assert specs["blocks/0/attn/q/lora/default/a"] == P(None, None)
    assert specs["blocks/0/mlp/fc1/lora/default/b"] == P(None, "model")  # kernel ("embed", "mlp")

    np.testing.assert_allclose(s1["loss"] / s1["count"], s8["loss"] / s8["count"], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(single.params)), jax.tree.leaves(jax.device_get(sharded.params)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-5)


# --- bad input -----------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    model = vit()
    with pytest.raises(ValueError, match=r"match no layer.*blocks/0/attn/q \(Linear\).*patch_embed \(Conv\)"):
        add_lora(model, LoraSpec("attention/query"), rngs=nnx.Rngs(0))
    add_lora(model, LoraSpec(r"attn/q$"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already exists"):
        add_lora(model, LoraSpec(r"attn/(q|v)$"), rngs=nnx.Rngs(0))
    assert isinstance(model.blocks[0].attn.v, nnx.Linear)  # a failed call changes nothing
    for bad in (dict(rank=0), dict(rank=2.5), dict(dropout=1.0), dict(dropout=-0.1)):
        with pytest.raises(ValueError, match="rank|dropout"):
            LoraSpec("q", **bad)
    with pytest.raises(ValueError, match="invalid LoRA adapter name"):
        add_lora(model, LoraSpec(r"attn/k$"), name="train", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        merge(model, "other")
    with pytest.raises(ValueError, match="modules_to_save"):
        trainable_filter(model, modules_to_save=("classifier",))

    grouped = Holder(nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="LoRA on grouped conv not supported"):
        add_lora(grouped, LoraSpec("layer"), rngs=nnx.Rngs(0))
    assert isinstance(grouped.layer, nnx.Conv)
    outer_product = Holder(nnx.Einsum("n,k->nk", (3,), kernel_init=nnx.initializers.normal(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="cannot infer the LoRA structure"):
        add_lora(outer_product, LoraSpec("layer"), rngs=nnx.Rngs(0))


def test_lora_filter_selects_one_adapter_by_name():
    model = vit(depth=1)
    add_lora(model, LoraSpec(r"attn/q$"), name="one", rngs=nnx.Rngs(0))
    add_lora(model, LoraSpec(r"attn/(q|v)$"), name="two", rngs=nnx.Rngs(1))
    assert len(params(model, lora_filter())) == 6
    assert set(params(model, lora_filter("two"))) == {f"blocks/0/attn/{m}/lora/two/{ab}" for m in "qv" for ab in "ab"}
    assert all(isinstance(v, LoraAdapter) for v in model.blocks[0].attn.q.lora.values())
