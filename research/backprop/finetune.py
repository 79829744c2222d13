"""The efficient fine-tuning benchmark's settings, one typed schema: pre-train a network on one half
of a data set, then fine-tune its last layers on the other half once per variant (vanilla backprop,
gradient filtering, LBP-WHT, the head alone) and measure accuracy, backward FLOPs, memory and time.

``EfficientFinetune`` is what ``configs/efficient_finetune.py`` makes and
``experiments/efficient_finetune.py`` builds once.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

from research.core import config as config_lib
from research.core.config import ConfigError
from research.core.mesh import MeshConfig
from research.core.optim import OptimConfig
from research.models import ModelConfig
from research.recipes.classify import ClassifierTrainConfig, FinetuneData

VARIANT = re.compile(r"^(vanilla|head_only|filter_r(?P<r>[1-9]\d*)|lbp_k(?P<k>[1-9]\d*))$")


def parse_variants(names: tuple[str, ...]) -> list[tuple[str, str, int | None]]:
    """("vanilla", "filter_r2", "lbp_k6") -> [(name, method, setting)] with method vanilla|head_only|filter|lbp."""
    variants = []
    for name in names:
        match = VARIANT.match(str(name))
        if not match:
            raise ConfigError(f"finetune.variants: unknown variant {name!r}; allowed: vanilla, head_only, "
                              "filter_rR (R >= 1), lbp_kK (1 <= K <= 15)")
        if match["r"]:
            variants.append((name, "filter", int(match["r"])))
        elif match["k"]:
            if int(match["k"]) > 15:
                raise ConfigError(f"finetune.variants: {name}: K must be in 1..15")
            variants.append((name, "lbp", int(match["k"])))
        else:
            variants.append((name, name, None))
    return variants


def layer_kind(model_name: str) -> str:
    """The layers fine-tuning trains: token-linear layers in a ViT, convolutions otherwise."""
    return "linear" if model_name.startswith("vit") else "conv"


@dataclasses.dataclass(frozen=True)
class PretrainStage:
    """The pre-training (``optim``, ``train``); ``workdir`` "" = WORKDIR/pretrain, or another run's
    folder, whose pre-training is reused (or resumed)."""
    optim: OptimConfig = OptimConfig(lr=0.1)
    train: ClassifierTrainConfig = ClassifierTrainConfig(eval_batch_size=500, epochs=3)
    workdir: str = ""

    def __post_init__(self):
        config_lib.check_fields(self)


@dataclasses.dataclass(frozen=True)
class FinetuneStage:
    """The fine-tuning (``optim``, ``train``) of the last ``last_n`` ``unit``s (layers: conv / token-
    linear layers; blocks: model.blocks), once per variant of ``variants``."""
    optim: OptimConfig = OptimConfig(lr=0.05)
    train: ClassifierTrainConfig = ClassifierTrainConfig(eval_batch_size=500, epochs=2)
    unit: Literal["layers", "blocks"] = "layers"
    last_n: int = 2
    variants: tuple[str, ...] = ("vanilla", "filter_r2", "filter_r4", "head_only")

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "last_n", self.last_n > 0, "a positive int")
        if not self.variants:
            raise ConfigError("finetune.variants: empty; give a tuple such as (vanilla, filter_r2)")
        parse_variants(self.variants)


@dataclasses.dataclass(frozen=True)
class Measure:
    """``repeats`` timed backward passes per variant (their median), at finetune.train.batch_size."""
    repeats: int = 5

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "repeats", self.repeats > 0, "a positive int")


@dataclasses.dataclass(frozen=True)
class EfficientFinetune:
    """``model`` pre-trained on one half of ``data`` (``data.split``: classes or samples) from ``seed``,
    then fine-tuned on the other half per variant."""
    seed: int = 0
    data: FinetuneData = FinetuneData()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainStage = PretrainStage()
    finetune: FinetuneStage = FinetuneStage()
    measure: Measure = Measure()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        config_lib.check_fields(self)
        kind = layer_kind(self.model.name)
        for name, method, _ in self.variants:
            if (method, kind) in (("filter", "linear"), ("lbp", "conv")):
                raise ConfigError(f"finetune.variants: {name} does not apply to {self.model.name} "
                                  f"(its fine-tuned layers are {kind} layers)")

    @property
    def variants(self) -> list[tuple[str, str, int | None]]:
        """(name, method, setting) of each fine-tuning variant."""
        return parse_variants(self.finetune.variants)
