"""The rashomon experiment's ``data`` section: a tabular or an image data set."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from research.data import sources
from research.data.sections import DataSource
from research.data.tabular import TABULAR_DATASETS


@dataclasses.dataclass(frozen=True)
class RashomonData(DataSource):
    """rashomon: a tabular or an image set; the first ``train_limit`` training rows, and the first
    ``eval_limit`` test rows as the evaluation points."""
    COUNTS: ClassVar[tuple[str, ...]] = ("train_limit", "eval_limit")

    name: Literal[TABULAR_DATASETS + sources.IMAGE_DATASETS] = "breast_cancer"
    train_limit: int = 0
    eval_limit: int = 0
