"""Checkpoints keep the settings they were trained under; resuming under others is refused."""
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from research.core import config as config_lib
from research.core.checkpoint import Checkpointer, CheckpointMismatchError, array_digest
from research.recipes.classify import ClassifierTrainConfig, fit_classifier
from research.core.mesh import make_mesh
from research.core.optim import OptimConfig
from research.data import pipeline
from research.data.augment import make_preprocess
from research.models import build_model


def saved_once(directory, settings):
    ckpt = Checkpointer(str(directory), 1, settings=settings)
    ckpt.save(0, {"w": np.zeros(3, np.float32)}, force=True)
    ckpt.close()


def test_a_checkpoint_written_under_other_settings_is_refused_naming_the_changed_key(tmp_path):
    saved_once(tmp_path, {"optim": {"lr": 0.1, "name": "sgd"}, "steps": 5})
    with pytest.raises(CheckpointMismatchError, match=r"written with optim\.lr=0\.1, this run has optim\.lr=0\.2; "
                                                      r"use a new --workdir"):
        Checkpointer(str(tmp_path), 1, settings={"optim": {"lr": 0.2, "name": "sgd"}, "steps": 5})
    with pytest.raises(CheckpointMismatchError, match=r"steps=5, this run has steps='\(absent\)'"):
        Checkpointer(str(tmp_path), 1, settings={"optim": {"lr": 0.1, "name": "sgd"}})


def test_equal_settings_resume_and_a_folder_without_checkpoints_or_settings_takes_the_new_ones(tmp_path):
    saved_once(tmp_path / "a", {"widths": (0.5, 1.0), "seed": np.int64(0)})
    Checkpointer(str(tmp_path / "a"), 1, settings={"widths": [0.5, 1.0], "seed": 0}).close()  # as JSON reads back

    Checkpointer(str(tmp_path / "b"), 1, settings={"lr": 0.1}).close()  # no checkpoint written: nothing to protect
    saved_once(tmp_path / "b", {"lr": 0.2})
    with pytest.raises(CheckpointMismatchError, match="lr=0.2"):
        Checkpointer(str(tmp_path / "b"), 1, settings={"lr": 0.3})

    saved_once(tmp_path / "c", None)  # a run from before settings were kept adopts the first ones it sees
    Checkpointer(str(tmp_path / "c"), 1, settings={"lr": 0.1}).close()
    with pytest.raises(CheckpointMismatchError, match="lr=0.1"):
        Checkpointer(str(tmp_path / "c"), 1, settings={"lr": 0.2})


def test_the_data_digest_changes_with_one_pixel_and_with_the_labels():
    images, labels = np.zeros((4, 2, 2, 1), np.uint8), np.arange(4, dtype=np.int32)
    base = array_digest(images, labels)
    assert array_digest(images.copy(), labels.copy()) == base
    changed = images.copy()
    changed[3, 1, 1, 0] = 1
    assert array_digest(changed, labels) != base
    assert array_digest(images, labels[::-1]) != base  # a strided view is hashed by its values
    assert array_digest(images[:0], labels[:0]) != array_digest(images[:0, :1], labels[:0])  # empty: by shape


def classifier_config(**train):
    c = ml_collections.ConfigDict()
    c.optim = config_lib.section(OptimConfig, lr=0.1)
    c.train = config_lib.section(ClassifierTrainConfig, **{**dict(batch_size=8, eval_batch_size=16, epochs=0, steps=3,
                                                                  checkpoint_every=0, progress=False), **train})
    return c


def fit_tiny(workdir, config, data):
    model = build_model("mlp", num_classes=4, input_shape=(6, 6, 1), rngs=nnx.Rngs(0), hidden_sizes=(8,))
    mesh = make_mesh({"data": 1, "model": 1}, jax.devices()[:1])
    run = fit_classifier(model, data, data, config, preprocess=make_preprocess([0.5], [0.25]), mesh=mesh,
                         workdir=str(workdir))
    return jax.device_get(run.state.params)


def test_a_finished_classifier_run_resumes_under_new_logging_and_refuses_another_lr_or_other_data(tmp_path):
    rng = np.random.default_rng(0)
    data = pipeline.ImageArrays(rng.integers(0, 256, (24, 6, 6, 1), dtype=np.uint8),
                                rng.integers(0, 4, 24).astype(np.int32), tuple("abcd"))
    first = fit_tiny(tmp_path, classifier_config(), data)
    again = fit_tiny(tmp_path, classifier_config(log_every=1, eval_batch_size=4), data)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)

    other_lr = classifier_config()
    other_lr.optim.lr = 0.05
    with pytest.raises(CheckpointMismatchError, match=r"optim\.lr=0\.1, this run has optim\.lr=0\.05"):
        fit_tiny(tmp_path, other_lr, data)
    with pytest.raises(CheckpointMismatchError, match=r"steps=3, this run has steps=6"):
        fit_tiny(tmp_path, classifier_config(steps=6), data)  # a longer schedule is a new run
    relabelled = pipeline.ImageArrays(data.images, (data.labels + 1) % 4, data.label_names)
    with pytest.raises(CheckpointMismatchError, match=r"data="):
        fit_tiny(tmp_path, classifier_config(), relabelled)
