"""The anytime-network benchmark's settings, one typed schema: a ResNet supernet trained with the
sandwich rule under each sampler of ``samplers``, then the best subnetwork at each FLOPs budget.

``Anytime`` is what ``configs/anytime.py`` makes and ``experiments/anytime.py`` builds once.
"""
from __future__ import annotations

import dataclasses

from research.anytime.sampling import SamplerConfig
from research.anytime.train import AnytimeData, SandwichConfig
from research.core import config as config_lib
from research.core.mesh import MeshConfig
from research.core.optim import OptimConfig
from research.models import ModelConfig
from research.recipes.classify import ClassifierTrainConfig

SAMPLERS = ("uniform", "tps")


@dataclasses.dataclass(frozen=True)
class AnytimeEval:
    """``budgets``: fractions of the largest subnetwork's FLOPs; ``calibration_batches`` training
    batches re-estimate BatchNorm per subnetwork; evaluation batches of ``batch_size``."""
    budgets: tuple[float, ...] = (0.15, 0.3, 0.5, 0.75, 1.0)
    calibration_batches: int = 8
    batch_size: int = 500

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "budgets", len(self.budgets) > 0 and all(0 < b <= 1 for b in self.budgets),
                           "fractions in (0, 1]")
        config_lib.require(self, "calibration_batches", self.calibration_batches >= 1, "an int >= 1")


@dataclasses.dataclass(frozen=True)
class Anytime:
    """One supernet per sampler kind of ``samplers`` (``sampler.kind`` is set per run), each a
    ``model`` trained on ``data`` from ``seed`` with ``optim``, ``train`` and ``sandwich``."""
    seed: int = 0
    samplers: tuple[str, ...] = SAMPLERS
    progress: bool = True
    data: AnytimeData = AnytimeData()
    model: ModelConfig = ModelConfig(name="resnet20")
    optim: OptimConfig = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    train: ClassifierTrainConfig = ClassifierTrainConfig(batch_size=128, epochs=15, log_every=20, checkpoint_every=200)
    sampler: SamplerConfig = SamplerConfig()
    sandwich: SandwichConfig = SandwichConfig()
    eval: AnytimeEval = AnytimeEval()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require_names(self, "samplers", SAMPLERS)
        if self.model.name not in ("resnet20", "resnet18"):
            raise config_lib.ConfigError(f"config key 'model.name' = {self.model.name!r} is not allowed; expected "
                                         f"resnet20 or resnet18 (a CIFAR ResNet)")
