"""Choosing a continual learner's settings without the test split: a slice of the training images
is held out, each candidate learning rate makes one selection pass over a stream of the rest, and the
rate whose final model scores best on the held-out slice is kept (the ``select`` section of
configs/online_lora.py; experiments/online_lora.py ``choose_settings`` runs the passes)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from research.core import config as config_lib


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """lrs                 Adam learning rates to try, one selection pass each; () = no selection (the
                        configured rates are used as they are).
    holdout_per_class   training images of each class held out from the passes and scored after them;
                        every class must keep more than this many.
    seed                the held-out draw and the selection stream's class order (one selection serves
                        every seed of a sweep).
    calibrate_plateaus  Online-LoRA: fit the plateau thresholds to the chosen rate's loss trace.
    workdir             where the passes are kept ("" = WORKDIR/select); a sweep that shares it selects once.
    """
    lrs: tuple[float, ...] = ()
    holdout_per_class: int = 50
    seed: int = 0
    calibrate_plateaus: bool = True
    workdir: str = ""

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "lrs", all(lr > 0 for lr in self.lrs), "a tuple of positive floats (() = none)")
        config_lib.require(self, "holdout_per_class", self.holdout_per_class >= 1, "an int >= 1")

    def check_holdout(self, labels: np.ndarray, num_classes: int) -> None:
        """A `FieldError` on ``holdout_per_class`` when some class of ``labels`` (the training images)
        would keep none outside the held-out slice; nothing to check without ``lrs``."""
        smallest = int(np.bincount(labels, minlength=num_classes).min())
        config_lib.require(self, "holdout_per_class", not self.lrs or self.holdout_per_class < smallest,
                           f"fewer than the smallest class's {smallest} training images")


def best_lr(scores: Mapping[float, float]) -> float:
    """The learning rate with the highest held-out score; of equal scores, the smallest rate (the
    more conservative step, and the same choice whatever order the passes ran in)."""
    if not scores:
        raise ValueError("no selection pass was scored")
    return max(scores, key=lambda lr: (scores[lr], -lr))
