"""Model registry: shapes, dtypes, parameter counts, train/eval behaviour, options, jit + grad."""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.models import MODEL_NAMES, build_model, model_options


def rngs():
    # "rbg" keys: their random-number programs compile ~3x faster than threefry on CPU, and
    # building a model compiles one per distinct parameter shape; that dominates these tests.
    return nnx.Rngs(jax.random.key(0, impl="rbg"))


def build(name, shape=None, **kwargs):
    return build_model(name, num_classes=10, input_shape=shape or input_shape(name), rngs=rngs(),
                       **kwargs)


def input_shape(name):
    return (8, 8, 1) if name == "mlp" else (32, 32, 3)


@functools.cache
def abstract(name, shape=None, **kwargs):
    """The model with ShapeDtypeStruct leaves: structure and counts without running initialisers."""
    shape = shape or input_shape(name)
    return nnx.eval_shape(
        lambda: build_model(name, num_classes=10, input_shape=shape, rngs=rngs(), **kwargs))


def count_params(model):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def forward(model, x):
    return nnx.jit(lambda m, x: m(x))(model, x)


# bf16 runs use cheaper variants where the code path is the same (compile time on a 2-core CPU
# grows with ViT depth), and are where MobileNetV2 width 0.5 runs. ViT-small's 12 blocks are ViT-tiny's
# blocks at a larger width: float32 runs them at depth 4 (the full depth's parameters: test_param_counts).
BF16_OPTIONS = {"vit_tiny": {"depth": 2}, "vit_small": {"depth": 2},
                "mobilenet_v2": {"width_multiplier": 0.5}}
FLOAT32_OPTIONS = {"vit_small": {"depth": 4}}
FORWARD_CASES = [(name, jnp.float32, FLOAT32_OPTIONS.get(name, {})) for name in MODEL_NAMES] + [
    (name, jnp.bfloat16, BF16_OPTIONS.get(name, {})) for name in MODEL_NAMES]


@pytest.mark.parametrize("name,dtype,kwargs", FORWARD_CASES,
                         ids=[f"{n}-{jnp.dtype(d).name}" for n, d, _ in FORWARD_CASES])
def test_logits_shape_and_dtype(name, dtype, kwargs):
    shape = input_shape(name)
    model = build(name, dtype=dtype, **kwargs)
    model.eval()
    stats = lambda: nnx.state(model, nnx.BatchStat)  # noqa: E731
    before = jax.tree.map(jnp.copy, stats())  # a copy: nnx.state returns the live Variables
    # One program: the logits, and the head applied to the model's embedding (the head's input).
    logits, via_embedding = nnx.jit(lambda m, x: (m(x), m.head(m.embedding(x))))(
        model, jax.random.normal(jax.random.key(0), (2, *shape)))
    np.testing.assert_allclose(np.asarray(via_embedding, np.float32), np.asarray(logits), rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 10)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    # Eval mode uses (and keeps) the running statistics.
    assert all(jax.tree.leaves(jax.tree.map(jnp.array_equal, before, stats())))
    # Parameters stay float32 whatever the computation dtype.
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}


def resnet_param_formula(widths, blocks_per_stage, projection, in_channels=3, classes=10):
    """Independent count: 3x3 convs without bias, BN = 2 params per channel, linear head."""
    total = 9 * in_channels * widths[0] + 2 * widths[0]  # stem conv + BN
    in_ch = widths[0]
    for width, n in zip(widths, blocks_per_stage, strict=True):
        for _ in range(n):
            total += 9 * in_ch * width + 9 * width * width + 4 * width  # two convs + two BNs
            if projection and in_ch != width:
                total += in_ch * width + 2 * width  # 1x1 conv + BN shortcut
            in_ch = width
    return total + in_ch * classes + classes


