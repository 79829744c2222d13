"""Optimizers and learning-rate schedules from an `optim` config group.

Fields (see configs/train_classifier.py): name (sgd | adamw | adam), lr, momentum, nesterov,
b1, b2, weight_decay, schedule (constant | cosine | linear | step), warmup_steps,
decay_boundaries (fractions of training, for `step`), decay_factor, grad_clip_norm (0 = off).
Weight decay skips vectors (biases, BatchNorm and LayerNorm parameters), as is usual; for SGD it
is the coupled L2 form of He et al., for AdamW the decoupled form of Loshchilov & Hutter.
"""
from __future__ import annotations

import jax
import ml_collections
import optax

from research.core.config import check, check_choice

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("constant", "cosine", "linear", "step")


def validate(root: ml_collections.ConfigDict, prefix: str = "optim") -> None:
    """Checks the optimizer section at the (dotted) key ``prefix`` of ``root`` ("": ``root`` is the section)."""
    def key(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name
    check_choice(root, key("name"), OPTIMIZERS)
    check_choice(root, key("schedule"), SCHEDULES)
    check(root, key("lr"), lambda v: v > 0, "a positive float")
    check(root, key("weight_decay"), lambda v: v >= 0, "a float >= 0")
    check(root, key("grad_clip_norm"), lambda v: v >= 0, "a float >= 0 (0 = no clipping)")
    check(root, key("warmup_steps"), lambda v: v >= 0, "an int >= 0")


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step: linear warm-up, then the chosen decay."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    else:
        boundaries = {int(f * decay_steps): cfg.decay_factor for f in cfg.decay_boundaries}
        main = optax.piecewise_constant_schedule(cfg.lr, boundaries)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """The optax chain: clip -> (L2) -> optimizer with the schedule."""
    validate(cfg, "")
    schedule = make_schedule(cfg, total_steps)
    chain = []
    if cfg.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.name == "sgd":
        if cfg.weight_decay > 0:
            chain.append(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
        chain.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    elif cfg.name == "adamw":
        chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask))
    else:
        chain.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2))
    return optax.chain(*chain)


def default_config() -> ml_collections.ConfigDict:
    """The `optim` group with every field, for configs to start from and override."""
    return ml_collections.ConfigDict(dict(
        name="sgd", lr=0.1, momentum=0.9, nesterov=True, b1=0.9, b2=0.999, weight_decay=5e-4,
        schedule="cosine", warmup_steps=0, decay_boundaries=(0.5, 0.75), decay_factor=0.1,
        grad_clip_norm=0.0,
    ))
