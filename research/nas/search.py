"""Zero-shot architecture search under a budget: the evolutionary search of ZiCo (Li et al.,
ICLR 2023), which is Zen-NAS's (Lin et al., ICCV 2021), and random search at equal cost.

    population <- P distinct random candidates c with cost(c) <= B, each scored s(c)
    repeat T steps:
        parent ~ Uniform(population);  child <- mutate(parent)          (one random change)
        if cost(child) <= B and child not in population:
            score s(child), add it; if |population| > P: drop argmin_c s(c)
    return argmax s over every candidate scored

``s`` is a zero-cost proxy of the candidate's network at initialisation (``proxy_scorer``), or any
function of the candidate (tests use fake ones). ``random_search`` scores the same number of
distinct candidates drawn uniformly under the budget and keeps the best by proxy. Both are
deterministic given ``seed`` (and, for ``kind="latency"``, given the measured latencies), and with
the same seed random search's first draws are evolution's initial population.

A proxy is deterministic for a candidate (one network seed, one batch, one key), so each search
caches scores: re-meeting a candidate costs no evaluation. ``evaluations`` counts distinct
candidates scored; ``history`` is (evaluations, best score so far) after each evaluation.
Non-finite scores rank last.

A search space is anything with the ``SearchSpace`` methods; ``NB201Space`` here (cells of
``research.nas.nb201``) and ``MobileNetSpace`` in ``research.nas.macro_space``. Costs are in
``UNITS``: millions of FLOPs (each space's convention), millions of parameters, or milliseconds
of measured forward latency (``LatencyCost``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from research.nas import nb201, proxies

COST_KINDS = ("flops", "params", "latency")
UNITS = {"flops": "MFLOPs", "params": "M params", "latency": "ms"}


class BudgetError(ValueError):
    """No candidate satisfies the budget (after many random tries)."""


@runtime_checkable
class SearchSpace(Protocol):
    def sample(self, rng: np.random.Generator) -> Hashable: ...

    def mutate(self, candidate: Hashable, rng: np.random.Generator) -> Hashable: ...

    def cost(self, candidate: Hashable, kind: str) -> float: ...

    def build(self, candidate: Hashable, num_classes: int, seed: int) -> nnx.Module: ...

    def describe(self, candidate: Hashable) -> str: ...


@dataclasses.dataclass
class SearchResult:
    best: Hashable
    score: float
    cost: float            # of ``best``, in UNITS[kind]
    evaluations: int       # distinct candidates scored (proxy calls)
    steps: int             # mutations tried (evolution) or candidates drawn (random)
    rejected: int          # over-budget candidates drawn or made (initial sampling too)
    seconds: float         # wall time of the whole search (cost checks included)
    history: list[tuple[int, float]]  # (evaluations, best score so far), one per evaluation


# --------------------------------------------------------------------------- costs


class LatencyCost:
    """Measured forward latency (ms) of a candidate's network on the default device, cached.

        latency(c) = median over ``runs`` calls of the jitted eval-mode forward of a
                     (batch_size, *image_shape) batch, after one untimed call that compiles.

    ``measured`` counts the candidates actually timed (the rest came from the cache).
    """

    def __init__(self, build: Callable[[Hashable], nnx.Module], image_shape: Sequence[int],
                 batch_size: int = 1, runs: int = 5):
        self.build, self.image_shape = build, tuple(image_shape)
        self.batch_size, self.runs = batch_size, runs
        self.cache: dict[Hashable, float] = {}
        self.measured = 0

    def __call__(self, candidate: Hashable) -> float:
        if candidate not in self.cache:
            self.cache[candidate] = self._measure(self.build(candidate))
            self.measured += 1
        return self.cache[candidate]

    def _measure(self, model: nnx.Module) -> float:
        model.eval()
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        x = jnp.zeros((self.batch_size, *self.image_shape), jnp.float32)
        jax.block_until_ready(forward(state, x))  # compile, and warm the caches
        times = []
        for _ in range(self.runs):
            start = time.perf_counter()
            jax.block_until_ready(forward(state, x))
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times))


def proxy_scorer(space: SearchSpace, name: str, batch: dict, num_classes: int, seed: int = 0,
                 key=None, jit: bool = False) -> Callable[[Hashable], float]:
    """``s(c)``: proxy ``name`` of ``space.build(c, num_classes, seed)`` on ``batch`` (key
    ``key``, default ``jax.random.key(seed)``); one network seed for every candidate, as in the
    correlation experiments. Op by op by default: every candidate is a new program, and compiling
    a small one whole costs more than running it; ``jit=True`` may pay off for large networks."""
    proxies.get(name)  # fail early on an unknown name
    key = jax.random.key(seed) if key is None else key

    def score(candidate):
        model = space.build(candidate, num_classes, seed)
        return float(proxies.score(name, model, batch, key, jit=jit))

    return score


# --------------------------------------------------------------------------- searches


def _rank(score: float) -> float:
    return score if math.isfinite(score) else -math.inf


def sample_feasible(space: SearchSpace, rng: np.random.Generator, kind: str, budget: float,
                    max_tries: int = 1000) -> tuple[Hashable, int]:
    """(a random candidate with cost <= budget, number of over-budget draws before it)."""
    cheapest = math.inf
    for tries in range(max_tries):
        candidate = space.sample(rng)
        cost = space.cost(candidate, kind)
        if cost <= budget:
            return candidate, tries
        cheapest = min(cheapest, cost)
    raise BudgetError(f"no candidate with {kind} <= {budget:g} {UNITS[kind]} in {max_tries} random "
                      f"samples (cheapest seen: {cheapest:.4g} {UNITS[kind]}); raise the budget")


class _Scores:
    """Score cache of one search, with its best-so-far history."""

    def __init__(self, score_fn: Callable[[Hashable], float], bar=None):
        self.score_fn, self.bar = score_fn, bar
        self.values: dict[Hashable, float] = {}
        self.history: list[tuple[int, float]] = []
        self.best: Hashable | None = None

    def __call__(self, candidate: Hashable) -> float:
        if candidate not in self.values:
            value = _rank(float(self.score_fn(candidate)))
            self.values[candidate] = value
            if self.best is None or value > self.values[self.best]:
                self.best = candidate
            self.history.append((len(self.values), self.values[self.best]))
            if self.bar is not None:
                self.bar.update(1)
        return self.values[candidate]

    def result(self, space, kind, steps, rejected, start) -> SearchResult:
        return SearchResult(best=self.best, score=self.values[self.best],
                            cost=float(space.cost(self.best, kind)), evaluations=len(self.values),
                            steps=steps, rejected=rejected, seconds=time.perf_counter() - start,
                            history=self.history)


def _check(kind: str, budget: float, size: int) -> None:
    if kind not in COST_KINDS:
        raise ValueError(f"cost kind {kind!r}; choose from: {', '.join(COST_KINDS)}")
    if not budget > 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    if size < 1:
        raise ValueError(f"population / evaluations must be >= 1, got {size}")


def evolution_search(space: SearchSpace, score_fn: Callable[[Hashable], float], *, kind: str,
                     budget: float, population: int, steps: int, seed: int = 0,
                     max_tries: int = 1000, progress: bool = False) -> SearchResult:
    """The evolutionary search above. The population holds distinct candidates, so it cannot fill
    with copies of one; where fewer than ``population`` distinct feasible ones turn up, it starts
    smaller. Ties for the worst drop the oldest."""
    _check(kind, budget, population)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    rejected = 0
    scores = _Scores(score_fn)
    members: list[Hashable] = []
    with tqdm(total=population + steps, disable=not progress, desc="evolution") as bar:
        for _ in range(population):
            candidate, misses = sample_feasible(space, rng, kind, budget, max_tries)
            rejected += misses
            if candidate not in members:
                scores(candidate)
                members.append(candidate)
            bar.update(1)
        for _ in range(steps):
            child = space.mutate(members[rng.integers(len(members))], rng)
            if space.cost(child, kind) > budget:
                rejected += 1
            elif child not in members:
                scores(child)
                members.append(child)
                if len(members) > population:
                    members.pop(min(range(len(members)), key=lambda i: scores.values[members[i]]))
            bar.update(1)
    return scores.result(space, kind, steps, rejected, start)


def random_search(space: SearchSpace, score_fn: Callable[[Hashable], float], *, kind: str,
                  budget: float, evaluations: int, seed: int = 0, max_tries: int = 1000,
                  progress: bool = False) -> SearchResult:
    """Score ``evaluations`` distinct candidates drawn uniformly under the budget; the best by
    proxy. Stops early when ``max_tries`` draws in a row bring no new candidate (a small space)."""
    _check(kind, budget, evaluations)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    rejected = drawn = stale = 0
    with tqdm(total=evaluations, disable=not progress, desc="random") as bar:
        scores = _Scores(score_fn, bar)
        while len(scores.values) < evaluations and stale < max_tries:
            candidate, misses = sample_feasible(space, rng, kind, budget, max_tries)
            rejected += misses
            drawn += misses + 1
            stale = stale + 1 if candidate in scores.values else 0
            scores(candidate)
    return scores.result(space, kind, drawn, rejected, start)


# --------------------------------------------------------------------------- NB201


class NB201Space:
    """NB201 cells (``research.nas.nb201``, C channels, N cells per stage); a candidate is a cell.

    sample: uniform over ``cells`` (default: all 15,625 cells).
    mutate: one edge's op changed to another, uniformly. With a list of ``cells`` (e.g. those of
        the ground-truth file): a listed cell that differs in exactly one edge, uniformly; a
        random other listed cell when none does.
    cost: flops = ``nb201.count_flops`` / 1e6 (NB201's convention, the network as built),
        params = ``nb201.count_params`` / 1e6, latency = ``LatencyCost`` (ms).
    """

    def __init__(self, *, C: int = 16, N: int = 5, num_classes: int = 10, image_size: int = 32,
                 cells: Sequence[Sequence[int]] | None = None, latency_batch: int = 1,
                 latency_runs: int = 5):
        self.C, self.N, self.num_classes, self.image_size = C, N, num_classes, image_size
        self.cells = None if cells is None else sorted({nb201.check_cell(c) for c in cells})
        if self.cells is not None and not self.cells:
            raise ValueError("NB201Space: the list of cells is empty")
        self._array = None if cells is None else np.array(self.cells, np.int32)
        self._neighbours: dict[nb201.Cell, list[nb201.Cell]] = {}
        self.latency = LatencyCost(lambda c: self.build(c, num_classes, 0),
                                   (image_size, image_size, 3), latency_batch, latency_runs)

    def sample(self, rng: np.random.Generator) -> nb201.Cell:
        if self.cells is not None:
            return self.cells[rng.integers(len(self.cells))]
        return tuple(int(o) for o in rng.integers(len(nb201.OPS), size=len(nb201.EDGES)))

    def mutate(self, cell: nb201.Cell, rng: np.random.Generator) -> nb201.Cell:
        if self.cells is None:
            edge = rng.integers(len(nb201.EDGES))
            op = (cell[edge] + rng.integers(1, len(nb201.OPS))) % len(nb201.OPS)  # never the same
            return tuple(int(op) if e == edge else o for e, o in enumerate(cell))
        near = self.neighbours(cell)
        if near:
            return near[rng.integers(len(near))]
        others = [c for c in self.cells if c != cell] or self.cells
        return others[rng.integers(len(others))]

    def neighbours(self, cell: nb201.Cell) -> list[nb201.Cell]:
        """Listed cells that differ from ``cell`` in exactly one edge."""
        if cell not in self._neighbours:
            one_edge = np.sum(self._array != np.asarray(cell), axis=1) == 1
            self._neighbours[cell] = [self.cells[i] for i in np.flatnonzero(one_edge)]
        return self._neighbours[cell]

    def cost(self, cell: nb201.Cell, kind: str) -> float:
        if kind == "flops":
            return nb201.count_flops(cell, self.num_classes, self.image_size, self.C, self.N) / 1e6
        if kind == "params":
            return nb201.count_params(cell, self.num_classes, self.C, self.N) / 1e6
        if kind == "latency":
            return self.latency(cell)
        raise ValueError(f"cost kind {kind!r}; choose from: {', '.join(COST_KINDS)}")

    def build(self, cell: nb201.Cell, num_classes: int, seed: int) -> nb201.NB201Network:
        return nb201.NB201Network(cell, num_classes=num_classes, C=self.C, N=self.N,
                                  rngs=nnx.Rngs(seed))

    def describe(self, cell: nb201.Cell) -> str:
        return nb201.to_string(cell)
