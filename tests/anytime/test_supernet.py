"""The supernet: its largest subnetwork is the plain ResNet, inactive channels and skipped blocks do
not matter, FLOPs by hand, and BatchNorm recalibration to a subnetwork's own statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.anytime import supernet
from research.models.resnet import ResNet, resnet20


def tiny(seed=0):
    return ResNet(num_classes=3, in_channels=3, widths=(4, 8), blocks_per_stage=(2, 2), shortcut="A",
                  rngs=nnx.Rngs(seed))


X = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))


def test_the_largest_subnetwork_is_the_plain_network_in_both_modes():
    model = tiny()
    gates = jnp.ones(4, jnp.int32)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        np.testing.assert_allclose(supernet.forward(model, X, 1.0, gates), model(X), rtol=1e-6, atol=1e-6)


def test_a_narrow_subnetwork_ignores_the_inactive_channels_and_a_skipped_block_its_weights():
    model = tiny()
    model.eval()
    np.testing.assert_array_equal(supernet.skippable(model), [True, True, False, True])
    gates = jnp.array([1, 0, 1, 1])
    before = supernet.forward(model, X, 0.5, gates)
    # Perturb block 0's inactive output channels (2 of 4 active at width 0.5) and all of block 1.
    block0, block1 = model.blocks[0], model.blocks[1]
    block0.conv1.kernel[...] = block0.conv1.kernel[...].at[..., 2:].add(5.0)
    block1.conv2.kernel[...] = block1.conv2.kernel[...] + 5.0
    np.testing.assert_allclose(supernet.forward(model, X, 0.5, gates), before, rtol=1e-6, atol=1e-6)
    assert not np.allclose(supernet.forward(model, X, 1.0, gates), before)
    assert not np.allclose(supernet.forward(model, X, 0.5, jnp.ones(4, jnp.int32)), before)


def test_flops_of_resnet20_and_of_its_subnetworks_by_hand():
    model = resnet20(num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    every = np.ones(9, int)
    # 3x3 convs: stem 9*3*16*32^2; stage 1: 3 * 9*32^2*(16*16+16*16); stage 2 at 16^2: 9*256*(16*32+32*32)
    # + 2 * 9*256*2*32*32; stage 3 at 8^2: 9*64*(32*64+64*64) + 2 * 9*64*2*64*64; head 64*10.
    assert supernet.flops(model, (32, 32), 1.0, every) == 40_551_040
    skip_last = every.copy()
    skip_last[-1] = 0
    assert supernet.flops(model, (32, 32), 1.0, skip_last) == 40_551_040 - 9 * 64 * 2 * 64 * 64
    assert supernet.flops(model, (32, 32), 0.5, every) < 40_551_040 / 3.5


@pytest.mark.parametrize("width, gates, message", [
    (0.0, [1, 1, 1, 1], r"width must lie in \(0, 1\]"),
    (0.5, [1, 1, 1], "gates must be 4 values of 0 or 1"),
    (0.5, [1, 1, 0, 1], r"blocks \[2\] change shape and cannot be skipped"),
])
def test_a_bad_subnetwork_is_named(width, gates, message):
    with pytest.raises(ValueError, match=message):
        supernet.check_subnet(tiny(), width, gates)


def test_recalibration_sets_the_running_statistics_to_the_subnetworks_mean_batch_statistics():
    model = tiny()
    width, gates = 0.5, jnp.array([1, 0, 1, 1])
    batches = [jax.random.normal(jax.random.key(k), (5, 8, 8, 3)) * (1 + k) for k in range(3)]
    supernet.recalibrate(model, batches, width, gates)
    # Directly: the stem BN's batch mean and (biased) variance per batch, averaged over the batches.
    means = [jnp.mean(model.stem_conv(x), axis=(0, 1, 2)) for x in batches]
    np.testing.assert_allclose(model.stem_bn.mean[...], np.mean(means, 0), rtol=1e-4, atol=1e-5)
    variances = [jnp.var(model.stem_conv(x), axis=(0, 1, 2)) for x in batches]
    np.testing.assert_allclose(model.stem_bn.var[...], np.mean(variances, 0), rtol=1e-4, atol=1e-5)
    assert model.stem_bn.use_running_average  # left in eval mode
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
