"""The unlearning benchmark's settings, one typed schema, and its data: D and each scenario's split.

``Unlearning`` is what ``configs/unlearning.py`` makes (``section(Unlearning)`` and its presets)
and what ``experiments/unlearning.py`` builds once (``build(Unlearning, config)``). Each field is a
library section that checks itself; the checks across sections live in ``Unlearning.__post_init__``,
so a bad combination is one line naming the key before any work.

Scenarios: ``class`` forgets every training image of ``forget_class`` (and its test images leave the
test split: the test accuracy is of what should be kept); ``random`` forgets a seeded
``forget_fraction`` of the training images.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import numpy as np

from research.core import config as config_lib
from research.core.config import ConfigError
from research.core.mesh import MeshConfig
from research.core.optim import OptimConfig
from research.data import pipeline, sources
from research.data.sections import DataSource
from research.models import ModelConfig
from research.models.efficientnet_lite import BackboneConfig
from research.recipes.classify import ClassifierTrainConfig, PretrainConfig
from research.unlearning import baselines
from research.unlearning.ntk_scrub import NTKScrubConfig
from research.unlearning.recipe import TrainRecipe

METHODS = ("retrain", "ntk", *[m for m in baselines.BASELINES if m != "retrain"])
SCENARIOS = ("class", "random")


@dataclasses.dataclass(frozen=True)
class UnlearningData(DataSource):
    """D: ``train_per_class`` images of each of ``classes`` (() = every class, 0 = every image),
    capped at ``train_total`` (a seeded draw; 0 = no cap); ``image_size`` resizes for the ImageNet
    backbone (0 = as stored)."""
    COUNTS: ClassVar[tuple[str, ...]] = ("train_per_class", "train_total", "image_size")

    name: Literal[sources.IMAGE_DATASETS] = "cifar10_sample"
    classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    train_per_class: int = 100
    train_total: int = 0
    image_size: int = 0

    def draw(self, seed: int) -> tuple[pipeline.ImageArrays, pipeline.ImageArrays]:
        """D (training images, a draw of ``seed``) and its test split."""
        train, test = self.splits(classes=self.classes)
        train = pipeline.per_class(train, self.train_per_class, seed)
        if self.train_total and self.train_total < len(train):
            rows = np.random.default_rng(seed).permutation(len(train))[:self.train_total]
            train = train.subset(np.sort(rows))
        return train, test


def _pretrain() -> PretrainConfig:
    # A ResNet-20 pre-trained on CIFAR-10's other five classes: the NTK paper's setting.
    return PretrainConfig(data="cifar10_sample", classes=(5, 6, 7, 8, 9), crop_padding=4, flip=True,
                          optim=OptimConfig(lr=0.1, warmup_steps=50),
                          train=ClassifierTrainConfig(eval_batch_size=500, eval_every_epochs=10))


def _baselines() -> dict[str, dict]:
    return {name: baselines.hyperparameters(name) for name in baselines.BASELINES if name != "retrain"}


@dataclasses.dataclass(frozen=True)
class Unlearning:
    """The whole benchmark: per seed of ``seeds``, w(D) trained with ``unlearn`` from a backbone of
    ``backbone`` (pre-trained by ``pretrain``, or ImageNet weights), then each of ``methods`` in each
    of ``scenarios``. ``baselines`` holds each baseline's keyword hyperparameters (their defaults and
    sources: research/unlearning/baselines.py); ``ntk`` the scrub's own settings."""
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = METHODS    # "ntk" is Fast-NTK when unlearn.subset is not "all"
    scenarios: tuple[str, ...] = SCENARIOS
    forget_class: int = 0                 # an index among the classes of D
    forget_fraction: float = 0.1
    data: UnlearningData = UnlearningData()
    backbone: BackboneConfig = BackboneConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = dataclasses.field(default_factory=_pretrain)
    unlearn: TrainRecipe = TrainRecipe()  # trains w(D) and the retrain baseline; the scrub reads its loss and ridge
    ntk: NTKScrubConfig = NTKScrubConfig()
    baselines: dict = dataclasses.field(default_factory=_baselines)
    eval_batch_size: int = 500
    progress: bool = True
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require_names(self, "methods", METHODS)
        config_lib.require_names(self, "scenarios", SCENARIOS)
        config_lib.require(self, "forget_fraction", 0 < self.forget_fraction < 1, "a fraction strictly between 0 and 1")
        config_lib.require(self, "eval_batch_size", self.eval_batch_size > 0, "a positive int")
        config_lib.require(self, "seeds", len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds),
                           "distinct ints, e.g. 0,1,2")
        for name, values in self.baselines.items():
            if name not in METHODS or name == "retrain":
                raise ConfigError(f"config key 'baselines.{name}': not a baseline; the baselines are: "
                                  f"{', '.join(m for m in METHODS if m not in ('retrain', 'ntk'))}")
            unknown = set(values) - set(baselines.hyperparameters(name))
            if unknown:
                raise ConfigError(f"config key 'baselines.{name}': unknown hyperparameter(s) {sorted(unknown)}; "
                                  f"{name} takes: {', '.join(baselines.hyperparameters(name))}")
        self.backbone.check_model(self.model.name)
        if self.data.image_size and self.backbone.source != "imagenet":
            raise ConfigError(f"data.image_size: {self.data.image_size} resizes for the ImageNet backbone only "
                              f"(backbone.source=imagenet); the pre-training stage uses the stored size, so use 0")
        if self.unlearn.subset.startswith("prompts") and not self.model.name.startswith("vit"):
            raise ConfigError(f"unlearn.subset: {self.unlearn.subset} needs a ViT (model.name vit_tiny | vit_small), "
                              f"not {self.model.name}")

    @property
    def run_methods(self) -> tuple[str, ...]:
        """``methods`` with ``retrain`` first when it is missing: every gap is measured to it."""
        return self.methods if "retrain" in self.methods else ("retrain", *self.methods)

    def input_shape(self, stored_shape) -> tuple[int, int, int]:
        """(H, W, C) the model sees: the stored images, or resized to ``data.image_size``."""
        size = self.data.image_size
        return (size, size, stored_shape[-1]) if size else tuple(stored_shape)

    def scenario_split(self, name: str, train: pipeline.ImageArrays, test: pipeline.ImageArrays, seed: int):
        """(retain, forget, test) of scenario ``name`` on D."""
        if name == "class":
            if not 0 <= self.forget_class < train.num_classes:
                raise ConfigError(f"forget_class: {self.forget_class} is not a class of D (0..{train.num_classes - 1})")
            forget_rows = np.flatnonzero(train.labels == self.forget_class)
            test = test.subset(np.flatnonzero(test.labels != self.forget_class))
        else:
            n_forget = max(1, round(self.forget_fraction * len(train)))
            forget_rows = np.sort(np.random.default_rng([seed, 1]).permutation(len(train))[:n_forget])
        keep = np.ones(len(train), bool)
        keep[forget_rows] = False
        return train.subset(np.flatnonzero(keep)), train.subset(forget_rows), test
