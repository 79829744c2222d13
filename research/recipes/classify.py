"""Train an NNX image classifier on in-memory arrays: the loop shared by classifier experiments.

``fit_classifier`` composes the pieces of research.core (optimizer, train/eval steps on the mesh,
the resumable loop, TensorBoard) for one model and one pair of splits. It reads only the
``optim`` (`OptimConfig`) and ``train`` (`ClassifierTrainConfig`) sections of a config and writes
only under ``workdir``: ``tb/`` and ``checkpoints/``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from research.core import config as config_lib
from research.core import optim
from research.core.checkpoint import Checkpointer, array_digest
from research.core.loop import evaluate, fit
from research.core.mesh import LogicalRules, MeshConfig
from research.core.records import MetricWriter, image_grid
from research.core.train import (ModelDefs, TrainState, classification_loss, create_train_state, jit_eval_step,
                                 jit_train_step, make_eval_step, make_train_step, place_on_mesh)
from research.core.optim import OptimConfig
from research.data import pipeline, sources
from research.data.sections import DataSource
from research.models import ModelConfig
from research.models.filters import PARAM_SUBSETS, param_filter


@dataclasses.dataclass(frozen=True)
class ClassifierData(DataSource):
    """train_classifier: the first ``train_limit`` training images; random crops with
    ``crop_padding`` pixels of padding (0 = none) and horizontal ``flip`` while training."""
    COUNTS: ClassVar[tuple[str, ...]] = ("train_limit", "crop_padding")

    train_limit: int = 0
    crop_padding: int = 0
    flip: bool = False


@dataclasses.dataclass(frozen=True)
class FinetuneData(ClassifierData):
    """efficient_finetune: ``split`` classes (pre-train on the first half of the classes, fine-tune
    on the rest: a non-IID split) or samples (two random halves); ``train_limit`` caps each half."""
    name: Literal[sources.IMAGE_DATASETS] = "fashion_mnist"
    crop_padding: int = 2
    split: Literal["classes", "samples"] = "classes"


@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig:
    """The ``train`` section of a classifier's training: batches, length, logging, checkpoints."""
    batch_size: int = 128
    eval_batch_size: int = 512
    epochs: int = 30
    steps: int = 0                     # > 0 overrides epochs
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0
    trainable: Literal[tuple(PARAM_SUBSETS)] = "all"  # the Params trained (research.models.filters)
    log_every: int = 50
    eval_every_epochs: int = 1
    checkpoint_every: int = 500        # steps; 0 = only at the end
    progress: bool = True

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "batch_size", self.batch_size > 0, "a positive int")
        config_lib.require(self, "eval_batch_size", self.eval_batch_size > 0, "a positive int")
        config_lib.require(self, "grad_accum_steps",
                           self.grad_accum_steps > 0 and self.batch_size % self.grad_accum_steps == 0,
                           f"a positive divisor of batch_size ({self.batch_size})")
        config_lib.require(self, "epochs", self.epochs > 0 or self.steps > 0, "> 0 (or set steps)")
        config_lib.require(self, "label_smoothing", 0 <= self.label_smoothing < 1, "a float in [0, 1)")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """A backbone's pre-training stage (the ``pretrain`` section): the ``classes`` of the data set
    ``data`` (() = all; ``label`` names the class column, e.g. cifar100_sample's coarse_label),
    random crops with ``crop_padding`` pixels and horizontal ``flip`` while training, ``optim`` and
    ``train`` as for any classifier. ``workdir``: "" = WORKDIR/pretrain, or another run's folder,
    whose finished checkpoint is then reused."""
    data: Literal[sources.IMAGE_DATASETS] = "mnist"
    classes: tuple[int, ...] = ()
    label: str = "label"
    crop_padding: int = 0
    flip: bool = False
    workdir: str = ""
    optim: OptimConfig = OptimConfig()
    train: ClassifierTrainConfig = ClassifierTrainConfig()

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "crop_padding", self.crop_padding >= 0, "an int >= 0")


@dataclasses.dataclass(frozen=True)
class ClassifierTraining:
    """An image classifier trained from scratch (the train_classifier experiment): ``model`` on
    ``data`` with ``optim`` and ``train`` from ``seed``, laid out on ``mesh``."""
    seed: int = 0
    data: ClassifierData = ClassifierData()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: ClassifierTrainConfig = ClassifierTrainConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        config_lib.check_fields(self)


@dataclasses.dataclass
class ClassifierRun:
    """What one call of ``fit_classifier`` leaves: the final state and its metrics."""
    defs: ModelDefs
    state: TrainState
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]]
    steps_per_epoch: int
    num_trainable: int

    def model(self) -> nnx.Module:
        """The trained model (eval-mode graph) rebuilt from the final state."""
        state = jax.device_get(self.state)
        return nnx.merge(self.defs.eval, state.params, state.frozen, state.rest)


