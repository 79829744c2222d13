"""The sandwich step's loss and EMA, the anytime curve's choice per budget, and (slow) that BatchNorm
recalibration restores a narrow subnetwork trained by the sandwich rule."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from research.anytime import sampling, supernet
from research.anytime import train as anytime_train
from research.core import config as config_lib
from research.recipes.classify import ClassifierTrainConfig
from research.core.mesh import MeshConfig, make_mesh
from research.core.optim import OptimConfig
from research.core.train import create_train_state
from research.models.resnet import ResNet


def tiny(seed=0, channels=1):
    return ResNet(num_classes=4, in_channels=channels, widths=(4, 8), blocks_per_stage=(2, 2), shortcut="A",
                  rngs=nnx.Rngs(seed))


def test_one_step_sums_the_largest_label_loss_and_the_soft_losses_and_moves_the_ema():
    model = tiny()
    table = sampling.enumerate_subnets(model, (8, 8), sampling.SamplerConfig())
    picked = [table.index(0.5, [1, 0, 1, 1]), table.index(0.75, [1, 1, 1, 0])]
    sample = lambda key, n: jnp.asarray(picked[:n], jnp.int32)  # noqa: E731
    config = anytime_train.SandwichConfig(num_sampled=2, label_smoothing=0.1, ema_decay=0.9)
    tx = optax.sgd(0.5)
    defs, train_state = create_train_state(model, tx)
    state = anytime_train.init_state(train_state)
    images = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
    labels = jnp.array([0, 1, 2, 3, 0, 1])
    identity = lambda x, rng, train: x  # noqa: E731
    step = jax.jit(anytime_train.make_sandwich_step(defs, tx, table, sample, identity, config))
    new, sums = step(state, {"images": images, "labels": labels, "mask": jnp.ones(6)})

    # By hand, in train mode (batch statistics, so the order of the passes does not matter).
    m = nnx.merge(defs.train, train_state.params, train_state.frozen, train_state.rest, copy=True)
    def logits(i):
        return supernet.forward(m, images, table.widths[i], jnp.asarray(table.gates[i]))
    guide = jax.nn.softmax(logits(table.largest))
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 4), 0.1)
    expected = optax.softmax_cross_entropy(logits(table.largest), targets).sum()
    for i in picked + [table.smallest]:
        expected += optax.softmax_cross_entropy(logits(i), guide).sum()
    assert float(sums["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(sums["count"]) == 6
    # EMA: 0.9 * initial + 0.1 * updated.
    for e, p0, p1 in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(train_state.params),
                         jax.tree.leaves(new.train.params)):
        np.testing.assert_allclose(e, 0.9 * p0 + 0.1 * p1, rtol=1e-5, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(new.train.params)[0], jax.tree.leaves(train_state.params)[0])


def test_the_anytime_curve_takes_the_best_held_out_candidate_within_each_budget():
    rows = [{"flops": 10, "val_accuracy": 0.5, "test_accuracy": 0.45, "width": 0.25, "gates": [1]},
            {"flops": 20, "val_accuracy": 0.7, "test_accuracy": 0.6, "width": 0.5, "gates": [1]},
            {"flops": 30, "val_accuracy": 0.65, "test_accuracy": 0.9, "width": 1.0, "gates": [1]}]
    curve = anytime_train.anytime_curve(rows, [5, 15, 25, 35])
    assert [p["test_accuracy"] for p in curve] == [None, 0.45, 0.6, 0.6]  # chosen on val, not on test
    assert curve[3]["flops"] == 20


@pytest.mark.slow
def test_recalibration_restores_a_narrow_subnetwork_trained_by_the_sandwich_rule(tmp_path):
    from research.data import pipeline, sources
    from research.data.augment import make_preprocess

    ds = sources.load("digits")
    train, test = pipeline.to_arrays(ds["train"]), pipeline.to_arrays(ds["test"])
    preprocess = make_preprocess(*pipeline.channel_stats(train.images))
    model = ResNet(num_classes=10, in_channels=1, widths=(16, 32), blocks_per_stage=(2, 2), shortcut="A",
                   rngs=nnx.Rngs(0))
    sampler = sampling.SamplerConfig()
    table = sampling.enumerate_subnets(model, train.images.shape[1:3], sampler)
    config = ml_collections.ConfigDict({
        "optim": config_lib.section(OptimConfig, name="sgd", lr=0.1),
        "train": config_lib.section(ClassifierTrainConfig, batch_size=64, epochs=0, steps=300, progress=False,
                                    checkpoint_every=0),
        "sandwich": config_lib.section(anytime_train.SandwichConfig, ema_decay=0.9)})
    defs, state, _ = anytime_train.fit_supernet(model, train, config, table, sampling.make_sampler(table, sampler),
                                                preprocess=preprocess, mesh=make_mesh(MeshConfig()),
                                                workdir=str(tmp_path))
    trained = nnx.merge(defs.eval, state.train.params, state.train.frozen, state.train.rest)
    narrow = table.index(0.25, [0, 0, 1, 0])  # 4 of 16 / 8 of 32 channels, one block of four
    x = preprocess(jnp.asarray(test.images), None, False)
    shared = float(jnp.mean(jnp.argmax(supernet.forward(trained, x, 0.25, jnp.array([0, 0, 1, 0])), -1)
                            == test.labels))
    calibration = [preprocess(jnp.asarray(pipeline.train_batch(train, 64, 1, i)["images"]), None, False)
                   for i in range(4)]
    row, = anytime_train.evaluate_subnets(trained, [narrow], table, calibration, {"test": (test.images, test.labels)},
                                          preprocess)
    assert row["test_accuracy"] > 0.9 and row["test_accuracy"] > shared + 0.2, (shared, row)
