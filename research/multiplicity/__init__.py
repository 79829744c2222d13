"""Predictive multiplicity: dropout-based Rashomon set exploration, its metrics and baselines.

    from research.multiplicity import RashomonConfig, explore, summarize
"""
from research.multiplicity.dropout import DropoutEnsemble, with_output_dropout
from research.multiplicity.metrics import ambiguity, discrepancy, rashomon_capacity, summarize
from research.multiplicity.rashomon import RashomonConfig, explore

__all__ = ["DropoutEnsemble", "with_output_dropout", "ambiguity", "discrepancy", "rashomon_capacity", "summarize",
           "RashomonConfig", "explore"]
