"""X-EcoMLA as one run's settings, one typed schema: a pretrained GQA Llama (``model``) upcycled to
MLA (``upcycle``), fitted layer-wise (``reconstruct``) and distilled from the original (``distill``,
``optim``, ``train``) on a mix of English text sources (``data``).

``XEcoMLA`` is what ``configs/x_ecomla.py`` makes and ``experiments/x_ecomla.py`` builds once.
"""
from __future__ import annotations

import dataclasses

from research.core import config as config_lib
from research.core.mesh import MeshConfig
from research.core.optim import OptimConfig
from research.data.text import TextWindows
from research.distill import DistillConfig
from research.models.pretrained import LlamaSource
from research.upcycling.reconstruct import ReconstructConfig
from research.upcycling.upcycle import UpcycleConfig


@dataclasses.dataclass(frozen=True)
class KDTraining:
    """The distillation loop: ``steps`` of ``batch_size`` windows (``grad_accum_steps`` micro-batches
    per step), logs and checkpoints. ``budget_minutes``: the held-out set is evaluated when the KD
    steps' own time reaches each mark, and the run ends at the last (one uninterrupted run: a
    resumed run's clock would restart)."""
    steps: int = 120
    batch_size: int = 4
    grad_accum_steps: int = 1
    log_every: int = 10
    checkpoint_every: int = 20
    progress: bool = True
    budget_minutes: tuple[float, ...] = ()

    def __post_init__(self):
        config_lib.check_fields(self)
        for field in ("steps", "batch_size"):
            config_lib.require(self, field, getattr(self, field) > 0, "a positive int")
        config_lib.require(self, "grad_accum_steps", self.grad_accum_steps > 0
                           and self.batch_size % self.grad_accum_steps == 0, "a positive divisor of train.batch_size")
        config_lib.require(self, "budget_minutes", all(b > 0 for b in self.budget_minutes)
                           and list(self.budget_minutes) == sorted(self.budget_minutes),
                           "positive minutes in increasing order")


@dataclasses.dataclass(frozen=True)
class XEcoMLA:
    """The whole pipeline from ``seed``: SVD initialisation, layer-wise reconstruction
    (``reconstruct.steps`` > 0), then end-to-end KD."""
    seed: int = 0
    model: LlamaSource = LlamaSource()
    data: TextWindows = TextWindows()
    upcycle: UpcycleConfig = UpcycleConfig(kv_rank=56, rope_dim=4, activation_aware=True, rope_key="shared_fit")
    reconstruct: ReconstructConfig = ReconstructConfig(steps=100, lr=1e-3)
    distill: DistillConfig = DistillConfig()
    optim: OptimConfig = OptimConfig(name="adamw", lr=2e-4, weight_decay=0.0, warmup_steps=10, grad_clip_norm=1.0)
    train: KDTraining = KDTraining()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        config_lib.check_fields(self)
