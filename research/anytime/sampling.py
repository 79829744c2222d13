"""Which subnetworks a supernet trains on: every (width, gates) of the supernet enumerated once with
its FLOPs and TPS, and samplers that draw from that table on the device (inside the jitted step).

- ``uniform``: every subnetwork equally likely (the AnytimeNN baseline; widths and gates uniform).
- ``tps`` (OURS; the TIPS paper's sampling rule is not in its public code), ``rule``:
  ``budget``: with probability ``p_extra`` the highest-TPS subnetwork within a FLOPs budget drawn
  uniformly between the smallest and largest subnetwork's FLOPs (ties: the one with more FLOPs),
  otherwise uniform; ``softmax``: p ∝ exp(beta * z-scored TPS).

A subnetwork's TPS is that of its path in the supernet's graph (``research.anytime.graph``): a
computed block takes its chain, a skipped one its skip edge. The node scores (TAS) come from the
hyper-graph of ``graph_samples`` uniformly drawn subnetworks, where a computed residual block is
"full", a skipped one "skip" and a vital (never skipped) one "conv". Width does not change the
graph, so subnetworks that differ only in width tie in TPS and the budget decides among them.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from research.anytime import graph, supernet
from research.core import config as config_lib


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    kind: Literal["uniform", "tps"] = "uniform"
    rule: Literal["budget", "softmax"] = "budget"  # tps only
    p_extra: float = 0.5          # budget rule: probability of the highest-TPS subnetwork in a budget
    beta: float = 1.0             # softmax rule: inverse temperature on z-scored TPS
    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    graph_samples: int = 8        # T subnetworks of the TAS hyper-graph
    coupling: float = 1.0         # lambda of the hyper-graph
    tps_mode: Literal["sum", "product"] = "sum"

    def __post_init__(self):
        config_lib.check_fields(self)
        config_lib.require(self, "p_extra", 0.0 <= self.p_extra <= 1.0, "a probability in [0, 1]")
        config_lib.require(self, "widths", len(self.widths) > 0 and all(0.0 < w <= 1.0 for w in self.widths)
                           and 1.0 in self.widths, "widths in (0, 1], 1.0 among them")
        config_lib.require(self, "graph_samples", self.graph_samples >= 1, "an int >= 1")
        config_lib.require(self, "coupling", self.coupling >= 0.0, "a float >= 0")


@dataclasses.dataclass(frozen=True)
class SubnetTable:
    """Every subnetwork of a supernet: widths (S,), gates (S, B) 0/1, flops (S,), tps (S,)."""
    widths: np.ndarray
    gates: np.ndarray
    flops: np.ndarray
    tps: np.ndarray

    def __len__(self) -> int:
        return len(self.widths)

    @property
    def largest(self) -> int:
        return int(np.argmax(self.flops))

    @property
    def smallest(self) -> int:
        return int(np.argmin(self.flops))

    def index(self, width: float, gates) -> int:
        hits = np.flatnonzero((self.widths == width) & (self.gates == np.asarray(gates)).all(1))
        if not hits.size:
            raise KeyError(f"no subnetwork with width {width} and gates {list(gates)}")
        return int(hits[0])


def _variants(gates: np.ndarray, can_skip: np.ndarray) -> list[str]:
    return ["conv" if not s else ("full" if g else "skip") for g, s in zip(gates, can_skip)]


def enumerate_subnets(model, input_hw: tuple[int, int], config: SamplerConfig, seed: int = 0) -> SubnetTable:
    """The table of every (width, gates) of ``model`` (a ResNet; 2^skippable x len(widths) rows)."""
    can_skip = supernet.skippable(model)
    patterns = []
    for free in itertools.product((1, 0), repeat=int(can_skip.sum())):
        g = np.ones(len(can_skip), np.int32)
        g[can_skip] = free
        patterns.append(g)
    rng = np.random.default_rng(seed)
    drawn = [patterns[i] for i in rng.integers(len(patterns), size=config.graph_samples)]
    scores = graph.tas(np.stack([graph.network_adjacency(_variants(g, can_skip)) for g in drawn]), config.coupling,
                       method="degree")
    widths, gates, flops, tps = [], [], [], []
    for width in config.widths:
        for g in patterns:
            widths.append(width)
            gates.append(g)
            flops.append(supernet.flops(model, input_hw, width, g))
            tps.append(graph.tps(scores, ["conv" if x else "skip" for x in g], mode=config.tps_mode))
    return SubnetTable(np.asarray(widths, np.float32), np.stack(gates), np.asarray(flops, np.int64),
                       np.asarray(tps, np.float64))


def make_sampler(table: SubnetTable, config: SamplerConfig):
    """sample(key, count) -> (count,) int32 indices into the table, traceable (for the jitted step)."""
    n = len(table)
    flops = jnp.asarray(table.flops, jnp.float32)
    # Rank by (TPS, FLOPs): the argmax of the masked ranks is the highest TPS, then the most FLOPs.
    order = np.lexsort((table.flops, table.tps))
    rank = np.empty(n, np.int32)
    rank[order] = np.arange(n, dtype=np.int32)
    rank = jnp.asarray(rank)
    z = (table.tps - table.tps.mean()) / (table.tps.std() + 1e-12)
    logits = jnp.asarray(config.beta * z, jnp.float32)
    lo, hi = float(table.flops.min()), float(table.flops.max())

    def uniform(key, count):
        return jax.random.randint(key, (count,), 0, n)

    def budget(key, count):
        k_uniform, k_extra, k_budget = jax.random.split(key, 3)
        budgets = jax.random.uniform(k_budget, (count,), minval=lo, maxval=hi)
        best = jnp.argmax(jnp.where(flops[None, :] <= budgets[:, None], rank[None, :], -1), axis=1)
        extra = jax.random.uniform(k_extra, (count,)) < config.p_extra
        return jnp.where(extra, best, uniform(k_uniform, count)).astype(jnp.int32)

    def softmax(key, count):
        return jax.random.categorical(key, logits, shape=(count,)).astype(jnp.int32)

    if config.kind == "uniform":
        return uniform
    return budget if config.rule == "budget" else softmax
