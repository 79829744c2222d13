"""Optimizers and learning-rate schedules from an `optim` config section (`OptimConfig`).

Weight decay skips vectors (biases, BatchNorm and LayerNorm parameters), as is usual, unless
``decay_vectors`` (torch's ``SGD(weight_decay=...)``, which the unlearning references use); for SGD
it is the coupled L2 form of He et al., for AdamW the decoupled form of Loshchilov & Hutter.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import jax
import optax

from research.core import config as config_lib


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """An optimiser and its learning-rate schedule (linear warm-up, then the decay)."""
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9                  # sgd
    nesterov: bool = True                  # sgd
    b1: float = 0.9                        # adam, adamw
    b2: float = 0.999
    weight_decay: float = 5e-4
    schedule: Literal["constant", "cosine", "linear", "step"] = "cosine"
    warmup_steps: int = 0
    decay_boundaries: tuple[float, ...] = (0.5, 0.75)  # step: fractions of training
    decay_factor: float = 0.1              # step: lr multiplier at each boundary
    grad_clip_norm: float = 0.0            # 0 = no clipping
    decay_vectors: bool = False            # weight decay on biases and normalisation parameters too

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "lr", self.lr > 0, "a positive float")
        config_lib.require(self, "weight_decay", self.weight_decay >= 0, "a float >= 0")
        config_lib.require(self, "grad_clip_norm", self.grad_clip_norm >= 0, "a float >= 0 (0 = no clipping)")
        config_lib.require(self, "warmup_steps", self.warmup_steps >= 0, "an int >= 0")


OPTIMIZERS = config_lib.choices(OptimConfig, "name")
SCHEDULES = config_lib.choices(OptimConfig, "schedule")


def _as_config(cfg: OptimConfig | Mapping) -> OptimConfig:
    return cfg if isinstance(cfg, OptimConfig) else config_lib.build(OptimConfig, cfg)


def make_schedule(cfg: OptimConfig | Mapping, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step: linear warm-up, then the chosen decay."""
    cfg = _as_config(cfg)
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


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: OptimConfig | Mapping, total_steps: int) -> optax.GradientTransformation:
    """The optax chain: clip -> (L2) -> optimizer with the schedule. ``cfg``: an `OptimConfig` or
    a config section made from one."""
    cfg = _as_config(cfg)
    schedule = make_schedule(cfg, total_steps)
    mask = None if cfg.decay_vectors else _matrices
    chain = []
    if cfg.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.name == "sgd":
        if cfg.weight_decay > 0:
            chain.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))
        chain.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    elif cfg.name == "adamw":
        chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask))
    else:
        chain.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2))
    return optax.chain(*chain)
