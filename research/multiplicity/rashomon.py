"""Rashomon sets from dropout models, and the two mitigations of the paper (Hsu et al., ICLR 2024).

For a trained model with loss L_0 on the evaluation set, the empirical Rashomon set is

    R(eps) = {m : L(m) <= L_0 + eps},

over models m sampled by inference-time dropout (dropout.py): for each rate p on a grid
(``RashomonConfig.rates``: ``num_rates`` rates evenly spaced in (0, p_max]), ``models_per_rate``
masks. p = 0 is not sampled: every mask at p = 0 is the reference model itself, which R(eps) always
holds once (it is within any eps >= 0); copies of it would only weigh the set toward it.

Mitigation: a **dropout ensemble** averages the softmax outputs of k models of R(eps); R such
ensembles are compared as a set. **Model selection** draws k models of R(eps) and keeps the one
with the lowest loss; R such selections are compared as a set.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import jax
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh

from research.core import config as config_lib
from research.multiplicity import metrics
from research.multiplicity.dropout import DROPOUT_KINDS, DropoutEnsemble


@dataclasses.dataclass(frozen=True)
class RashomonConfig:
    """The ``rashomon`` section: the dropout grid, the eps grid and how models are batched."""
    kind: Literal[DROPOUT_KINDS] = "bernoulli"
    max_rate: float = 0.1                  # p_max; the rates are linspace(0, p_max, num_rates + 1)[1:]
    num_rates: int = 5
    models_per_rate: int = 50
    epsilons: tuple[float, ...] = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05)
    models_per_chunk: int = 16             # models evaluated by one vmapped call
    batch_size: int = 512                  # evaluation points per call
    ensemble_size: int = 10                # k of the mitigations
    num_ensembles: int = 10                # R of the mitigations
    seed: int = 0

    def __post_init__(self):
        config_lib.check_fields(self)
        upper = 1.0 if self.kind == "bernoulli" else math.inf
        config_lib.require(self, "max_rate", 0.0 < self.max_rate < upper,
                           "in (0, 1) for bernoulli, > 0 for gaussian")
        for name in ("num_rates", "models_per_rate", "models_per_chunk", "batch_size", "ensemble_size",
                     "num_ensembles"):
            config_lib.require(self, name, getattr(self, name) >= 1, "an int >= 1")
        config_lib.require(self, "epsilons", len(self.epsilons) > 0 and all(e >= 0 for e in self.epsilons),
                           "a non-empty tuple of numbers >= 0")

    @property
    def rates(self) -> np.ndarray:
        return np.linspace(0.0, self.max_rate, self.num_rates + 1)[1:]


@dataclasses.dataclass
class Exploration:
    """Models sampled around one trained model, all evaluated on the same N points."""
    probs: np.ndarray            # (M, N, C) softmax outputs
    losses: np.ndarray           # (M,) mean cross-entropy
    rates: np.ndarray            # (M,) the dropout rate of each model
    reference_probs: np.ndarray  # (N, C)
    reference_loss: float
    labels: np.ndarray           # (N,)
    seconds: float               # wall time of the sampling, compilation included

    @property
    def reference_pred(self) -> np.ndarray:
        return self.reference_probs.argmax(-1)

    @property
    def seconds_per_model(self) -> float:
        return self.seconds / max(len(self.losses), 1)

    def members(self, eps: float) -> np.ndarray:
        """Indices of the sampled models in R(eps)."""
        return np.flatnonzero(self.losses <= self.reference_loss + eps)

    def set_probs(self, eps: float) -> np.ndarray:
        """Softmax outputs of R(eps), the reference first: (1 + |members|, N, C)."""
        return np.concatenate([self.reference_probs[None], self.probs[self.members(eps)]], 0)


def explore(model: nnx.Module, inputs: np.ndarray, labels: np.ndarray, config: RashomonConfig, *,
            preprocess=lambda x: x, mesh: Mesh | None = None, progress: bool = False) -> Exploration:
    """Sample ``num_rates x models_per_rate`` dropout models of ``model`` (eval mode) and evaluate
    each on (inputs (N, ...), labels (N,)). Model j of rate i has key fold_in(seed key, i * M + j)."""
    start = time.perf_counter()
    ensemble = DropoutEnsemble(model, config.kind, preprocess=preprocess, mesh=mesh,
                               models_per_chunk=config.models_per_chunk, batch_size=config.batch_size)
    base = jax.random.PRNGKey(config.seed)
    reference_probs, reference_loss = ensemble.reference(inputs, labels)
    probs, losses, rates = [], [], []
    for i, rate in enumerate(tqdm.tqdm(config.rates, desc="dropout rates", disable=not progress)):
        keys = jax.vmap(lambda j: jax.random.fold_in(base, j))(
            np.arange(i * config.models_per_rate, (i + 1) * config.models_per_rate))
        p, loss = ensemble.evaluate(keys, float(rate), inputs, labels)
        probs.append(p)
        losses.append(loss)
        rates.append(np.full(len(loss), rate))
    return Exploration(np.concatenate(probs), np.concatenate(losses), np.concatenate(rates),
                       reference_probs, reference_loss, np.asarray(labels),
                       time.perf_counter() - start)


def metrics_by_eps(set_probs_of, labels: np.ndarray, reference_pred: np.ndarray,
                   epsilons) -> list[dict[str, float]]:
    """``metrics.summarize`` of the set ``set_probs_of(eps)`` (M, N, C) at each eps, with eps added."""
    return [{"eps": float(eps), **metrics.summarize(set_probs_of(eps), labels, reference_pred)}
            for eps in epsilons]


def _draws(rng: np.random.Generator, size: int, k: int, r: int) -> list[np.ndarray]:
    return [rng.choice(size, min(k, size), replace=False) for _ in range(r)]


def ensemble_set(set_probs: np.ndarray, k: int, r: int, seed: int = 0) -> np.ndarray:
    """R dropout ensembles of k models of the set, each the mean of its members' softmax: (R, N, C)."""
    rng = np.random.default_rng(seed)
    return np.stack([set_probs[idx].mean(0) for idx in _draws(rng, len(set_probs), k, r)])


def selection_set(set_probs: np.ndarray, set_losses: np.ndarray, k: int, r: int, seed: int = 0) -> np.ndarray:
    """R selections, each the lowest-loss model of k drawn from the set: (R, N, C)."""
    rng = np.random.default_rng(seed)
    return np.stack([set_probs[idx[np.argmin(set_losses[idx])]] for idx in _draws(rng, len(set_probs), k, r)])


def mitigation_by_eps(exploration: Exploration, config: RashomonConfig) -> dict[str, list[dict[str, float]]]:
    """Metrics of R single models, R ensembles and R selections drawn from R(eps), per eps."""
    out = {"single": [], "ensemble": [], "selection": []}
    ref_pred, labels = exploration.reference_pred, exploration.labels
    k, r = config.ensemble_size, config.num_ensembles
    for eps in config.epsilons:
        probs = exploration.set_probs(eps)
        losses = np.concatenate([[exploration.reference_loss], exploration.losses[exploration.members(eps)]])
        rng = np.random.default_rng(config.seed)
        singles = probs[np.concatenate([rng.choice(len(probs), 1) for _ in range(r)])]
        for name, group in (("single", singles),
                            ("ensemble", ensemble_set(probs, k, r, config.seed)),
                            ("selection", selection_set(probs, losses, k, r, config.seed))):
            out[name].append({"eps": float(eps), **metrics.summarize(group, labels, ref_pred)})
    return out
