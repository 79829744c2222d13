"""The predictive-multiplicity benchmark's settings, one typed schema: a reference model trained on
``data``, then Rashomon sets by eps from inference-time dropout, re-training and AWP.

``Multiplicity`` is what ``configs/rashomon.py`` makes and ``experiments/rashomon.py`` builds once.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import numpy as np

from research.core import config as config_lib
from research.core.mesh import MeshConfig
from research.core.optim import OptimConfig
from research.data import sources
from research.data.sections import DataSource
from research.data.tabular import TABULAR_DATASETS
from research.models import ModelConfig
from research.multiplicity.baselines import AWPConfig
from research.multiplicity.rashomon import RashomonConfig
from research.recipes.classify import ClassifierTrainConfig

METHODS = ("dropout", "retrain", "awp")


@dataclasses.dataclass(frozen=True)
class RashomonData(DataSource):
    """rashomon: a tabular or an image set; the first ``train_limit`` training rows, and the first
    ``eval_limit`` test rows as the evaluation points."""
    COUNTS: ClassVar[tuple[str, ...]] = ("train_limit", "eval_limit")

    name: Literal[TABULAR_DATASETS + sources.IMAGE_DATASETS] = "breast_cancer"
    train_limit: int = 0
    eval_limit: int = 0


def eps_grid(top: float, n: int) -> tuple[float, ...]:
    """linspace(0, top, n) as plain floats: the eps at which the sets are measured."""
    return tuple(round(float(e), 6) for e in np.linspace(0.0, top, n))


@dataclasses.dataclass(frozen=True)
class Multiplicity:
    """``model`` trained on ``data`` from ``seed`` (``optim``, ``train``) is the reference; each of
    ``methods`` makes the models around it (``rashomon``: dropout; ``retrain_seeds``: one re-trained
    model per seed; ``awp``), and the sets within eps of its loss are measured."""
    seed: int = 0
    retrain_seeds: tuple[int, ...] = tuple(range(1, 11))
    methods: tuple[str, ...] = METHODS
    progress: bool = True
    data: RashomonData = RashomonData()
    model: ModelConfig = ModelConfig(name="mlp", hidden_sizes=(64, 64))
    optim: OptimConfig = OptimConfig(name="adam", lr=1e-3, schedule="constant", weight_decay=0.0)
    train: ClassifierTrainConfig = ClassifierTrainConfig(batch_size=32, epochs=30, log_every=50, checkpoint_every=0)
    rashomon: RashomonConfig = dataclasses.field(default_factory=lambda: RashomonConfig(
        kind="bernoulli", max_rate=0.2, num_rates=20, models_per_rate=100, epsilons=eps_grid(0.04, 11)))
    awp: AWPConfig = AWPConfig(points=0)
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require_names(self, "methods", METHODS)
        config_lib.require(self, "methods", "dropout" in self.methods, "a tuple that includes dropout")
        config_lib.require(self, "retrain_seeds", len(set(self.retrain_seeds)) == len(self.retrain_seeds)
                           and self.seed not in self.retrain_seeds, f"distinct ints other than seed ({self.seed})")
