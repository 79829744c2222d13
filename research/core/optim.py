"""Optimizers and learning-rate schedules from an `optim` config section (`OptimConfig`).

Weight decay skips vectors (biases, BatchNorm and LayerNorm parameters), as is usual, unless
``decay_vectors`` (torch's ``SGD(weight_decay=...)``, which the unlearning references use); for SGD
it is the coupled L2 form of He et al., for AdamW the decoupled form of Loshchilov & Hutter.

``decay_toward`` says what the weights decay to. ``"zero"`` is the usual penalty (wd/2)|w|^2.
``"init"`` is a proximal penalty (wd/2)|w - w_0|^2, whose gradient is wd (w - w_0): the weights are
pulled back to an anchor w_0. By default w_0 is the parameters the optimiser is initialised with.
``make_optimizer(..., anchor=w_0)`` gives another anchor, e.g. w_init for a run that starts
elsewhere. The linearised (NTK) theory of fine-tuning assumes this form, with w_0 the pre-trained
weights (Golatkar et al. 2020, whose reference code trains with it).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
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
    decay_toward: Literal["zero", "init"] = "zero"  # init: proximal wd (w - w_0), w_0 the initial weights

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "lr", self.lr > 0, "a positive float")
        config_lib.require(self, "weight_decay", self.weight_decay >= 0, "a float >= 0")
        config_lib.require(self, "grad_clip_norm", self.grad_clip_norm >= 0, "a float >= 0 (0 = no clipping)")
        config_lib.require(self, "warmup_steps", self.warmup_steps >= 0, "an int >= 0")
        config_lib.require(self, "decay_toward", self.decay_toward == "zero" or self.name != "adam",
                           "zero with name=adam (adam has no weight decay; use sgd or adamw)")


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


class AnchorState(NamedTuple):
    anchor: optax.Params  # w_0 of the proximal penalty


def decay_toward_anchor(weight_decay: float, anchor: optax.Params | None = None,
                        mask=None) -> optax.GradientTransformation:
    """updates + wd (w - w_0): the gradient of the proximal penalty (wd/2)|w - w_0|^2.

    w_0 is ``anchor`` (a tree like the params) or, when None, the params ``init`` receives. It is
    kept in the optimiser state, so it is checkpointed with it and enters jit as an argument.
    ``mask``: as ``optax.add_decayed_weights`` (a tree of bools or a function of the params)."""
    def init(params):
        return AnchorState(jax.tree.map(jnp.array, params if anchor is None else anchor))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("decay_toward_anchor needs the params in update()")
        return jax.tree.map(lambda u, p, a: u + weight_decay * (p - a), updates, params, state.anchor), state

    tx = optax.GradientTransformation(init, update)
    return tx if mask is None else optax.masked(tx, mask)


def make_optimizer(cfg: OptimConfig | Mapping, total_steps: int,
                   anchor: optax.Params | None = None) -> optax.GradientTransformation:
    """The optax chain: clip -> (L2) -> optimizer with the schedule. ``cfg``: an `OptimConfig` or
    a config section made from one. ``anchor``: w_0 of ``decay_toward="init"`` (default: the
    params the optimiser is initialised with); not allowed otherwise."""
    cfg = _as_config(cfg)
    if anchor is not None and cfg.decay_toward != "init":
        raise ValueError(f"make_optimizer: an anchor is only used with decay_toward='init', not {cfg.decay_toward!r}")
    schedule = make_schedule(cfg, total_steps)
    mask = None if cfg.decay_vectors else _matrices
    proximal = cfg.decay_toward == "init" and cfg.weight_decay > 0
    chain = []
    if cfg.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.name == "sgd":
        if proximal:
            chain.append(decay_toward_anchor(cfg.weight_decay, anchor, mask=mask))
        elif cfg.weight_decay > 0:
            chain.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))
        chain.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    elif cfg.name == "adamw" and proximal:  # decoupled, as AdamW's own decay: after the Adam scaling
        chain += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2), decay_toward_anchor(cfg.weight_decay, anchor, mask=mask),
                  optax.scale_by_learning_rate(schedule)]
    elif cfg.name == "adamw":
        chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask))
    else:
        chain.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2))
    return optax.chain(*chain)
