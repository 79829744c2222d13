"""Train an NNX image classifier on in-memory arrays: the loop shared by classifier experiments.

``fit_classifier`` composes the pieces of research.core (optimizer, train/eval steps on the mesh,
the resumable loop, TensorBoard) for one model and one pair of splits. It reads only the
``optim`` and ``train`` sections of a config (see configs/train_classifier.py for their fields)
and writes only under ``workdir``: ``tb/`` and ``checkpoints/``.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from research.core import optim
from research.core.checkpoint import Checkpointer
from research.core.loop import evaluate, fit
from research.core.records import MetricWriter, image_grid
from research.core.train import (ModelDefs, TrainState, classification_loss, create_train_state, jit_eval_step,
                                 jit_train_step, make_eval_step, make_train_step, place_on_mesh)
from research.data import pipeline


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


def total_steps(train_config: ml_collections.ConfigDict, num_examples: int) -> int:
    """``train.steps`` if set, else ``train.epochs`` epochs of ``train.batch_size``."""
    return train_config.steps or train_config.epochs * pipeline.steps_per_epoch(num_examples, train_config.batch_size)


def fit_classifier(model: nnx.Module, train: pipeline.ImageArrays, test: pipeline.ImageArrays,
                   config: ml_collections.ConfigDict, *, preprocess, mesh: Mesh, workdir: str,
                   trainable: nnx.filterlib.Filter = nnx.Param, train_mode: bool = True,
                   seed: int = 0) -> ClassifierRun:
    """Trains ``model`` (its ``trainable`` Params) on ``train``, evaluates on ``test``; resumes from
    ``workdir/checkpoints`` when a run was interrupted. ``preprocess(images, rng, train)`` runs on
    the device. ``train_mode=False`` trains with BatchNorm in eval mode."""
    steps_per_epoch = pipeline.steps_per_epoch(len(train), config.train.batch_size)
    steps = total_steps(config.train, len(train))
    tx = optim.make_optimizer(config.optim, steps)
    defs, state = create_train_state(model, tx, trainable, seed, train_mode)
    state, shardings = place_on_mesh(state, mesh)
    num_trainable = sum(x.size for x in jax.tree.leaves(state.params))

    train_loss, eval_loss = classification_loss(preprocess, config.train.label_smoothing)
    train_step = jit_train_step(make_train_step(defs, tx, train_loss, config.train.grad_accum_steps), shardings, mesh)
    eval_step = jit_eval_step(make_eval_step(defs, eval_loss), shardings, mesh)

    writer = MetricWriter(os.path.join(workdir, "tb"))
    first = pipeline.train_batch(train, config.train.batch_size, seed, 0)
    shown = preprocess(jnp.asarray(first["images"][:32]), jax.random.PRNGKey(0), True)
    writer.images(0, {"train/augmented_inputs": image_grid(np.asarray(shown, np.float32))})
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.checkpoint_every or steps)
    state, train_metrics, eval_metrics = fit(
        state, train_step, lambda step: pipeline.train_batch(train, config.train.batch_size, seed, step),
        steps, mesh=mesh, writer=writer, checkpointer=checkpointer,
        evaluate=lambda state: evaluate(eval_step, state, pipeline.eval_batches(test, config.train.eval_batch_size),
                                        mesh, "test/"),
        learning_rate=optim.make_schedule(config.optim, steps), log_every=config.train.log_every,
        eval_every=config.train.eval_every_epochs * steps_per_epoch, progress=config.train.progress)
    checkpointer.close()
    writer.close()
    return ClassifierRun(defs, state, train_metrics, eval_metrics, writer.history, steps_per_epoch, num_trainable)
