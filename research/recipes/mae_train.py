"""Training of the masked-autoencoder generator (mae.py) with research.core's step, loop and checkpoints.

``fit_generator(model, train, test, config, ...)`` minimises the hidden-pixel MSE under masks drawn
per image (``config.masks``, a ``MaskConfig`` section) with the optimiser of ``config.optim`` for
the length of ``config.train`` (a ``ClassifierTrainConfig`` section: batches, epochs, logging and
checkpoints apply alike to a generator). It resumes from ``workdir/checkpoints``, logs to
``workdir/tb`` and, at every evaluation, writes a grid of inpaintings and outpaintings of the
first test images to TensorBoard. Evaluation reports the hidden-pixel MSE of the test split under
the fixed ``center`` and ``outpaint`` masks.

``pad_images`` centres images on a zero canvas, so 28 x 28 Fashion-MNIST becomes 32 x 32: an 8 x 8
token grid, on which the centre 25% box is exactly the central 4 x 4 tokens, as for CIFAR-10.
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
from research.core.checkpoint import Checkpointer
from research.core.loop import evaluate, fit
from research.core.mesh import LogicalRules, MeshConfig
from research.core.records import MetricWriter, image_grid
from research.core.train import (create_train_state, jit_eval_step, jit_train_step, make_eval_step, make_train_step,
                                 place_on_mesh)
from research.data import pipeline, sources
from research.data.sections import DataSource
from research.models import mae
from research.models.mae import MAEConfig, MaskConfig
from research.recipes.classify import ClassifierTrainConfig, stage_settings, total_steps, training_settings


@dataclasses.dataclass(frozen=True)
class GeneratorData(DataSource):
    """train_generator, generative_unlearning: images zero-padded to ``pad_to`` (0 = as stored; 28 ->
    32 gives an 8 x 8 token grid), the first ``train_limit`` / ``test_limit`` of each split, random
    horizontal ``flip`` while training."""
    COUNTS: ClassVar[tuple[str, ...]] = ("pad_to", "train_limit", "test_limit")

    name: Literal[sources.IMAGE_DATASETS] = "fashion_mnist"
    pad_to: int = 32
    train_limit: int = 0
    test_limit: int = 0
    flip: bool = False


def _optim() -> optim.OptimConfig:
    return optim.OptimConfig(name="adamw", lr=1e-3, b2=0.95, weight_decay=0.05, warmup_steps=200, grad_clip_norm=1.0)


def _train() -> ClassifierTrainConfig:
    return ClassifierTrainConfig(batch_size=128, eval_batch_size=500, epochs=2, log_every=50, checkpoint_every=500)


@dataclasses.dataclass(frozen=True)
class GeneratorTraining:
    """The generator's training (the train_generator experiment): the MAE ``model`` trained on
    ``data`` under ``masks`` with ``optim`` and ``train`` from ``seed``."""
    seed: int = 0
    data: GeneratorData = GeneratorData()
    model: MAEConfig = MAEConfig()
    masks: MaskConfig = MaskConfig()
    optim: optim.OptimConfig = dataclasses.field(default_factory=_optim)
    train: ClassifierTrainConfig = dataclasses.field(default_factory=_train)
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        config_lib.check_fields(self)


@dataclasses.dataclass(frozen=True)
class GeneratorStage(GeneratorTraining):
    """`GeneratorTraining` as another experiment's stage: ``workdir`` "" = WORKDIR/generator (trained
    there when it has no finished checkpoint), or another run's folder to restore."""
    workdir: str = ""


def pad_images(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, size, size, C), centred on zeros; ``size`` 0 or equal keeps them."""
    n, h, w, c = images.shape
    if not size or (h, w) == (size, size):
        return images
    if size < h or size < w:
        raise ValueError(f"pad_images: cannot pad {h}x{w} images to the smaller {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size, c), images.dtype)
    out[:, top:top + h, left:left + w] = images
    return out


def load_images(data: GeneratorData) -> tuple[pipeline.ImageArrays, pipeline.ImageArrays]:
    """(train, test) of a generator's ``data`` section: the first train_limit / test_limit images
    of each split, padded to ``pad_to``."""
    train, test = data.splits()
    pad = lambda a: pipeline.ImageArrays(pad_images(a.images, data.pad_to), a.labels, a.label_names)
    return pad(train.first(data.train_limit)), pad(test.first(data.test_limit))


def to_unit(images: jax.Array) -> jax.Array:
    """uint8 (N, H, W, C) -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def generator_losses(mask_config: MaskConfig, grid: tuple[int, int], flip: bool):
    """(train, eval) loss functions of the core step: (model, batch, rng) -> (loss sum, metric sums)."""
    def train_loss(model, batch, rng):
        k_mask, k_flip = jax.random.split(rng)
        x = to_unit(batch["images"])
        if flip:
            flipped = jax.random.bernoulli(k_flip, 0.5, (x.shape[0], 1, 1, 1))
            x = jnp.where(flipped, x[:, :, ::-1], x)
        masks = mae.make_masks(k_mask, x.shape[0], grid, mask_config)
        per_image = mae.reconstruction_loss(model, x, masks) * batch["mask"]
        return jnp.sum(per_image), {"loss": jnp.sum(per_image), "count": jnp.sum(batch["mask"])}

    def eval_loss(model, batch, rng):
        x = to_unit(batch["images"])
        sums = {"count": jnp.sum(batch["mask"])}
        for kind in ("center", "outpaint"):
            sums[f"mse_{kind}"] = jnp.sum(mae.reconstruction_loss(
                model, x, mae.fixed_mask(kind, x.shape[0], grid, mask_config)) * batch["mask"])
        return sums["mse_center"], sums
    return train_loss, eval_loss


