"""How the model to unlearn was trained: the objective that retraining, the baselines' penalty and
the NTK scrub's linearisation all share.

The default is the recipe of the NTK scrubbing reference (Golatkar, Achille, Soatto 2020; its
fine-tuning command), the one its linear theory assumes:

    min_w  (1/N) sum_n CE(f(x_n; w), y_n)  +  (wd/2) |w - w_init|^2,      wd = 0.1,

a proximal penalty toward the weights training starts from (not toward 0), SGD with momentum 0.9,
lr 0.01 constant, batches of 128, 25 epochs, BatchNorm in eval mode, no augmentation. N * wd is
then the ridge of the scrub's kernel solves. ``loss="mse"`` (1/2 |f(x) - onehot(y)|^2 per sample)
with ``optimizer="gauss_newton"`` (full batch, at most ``epochs`` iterations, gauss_newton.py) or
``"lbfgs"`` (any loss, ``epochs`` iterations) trains to convergence: the setting in which the
linearised solution is exact for a model linear in its parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from research.core import config as config_lib
from research.core.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """The parameter ``subset`` trained (the rest frozen, BatchNorm in eval mode), the loss, the
    weight decay and what it decays toward, and the optimiser: SGD for ``epochs`` over the data in
    batches of ``batch_size``, full-batch L-BFGS for ``epochs`` iterations, or full-batch
    Gauss-Newton (MSE only) for at most ``epochs`` iterations."""
    subset: Literal["all", "bn_and_head", "bn", "head", "prompts_and_head", "prompts"] = "all"
    num_prompts: int = 10          # prompts*: prompt tokens (a ViT)
    deep_prompts: bool = False     # prompts*: one set per block (deep VPT) instead of one at the input
    loss: Literal["ce", "mse"] = "ce"
    optimizer: Literal["sgd", "lbfgs", "gauss_newton"] = "sgd"
    lr: float = 0.01               # sgd
    momentum: float = 0.9          # sgd
    weight_decay: float = 0.1      # also the scrub's ridge: N * weight_decay
    decay_toward: Literal["init", "zero"] = "init"  # init: (wd/2)|w - w_init|^2; zero: (wd/2)|w|^2
    epochs: int = 25               # sgd: passes over the data; lbfgs: iterations; gauss_newton: at most
    batch_size: int = 128          # sgd
    schedule: Literal["constant", "cosine"] = "constant"

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "lr", self.lr > 0, "a positive float")
        config_lib.require(self, "weight_decay", self.weight_decay >= 0, "a float >= 0")
        config_lib.require(self, "epochs", self.epochs > 0, "a positive int")
        config_lib.require(self, "batch_size", self.batch_size > 0, "a positive int")
        config_lib.require(self, "num_prompts", self.num_prompts > 0, "a positive int")
        config_lib.require(self, "optimizer", self.optimizer != "gauss_newton" or self.loss == "mse",
                           "sgd or lbfgs with loss=ce (gauss_newton minimises the MSE)")

    def steps(self, n: int) -> int:
        """Optimiser steps on n samples."""
        return self.epochs if self.optimizer != "sgd" else self.epochs * max(n // min(self.batch_size, n), 1)

    def optim_config(self, **overrides) -> OptimConfig:
        """The core optimiser of this recipe (SGD as torch sets it up: L2 on every parameter of the
        subset, no Nesterov); ``overrides`` replace fields, e.g. a baseline's own lr."""
        fields = dict(name="sgd", lr=self.lr, momentum=self.momentum, nesterov=False, weight_decay=self.weight_decay,
                      schedule=self.schedule, decay_vectors=True, decay_toward=self.decay_toward)
        return OptimConfig(**{**fields, **overrides})
