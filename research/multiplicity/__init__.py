"""Predictive multiplicity: dropout-based Rashomon set exploration, its metrics and baselines."""