def sample_grid(model: mae.MaskedAutoencoder, images: jax.Array, mask_config: MaskConfig) -> np.ndarray:
    """One image: rows = originals, centre-masked input, its inpainting, border-masked input, its
    outpainting (hidden pixels shown grey). ``images`` (n, H, W, C) float in [0, 1]."""
    n = images.shape[0]
    rows = [images]
    for kind in ("center", "outpaint"):
        mask = mae.fixed_mask(kind, n, model.grid, mask_config)
        hidden = model.pixel_mask(mask)
        rows += [mae.masked_view(images, hidden), jnp.clip(model(images, mask), 0, 1)]
    stacked = np.asarray(jnp.concatenate(rows))
    return image_grid(stacked, columns=n)


@dataclasses.dataclass
class GeneratorRun:
    model: mae.MaskedAutoencoder
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    history: dict[str, list[tuple[int, float]]]
    steps: int


def fit_generator(model: mae.MaskedAutoencoder, train: pipeline.ImageArrays, test: pipeline.ImageArrays,
                  config: ml_collections.ConfigDict, *, mesh: Mesh, workdir: str, seed: int = 0, flip: bool = False,
                  rules: LogicalRules = LogicalRules(), shown: int = 8) -> GeneratorRun:
    """Trains every parameter of ``model`` on ``train`` (uint8 images at the model's size), resuming
    from ``workdir/checkpoints``; returns the trained model and its metrics. ``config`` holds the
    sections ``optim``, ``train`` and ``masks`` (a config, or a `GeneratorTraining`)."""
    opt, train_config = stage_settings(config)
    mask_config = config_lib.section_of(config, "masks", MaskConfig)
    if train.images.shape[1:] != model.image_shape:
        raise ValueError(f"fit_generator: images of shape {train.images.shape[1:]}, the model takes {model.image_shape}")
    steps = total_steps(train_config, len(train))
    steps_per_epoch = pipeline.steps_per_epoch(len(train), train_config.batch_size)
    tx = optim.make_optimizer(opt, steps)
    defs, state = create_train_state(model, tx, nnx.Param, seed)
    state, shardings = place_on_mesh(state, mesh, rules)
    train_loss, eval_loss = generator_losses(mask_config, model.grid, flip)
    train_step = jit_train_step(make_train_step(defs, tx, train_loss, train_config.grad_accum_steps), shardings, mesh)
    eval_step = jit_eval_step(make_eval_step(defs, eval_loss), shardings, mesh)
    examples = to_unit(jnp.asarray(test.images[:shown]))
    writer = MetricWriter(os.path.join(workdir, "tb"))

    def evaluate_and_show(state):
        metrics = evaluate(eval_step, state, pipeline.eval_batches(test, train_config.eval_batch_size), mesh, "test/")
        current = nnx.merge(defs.eval, *jax.device_get((state.params, state.frozen, state.rest)))
        writer.images(int(jax.device_get(state.step)), {"samples": sample_grid(current, examples, mask_config)})
        return metrics

    settings = training_settings(opt, train_config, steps, seed, train, masks=dataclasses.asdict(mask_config),
                                 flip=flip)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), train_config.checkpoint_every or steps,
                                settings=settings)
    state, train_metrics, eval_metrics = fit(
        state, train_step, lambda step: pipeline.train_batch(train, train_config.batch_size, seed, step), steps,
        mesh=mesh, writer=writer, checkpointer=checkpointer, evaluate=evaluate_and_show,
        learning_rate=optim.make_schedule(opt, steps), log_every=train_config.log_every,
        eval_every=train_config.eval_every_epochs * steps_per_epoch, progress=train_config.progress)
    checkpointer.close()
    writer.close()
    trained = nnx.merge(defs.eval, *jax.device_get((state.params, state.frozen, state.rest)))
    return GeneratorRun(trained, train_metrics, eval_metrics, writer.history, steps)


@nnx.jit
def _generate(model: mae.MaskedAutoencoder, x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.clip(model(x, mask), 0.0, 1.0)


def generate(model: mae.MaskedAutoencoder, images: np.ndarray, kind: str, mask_config: MaskConfig,
             batch_size: int = 250) -> np.ndarray:
    """The generator's outputs (N, H, W, C) float32 in [0, 1] for uint8 ``images`` under the fixed
    ``kind`` mask (center | outpaint), in padded batches of one compiled shape."""
    out = []
    batch_size = min(batch_size, len(images))
    for start in range(0, len(images), batch_size):
        chunk = to_unit(jnp.asarray(images[start:start + batch_size]))
        n = chunk.shape[0]
        if n < batch_size:
            chunk = jnp.concatenate([chunk, jnp.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        mask = mae.fixed_mask(kind, batch_size, model.grid, mask_config)
        out.append(np.asarray(_generate(model, chunk, mask))[:n])
    return np.concatenate(out)
