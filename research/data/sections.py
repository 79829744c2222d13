"""The ``data`` section of each experiment's config, one frozen dataclass each.

Every section names a data set and where it comes from (`DataSource`: name, source, data_dir);
each experiment's section adds how much of it to use and how to present it. A config file makes
its section with ``config_lib.section(StreamData, name="cifar10_sample")``, the experiment builds
it back with ``config_lib.build(StreamData, config, "data")``: an unknown data set, source kind or
a negative count is then one error line naming the key, before any work.

A ``data_dir`` that is given must exist and is the only place looked in (`sources.load`).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from research.core import config as config_lib
from research.data import pipeline, sources
from research.data.tabular import TABULAR_DATASETS


@dataclasses.dataclass(frozen=True)
class DataSource:
    """An image data set of `sources` (``name``) and where it comes from: ``source`` auto (the
    offline copy when it is here, else the hub) | offline | hub; ``data_dir`` the folder of the
    offline files ("" = $RESEARCH_DATA_DIR)."""
    COUNTS: ClassVar[tuple[str, ...]] = ()  # int fields that must be >= 0 (0 = all / off)

    name: Literal[sources.IMAGE_DATASETS] = "digits"
    source: Literal[sources.SOURCE_KINDS] = "auto"
    data_dir: str = ""

    def __post_init__(self):
        config_lib.check_fields(self)
        for field in self.COUNTS:
            config_lib.require(self, field, getattr(self, field) >= 0, "an int >= 0 (0 = all)")

    def load(self, name: str | None = None):
        """The `datasets.DatasetDict` of ``name`` (default: this section's), from this section's source."""
        return sources.load(name or self.name, source=self.source, data_dir=self.data_dir or None)

    def splits(self, name: str | None = None, label: str = "label", classes: tuple[int, ...] = (),
               key: str = "data.classes") -> tuple[pipeline.ImageArrays, pipeline.ImageArrays]:
        """(train, test) as in-memory arrays, with ``label`` as the class column; with ``classes``,
        only those (relabelled 0..len-1 in that order). A class that does not exist is one
        `ConfigError` naming ``key``."""
        ds = self.load(name)
        train, test = pipeline.to_arrays(ds["train"], label), pipeline.to_arrays(ds["test"], label)
        if not classes:
            return train, test
        bad = [c for c in classes if not 0 <= c < train.num_classes]
        if bad:
            raise config_lib.ConfigError(f"config key '{key}': classes {bad} do not exist in {name or self.name} "
                                         f"({train.num_classes} classes)")
        return pipeline.select_classes(train, classes), pipeline.select_classes(test, classes)


@dataclasses.dataclass(frozen=True)
class ClassifierData(DataSource):
    """train_classifier: the first ``train_limit`` training images; random crops with
    ``crop_padding`` pixels of padding (0 = none) and horizontal ``flip`` while training."""
    COUNTS: ClassVar[tuple[str, ...]] = ("train_limit", "crop_padding")

    train_limit: int = 0
    crop_padding: int = 0
    flip: bool = False


@dataclasses.dataclass(frozen=True)
class FinetuneData(ClassifierData):
    """efficient_finetune: ``split`` classes (pre-train on the first half of the classes, fine-tune
    on the rest: a non-IID split) or samples (two random halves); ``train_limit`` caps each half."""
    name: Literal[sources.IMAGE_DATASETS] = "fashion_mnist"
    crop_padding: int = 2
    split: Literal["classes", "samples"] = "classes"


@dataclasses.dataclass(frozen=True)
class AnytimeData(DataSource):
    """anytime: the first ``train_limit`` training images, of which the last ``val_size`` are held
    out to pick each budget's subnetwork; the first ``eval_limit`` test images."""
    COUNTS: ClassVar[tuple[str, ...]] = ("train_limit", "eval_limit")

    name: Literal[sources.IMAGE_DATASETS] = "cifar10_sample"
    train_limit: int = 0
    val_size: int = 500
    eval_limit: int = 0

    def __post_init__(self):
        super().__post_init__()
        config_lib.require(self, "val_size", self.val_size >= 1,
                           "an int >= 1 (the held-out images that pick subnetworks)")


@dataclasses.dataclass(frozen=True)
class RashomonData(DataSource):
    """rashomon: a tabular or an image set; the first ``train_limit`` training rows, and the first
    ``eval_limit`` test rows as the evaluation points."""
    COUNTS: ClassVar[tuple[str, ...]] = ("train_limit", "eval_limit")

    name: Literal[TABULAR_DATASETS + sources.IMAGE_DATASETS] = "breast_cancer"
    train_limit: int = 0
    eval_limit: int = 0


@dataclasses.dataclass(frozen=True)
class StreamData(DataSource):
    """online_lora: ``train_per_class`` images of each class make the stream (0 = every training
    image), ``test_per_class`` the test set (0 = all); ``image_size`` resizes on the device (0 = as
    stored)."""
    COUNTS: ClassVar[tuple[str, ...]] = ("train_per_class", "test_per_class", "image_size")

    name: Literal[sources.IMAGE_DATASETS] = "fashion_mnist"
    train_per_class: int = 2000
    test_per_class: int = 0
    image_size: int = 0


@dataclasses.dataclass(frozen=True)
class UnlearningData(DataSource):
    """unlearning: D is ``train_per_class`` images of each of ``classes`` (() = every class, 0 = every
    image), capped at ``train_total`` (a seeded draw; 0 = no cap); ``image_size`` resizes for the
    ImageNet backbone (0 = as stored)."""
    COUNTS: ClassVar[tuple[str, ...]] = ("train_per_class", "train_total", "image_size")

    name: Literal[sources.IMAGE_DATASETS] = "cifar10_sample"
    classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    train_per_class: int = 100
    train_total: int = 0
    image_size: int = 0


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
