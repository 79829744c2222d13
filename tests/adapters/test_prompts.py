"""Visual prompt tuning: forward against a hand-written reference, deep replacement, frozen backbone."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.adapters.prompts import (PromptedViT, PromptParam, add_prompts, prompt_and_head_filter,
                                       prompt_filter)
from research.core.mesh import make_mesh, shard_batch
from research.core.train import (classification_loss, create_train_state, jit_train_step, make_train_step,
                                 place_on_mesh)
from research.data.augment import make_preprocess
from research.models import build_model, filters

P, DEPTH, DIM, CLASSES = 3, 2, 192, 10


def tiny_vit(seed=0):
    return build_model("vit_tiny", num_classes=CLASSES, input_shape=(8, 8, 3), rngs=nnx.Rngs(seed), depth=DEPTH)


def images(n=4, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, 8, 8, 3))


def reference_tokens(vit, x, prompts):
    """[cls + pos_0, prompts, patches + pos_1:] written out by hand; prompts (P, D), P may be 0."""
    patches = vit.patch_embed(x)
    n, h, w, d = patches.shape
    pos = vit.pos_embed[...][0]
    cls = jnp.tile(vit.cls_token[...][0, 0] + pos[0], (n, 1, 1))
    patches = patches.reshape(n, h * w, d) + pos[1:]
    return jnp.concatenate([cls, jnp.tile(prompts, (n, 1, 1)), patches], axis=1)


def reference_logits(vit, x, first, later=None):
    """Blocks run by hand; ``later`` (deep) holds the prompts written into slots 1..P before blocks 1, 2, ..."""
    tokens = reference_tokens(vit, x, first)
    for i, block in enumerate(vit.blocks):
        if later is not None and i > 0:
            tokens = tokens.at[:, 1:1 + first.shape[0]].set(later[i - 1])
        tokens = block(tokens)
    return vit.head(vit.norm(tokens)[:, 0])


def set_prompts(model, value):
    model.prompts[...] = jnp.asarray(value, jnp.float32)


def size(state):
    return sum(x.size for x in jax.tree.leaves(state))


def noise(shape, seed=7):
    # Random, not a constant shift: LayerNorm removes a shift added to every feature of a token.
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_reference_without_prompts_is_the_plain_vit():
    # Checks the test's own reference against the real ViT, so the comparisons below mean something.
    vit, x = tiny_vit(), images()
    np.testing.assert_allclose(reference_logits(vit, x, jnp.zeros((0, DIM))), vit(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deep", [False, True])
def test_forward_matches_reference(deep):
    vit, x = tiny_vit(), images()
    model = add_prompts(vit, P, deep=deep, rngs=nnx.Rngs(1))
    prompts = model.prompts[...]
    expected = reference_logits(vit, x, prompts[0, 0], prompts[1:, 0]) if deep else reference_logits(vit, x, prompts[0])
    out = model(x)
    assert out.shape == (4, CLASSES) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_prompts_change_the_logits():
    vit, x = tiny_vit(), images()
    model = add_prompts(vit, P, rngs=nnx.Rngs(1))
    before = model(x)
    assert np.abs(before - vit(x)).max() > 1e-3
    set_prompts(model, model.prompts[...] + noise(model.prompts.shape))
    assert np.abs(model(x) - before).max() > 1e-3


def test_deep_prompts_of_a_later_block_change_the_output():
    x = images()
    model = add_prompts(tiny_vit(), P, deep=True, rngs=nnx.Rngs(1))
    before = model(x)
    set_prompts(model, model.prompts[...].at[1].add(noise((1, P, DIM))))
    assert np.abs(model(x) - before).max() > 1e-3


def test_deep_prompts_replace_the_previous_prompt_outputs():
    # Deep prompts for block 1 equal to block 0's own prompt outputs (one image, so they are shared)
    # must give the shallow model: the replacement hits exactly the prompt slots 1..P.
    vit, x = tiny_vit(), images(n=1)
    shallow = add_prompts(vit, P, rngs=nnx.Rngs(1))
    first = shallow.prompts[...][0]
    block0_prompt_outputs = vit.blocks[0](reference_tokens(vit, x, first))[0, 1:1 + P]
    deep = add_prompts(vit, P, deep=True, rngs=nnx.Rngs(2))
    set_prompts(deep, jnp.stack([first, block0_prompt_outputs])[:, None])
    np.testing.assert_allclose(deep(x), shallow(x), rtol=1e-5, atol=1e-5)
    # ... and other block-1 prompts give another output, so the slots really are overwritten.
    set_prompts(deep, jnp.stack([first, block0_prompt_outputs + noise((P, DIM))])[:, None])
    assert np.abs(deep(x) - shallow(x)).max() > 1e-3


def test_state_holds_each_param_once_under_vit_and_filters_select_prompts_and_head():
    vit = tiny_vit()
    model = add_prompts(vit, P, deep=True, rngs=nnx.Rngs(1))
    assert model.head is vit.head
    assert set(nnx.state(model).keys()) == {"vit", "prompts"}
    assert size(nnx.state(model, nnx.Param)) == size(nnx.state(vit, nnx.Param)) + DEPTH * P * DIM

    def paths(f):
        return sorted(path for path, _ in nnx.to_flat_state(nnx.state(model, f)))

    assert paths(prompt_filter()) == [("prompts",)]
    assert paths(prompt_and_head_filter()) == [("prompts",), ("vit", "head", "bias"), ("vit", "head", "kernel")]
    assert paths(filters.head(model)) == [("vit", "head", "bias"), ("vit", "head", "kernel")]
    assert isinstance(model.prompts, PromptParam) and isinstance(model.prompts, nnx.Param)


def test_init_is_vpt_uniform_or_normal_with_init_std():
    vit = tiny_vit()
    bound = math.sqrt(6.0 / (3 * 4 * 4 + DIM))  # patch 4, RGB
    values = np.asarray(add_prompts(vit, 50, deep=True, rngs=nnx.Rngs(1)).prompts[...])
    assert values.shape == (DEPTH, 1, 50, DIM)
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.99 * bound
    assert abs(values.std() - bound / math.sqrt(3)) < 0.02 * bound
    normal = np.asarray(add_prompts(vit, 50, rngs=nnx.Rngs(1), init_std=0.02).prompts[...])
    assert normal.shape == (1, 50, DIM) and abs(normal.std() - 0.02) < 0.002


@pytest.mark.parametrize("deep", [False, True])
def test_training_prompts_and_head_leaves_backbone_unchanged(deep):
    vit = tiny_vit()
    backbone_before = jax.device_get(nnx.state(vit, filters.backbone(vit)))
    model = add_prompts(vit, P, deep=deep, rngs=nnx.Rngs(1))
    tx = optax.sgd(0.5)
    defs, state = create_train_state(model, tx, prompt_and_head_filter())
    trainable = (DEPTH if deep else 1) * P * DIM + DIM * CLASSES + CLASSES
    assert size(state.params) == trainable
    before = jax.device_get(state.params)

    mesh = make_mesh({"data": 4, "model": 2})
    state, shardings = place_on_mesh(state, mesh)
    loss_fn, _ = classification_loss(make_preprocess([0.5] * 3, [0.25] * 3))
    step = jit_train_step(make_train_step(defs, tx, loss_fn), shardings, mesh)
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
             "labels": rng.integers(0, CLASSES, 16).astype(np.int32), "mask": np.ones(16, np.float32)}
    state, sums = step(state, shard_batch(batch, mesh))
    assert np.isfinite(sums["loss"])

    trained = nnx.merge(defs.eval, *jax.device_get((state.params, state.frozen, state.rest)))
    after = nnx.state(trained.vit, filters.backbone(trained.vit))
    for a, b in zip(jax.tree.leaves(backbone_before), jax.tree.leaves(after), strict=True):
        assert np.array_equal(a, b)
    assert not np.allclose(trained.prompts[...], before["prompts"][...])
    assert not np.allclose(trained.head.kernel[...], before["vit"]["head"]["kernel"][...])


def test_jit_over_split_state_equals_eager():
    x = images()
    model = add_prompts(tiny_vit(), P, deep=True, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    np.testing.assert_allclose(forward(state, x), model(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), model(x), rtol=1e-5, atol=1e-5)


def test_prompt_dropout_acts_in_training_only():
    vit, x = tiny_vit(), images()
    plain = add_prompts(vit, P, rngs=nnx.Rngs(1))
    dropped = add_prompts(vit, P, rngs=nnx.Rngs(1), dropout=0.5)
    np.testing.assert_array_equal(plain.prompts[...], dropped.prompts[...])
    dropped.eval()
    np.testing.assert_allclose(dropped(x), plain(x), rtol=1e-6, atol=1e-6)
    dropped.train()
    assert np.abs(dropped(x) - plain(x)).max() > 1e-3


@pytest.mark.parametrize("num_prompts", [0, -2, 2.5, True])
def test_bad_num_prompts_raises(num_prompts):
    with pytest.raises(ValueError, match="num_prompts"):
        PromptedViT(tiny_vit(), num_prompts, rngs=nnx.Rngs(0))


def test_non_vit_raises_type_error():
    resnet = build_model("resnet20", num_classes=CLASSES, input_shape=(8, 8, 3), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="ViT"):
        add_prompts(resnet, P, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="ViT"):
        add_prompts(add_prompts(tiny_vit(), P, rngs=nnx.Rngs(0)), P, rngs=nnx.Rngs(0))
