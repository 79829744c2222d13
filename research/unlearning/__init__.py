"""Machine unlearning: empirical NTK, NTK scrubbing and Fast-NTK, baselines, metrics.

    from research.unlearning import NTKScrubConfig, ntk_scrub, unlearning_metrics
"""
from research.unlearning.ntk import empirical_ntk
from research.unlearning.ntk_scrub import NTKScrubConfig, ntk_scrub
from research.unlearning.metrics import mia_efficacy, unlearning_metrics

__all__ = ["empirical_ntk", "NTKScrubConfig", "ntk_scrub", "mia_efficacy", "unlearning_metrics"]