def total_steps(train_config: ClassifierTrainConfig, num_examples: int) -> int:
    """``train.steps`` if set, else ``train.epochs`` epochs of ``train.batch_size``."""
    return train_config.steps or train_config.epochs * pipeline.steps_per_epoch(num_examples, train_config.batch_size)


# Fields of the train section that do not change the weights: a run may resume under other values.
NOT_WEIGHT_SHAPING = ("epochs", "steps", "eval_batch_size", "log_every", "eval_every_epochs", "checkpoint_every",
                      "progress")


def training_settings(opt: OptimConfig, train_config: ClassifierTrainConfig, steps: int, seed: int,
                      train: pipeline.ImageArrays, **extra) -> dict:
    """What decides a run's weights besides the model's shapes (the Checkpointer's ``settings``):
    the optimizer, the total steps (epochs change the schedule, so a longer run is a new run), the
    batches, the seed, a digest of the training images and labels, and ``extra`` sections."""
    kept = {k: v for k, v in dataclasses.asdict(train_config).items() if k not in NOT_WEIGHT_SHAPING}
    return {"optim": dataclasses.asdict(opt), "train": kept, "steps": steps, "seed": seed,
            "data": array_digest(train.images, train.labels), **extra}


def stage_settings(config) -> tuple[optim.OptimConfig, ClassifierTrainConfig]:
    """The (optim, train) settings of a training stage: a dataclass's fields, or built from a config
    section (one `ConfigError` line naming a bad key)."""
    optim_config = config_lib.section_of(config, "optim", optim.OptimConfig)
    return optim_config, config_lib.section_of(config, "train", ClassifierTrainConfig)


def fit_classifier(model: nnx.Module, train: pipeline.ImageArrays, test: pipeline.ImageArrays,
                   config: ml_collections.ConfigDict, *, preprocess, mesh: Mesh, workdir: str,
                   trainable: nnx.filterlib.Filter | None = None, train_mode: bool = True,
                   seed: int = 0, rules: LogicalRules = LogicalRules()) -> ClassifierRun:
    """Trains ``model`` (its ``trainable`` Params; default: the subset ``config.train.trainable``)
    on ``train``, evaluates on ``test``; resumes from ``workdir/checkpoints`` when a run was
    interrupted. ``preprocess(images, rng, train)`` runs on the device. ``train_mode=False`` trains
    with BatchNorm in eval mode. ``config`` holds an ``optim`` and a ``train`` section; ``rules``
    lay the parameters out on ``mesh`` (the experiment's ``MeshConfig.logical``): a config section,
    or a built dataclass with those two fields (`PretrainConfig`)."""
    opt, train_config = stage_settings(config)
    if trainable is None:
        trainable = param_filter(model, train_config.trainable)
    steps_per_epoch = pipeline.steps_per_epoch(len(train), train_config.batch_size)
    steps = total_steps(train_config, len(train))
    tx = optim.make_optimizer(opt, steps)
    defs, state = create_train_state(model, tx, trainable, seed, train_mode)
    state, shardings = place_on_mesh(state, mesh, rules)
    num_trainable = sum(x.size for x in jax.tree.leaves(state.params))

    train_loss, eval_loss = classification_loss(preprocess, train_config.label_smoothing)
    train_step = jit_train_step(make_train_step(defs, tx, train_loss, train_config.grad_accum_steps), shardings, mesh)
    eval_step = jit_eval_step(make_eval_step(defs, eval_loss), shardings, mesh)

    writer = MetricWriter(os.path.join(workdir, "tb"))
    first = pipeline.train_batch(train, train_config.batch_size, seed, 0)
    shown = preprocess(jnp.asarray(first["images"][:32]), jax.random.PRNGKey(0), True)
    writer.images(0, {"train/augmented_inputs": image_grid(np.asarray(shown, np.float32))})
    settings = training_settings(opt, train_config, steps, seed, train, train_mode=train_mode)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), train_config.checkpoint_every or steps,
                                settings=settings)
    state, train_metrics, eval_metrics = fit(
        state, train_step, lambda step: pipeline.train_batch(train, train_config.batch_size, seed, step),
        steps, mesh=mesh, writer=writer, checkpointer=checkpointer,
        evaluate=lambda state: evaluate(eval_step, state, pipeline.eval_batches(test, train_config.eval_batch_size),
                                        mesh, "test/"),
        learning_rate=optim.make_schedule(opt, steps), log_every=train_config.log_every,
        eval_every=train_config.eval_every_epochs * steps_per_epoch, progress=train_config.progress)
    checkpointer.close()
    writer.close()
    return ClassifierRun(defs, state, train_metrics, eval_metrics, writer.history, steps_per_epoch, num_trainable)