def test_param_counts():
    # ResNet-20 with option-A (parameter-free) shortcuts has 269,722 parameters; this is also the
    # count of the PyTorch reference in test_resnet_torch.py. The often-quoted 272,474 is ResNet-20
    # with option-B 1x1-conv+BN projections on the two downsampling blocks:
    # (16*32 + 2*32) + (32*64 + 2*64) = 2,752 more.
    assert resnet_param_formula((16, 32, 64), (3, 3, 3), projection=False) == 269_722
    assert resnet_param_formula((16, 32, 64), (3, 3, 3), projection=True) == 272_474
    assert count_params(abstract("resnet20")) == 269_722
    assert resnet_param_formula((64, 128, 256, 512), (2, 2, 2, 2), projection=True) == 11_173_962
    assert count_params(abstract("resnet18")) == 11_173_962
    # torchvision mobilenet_v2: 3,504,872 for 1000 classes; 1280 * 990 + 990 fewer for 10.
    assert count_params(abstract("mobilenet_v2")) == 3_504_872 - 1281 * 990
    assert count_params(abstract("mlp")) == (64 * 512 + 512) + (512 * 256 + 256) + (256 * 10 + 10)
    assert count_params(abstract("vit_tiny")) == 5_362_762
    assert count_params(abstract("vit_small")) == 21_342_346


def test_mlp_hidden_sizes_option():
    assert count_params(abstract("mlp", hidden_sizes=(32,))) == (64 * 32 + 32) + (32 * 10 + 10)
    assert count_params(abstract("mlp", hidden_sizes=())) == 64 * 10 + 10  # logistic regression


def test_build_in_another_thread():
    # Variables are created with eager sharding off one by one, so no thread-local setting matters.
    result = []

    def build_abstract():  # not the cached abstract(): it must really build in the thread
        result.append(nnx.eval_shape(lambda: build("resnet20", (8, 8, 3))))

    thread = threading.Thread(target=build_abstract)
    thread.start()
    thread.join()
    assert count_params(result[0]) == 269_722


def test_blocks_lists():
    assert len(abstract("resnet20").blocks) == 9
    assert len(abstract("resnet18").blocks) == 8
    assert len(abstract("mobilenet_v2").blocks) == 17
    assert len(abstract("vit_tiny").blocks) == 12
    assert len(abstract("vit_small", depth=2).blocks) == 2


def test_dropout_only_in_train_mode():
    model = build("vit_tiny", (8, 8, 3), dropout=0.5, depth=1)
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Dropout)]
    assert len(layers) == 3 and all(layer.rate == 0.5 for layer in layers)  # embed, block, mlp
    x = jnp.ones((64,))
    model.train()
    dropped = layers[-1](x)
    assert 0 < int(jnp.sum(dropped == 0)) < 64  # a random mask, scaled by 1 / (1 - rate)
    assert not jnp.array_equal(dropped, layers[-1](x))  # the RNG state advances
    model.eval()
    assert all(jnp.array_equal(layer(x), x) for layer in layers)
    # No dropout (the default): no RNG state in the model, just Params and nothing else.
    plain = abstract("vit_tiny", depth=1)
    assert not nnx.state(plain, nnx.Not(nnx.Param)).flat_state().paths


def test_unknown_name_lists_choices():
    choices = "choose one of: mlp, resnet20, resnet18, mobilenet_v2, vit_tiny, vit_small, efficientnet_lite0$"
    with pytest.raises(ValueError, match="^unknown model 'foo'; " + choices):
        build_model("foo", num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))


def test_unknown_option_lists_allowed():
    with pytest.raises(ValueError, match="'patch_size'.*'mobilenet_v2'.*width_multiplier"):
        build_model("mobilenet_v2", num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0),
                    patch_size=4)
    with pytest.raises(ValueError, match="'dropout'.*'resnet20'.*none"):
        build_model("resnet20", num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0),
                    dropout=0.1)
    assert model_options("vit_tiny") == ("patch_size", "dropout", "depth")


