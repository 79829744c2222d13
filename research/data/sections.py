"""`DataSource`: the base of every experiment's ``data`` section.

A section names a data set and where it comes from (name, source, data_dir); each experiment's
section (in its library area: `UnlearningData` in research/unlearning/benchmark.py, `StreamData` in
research/adapters/online_stream.py, ...) adds how much of it to use and how to present it. A config
file makes it with ``config_lib.section(StreamData, name="cifar10_sample")``, the experiment builds it
back: an unknown data set, source kind or a negative count is then one error line naming the key,
before any work.

A ``data_dir`` that is given must exist and is the only place looked in (`sources.load`).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from research.core import config as config_lib
from research.data import pipeline, sources


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