def test_mobilenet_width_multipliers():
    # Both widths run in test_logits_shape_and_dtype (1.0 in float32, 0.5 in bfloat16).
    half, full = abstract("mobilenet_v2", width_multiplier=0.5), abstract("mobilenet_v2")
    assert (half.stem.conv.out_features, full.stem.conv.out_features) == (16, 32)
    # 24 * 0.5 = 12 rounds up to a multiple of 8.
    assert (half.blocks[1].project.conv.out_features, full.blocks[1].project.conv.out_features) == (
        16, 24)
    # The last conv stays at 1280 for multipliers <= 1 and scales above.
    assert half.last_conv.conv.out_features == full.last_conv.conv.out_features == 1280
    assert abstract("mobilenet_v2", width_multiplier=1.4).last_conv.conv.out_features == 1792


def test_mobilenet_small_inputs_automatic():
    small, large = abstract("mobilenet_v2"), abstract("mobilenet_v2", shape=(96, 96, 3))
    assert small.stem.conv.strides == 1 and small.blocks[1].depthwise.conv.strides == 1
    assert large.stem.conv.strides == 2 and large.blocks[1].depthwise.conv.strides == 2
    forced = abstract("mobilenet_v2", small_inputs=False)
    assert forced.stem.conv.strides == 2


def test_vit_patch_size_default():
    assert abstract("vit_tiny").pos_embed.shape == (1, 8 * 8 + 1, 192)  # patch 4 on 32 px
    # patch 16 above 64 px
    assert abstract("vit_tiny", shape=(96, 96, 3)).pos_embed.shape == (1, 6 * 6 + 1, 192)
    assert abstract("vit_tiny", patch_size=8).pos_embed.shape == (1, 4 * 4 + 1, 192)
    with pytest.raises(ValueError, match="divisible"):
        abstract("vit_tiny", patch_size=5)


def _sharding(variable):
    return variable.get_metadata().get("out_sharding")


def test_sharding_annotations():
    resnet, mobilenet, vit = abstract("resnet20"), abstract("mobilenet_v2"), abstract("vit_tiny")
    assert _sharding(resnet.blocks[0].conv1.kernel) == (None, None, "conv_in", "conv_out")
    assert _sharding(resnet.head.kernel) == ("embed", "classes")
    assert _sharding(mobilenet.blocks[0].depthwise.conv.kernel) == (None, None, None, "conv_out")
    attention = vit.blocks[0].attn
    assert _sharding(attention.q.kernel) == ("embed", "heads")
    assert _sharding(attention.out.kernel) == ("heads", "embed")
    assert _sharding(vit.blocks[0].mlp.fc1.kernel) == ("embed", "mlp")
    assert _sharding(vit.blocks[0].mlp.fc2.kernel) == ("mlp", "embed")


def test_jit_grad_through_split_merge_updates_batch_stats():
    """The training-loop pattern: split off the Params, merge inside a jitted grad, return stats."""
    model = build("resnet20", (8, 8, 3))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, x, y):
        def loss_fn(params):
            # copy=True: fresh Variables inside the grad trace, so BatchNorm may update its stats.
            model = nnx.merge(graphdef, params, rest, copy=True)
            logp = jax.nn.log_softmax(model(x))
            return -jnp.mean(logp[jnp.arange(len(y)), y]), nnx.state(model, nnx.Not(nnx.Param))
        return jax.grad(loss_fn, has_aux=True)(params)

    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    grads, new_rest = step(params, rest, x, jnp.arange(4))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["head"]["kernel"][...]).sum()) > 0
    assert jax.tree.structure(new_rest) == jax.tree.structure(rest)
    # Train mode updated the running statistics: flax momentum 0.9 (torch 0.1) from mean 0.
    batch_mean = jnp.mean(model.stem_conv(x), axis=(0, 1, 2))
    np.testing.assert_allclose(new_rest["stem_bn"]["mean"][...], 0.1 * batch_mean, atol=1e-6)
    assert not jnp.array_equal(new_rest["blocks"][8]["bn2"]["var"][...],
                               rest["blocks"][8]["bn2"]["var"][...])
