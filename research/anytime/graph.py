"""Topological importance of nodes and paths (TIPS; Li, Bhardwaj, Yang, Marculescu, ICML 2023).

A network is an undirected graph: feature maps are nodes, ops are edges. A block of ``kind``
"basic" has 4 nodes (in, two inner, out; a chain of three ops) and "bottleneck" 5; its variant
"full" holds the chain and a skip edge in-out, "skip" only the skip edge, "conv" only the chain.
Blocks are tiled so that block b's out node is block b+1's in node; the network's input and output
nodes carry self-loops. A network of B blocks of n nodes has N = 1 + B (n - 1) nodes.

T sampled subnetworks with adjacencies A_1..A_T (N, N) form the hyper-adjacency, the A_k on the
diagonal and an identity coupling of weight lambda between every pair of copies:

    H = [[A_1, λI, ..., λI], [λI, A_2, ..., λI], ..., [λI, ..., λI, A_T]]       (T N, T N)
    P = H diag(1ᵀ H)⁻¹ (column-normalised),   π = P^s e_(1, input)              (a walk from the input)
    TAS(v) = Σ_k π(k, v)                                                          (topological accumulated score)

H is symmetric, so the walk's stationary distribution is proportional to degree: when H is
connected (the coupling joins the copies, so: when the union of the A_k is) and aperiodic (the
self-loops see to it),

    TAS(v) = (Σ_k deg_{A_k}(v) + λ T (T - 1)) / Σ_u (Σ_k deg_{A_k}(u) + λ T (T - 1)),

the closed form ``tas(..., method="degree")``. A path's topological path score is TPS = Σ TAS over
the nodes it visits (``mode="product"``: the product, a variant of the reference analysis code).
A path takes, in each block, the skip edge (visiting 1 node: the out node) or the chain (visiting
n - 1 nodes); it starts at the input node.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BLOCK_NODES = {"basic": 4, "bottleneck": 5}
VARIANTS = ("full", "skip", "conv")
ROUTES = ("skip", "conv")


def _check(kind: str, variants: Sequence[str], allowed: Sequence[str], what: str) -> None:
    if kind not in BLOCK_NODES:
        raise ValueError(f"unknown block kind {kind!r}; choose one of: {', '.join(BLOCK_NODES)}")
    bad = [v for v in variants if v not in allowed]
    if bad or len(variants) == 0:
        raise ValueError(f"{what} must be a non-empty sequence of {', '.join(allowed)}; got {list(variants)}")


def block_adjacency(variant: str = "full", kind: str = "basic") -> np.ndarray:
    """(n, n) symmetric 0/1 adjacency of one block: chain edges i - i+1 and the skip edge 0 - n-1."""
    _check(kind, [variant], VARIANTS, "variant")
    n = BLOCK_NODES[kind]
    a = np.zeros((n, n))
    if variant != "skip":
        a[np.arange(n - 1), np.arange(1, n)] = 1.0
    if variant != "conv":
        a[0, n - 1] = 1.0
    return a + a.T


def network_adjacency(variants: Sequence[str], kind: str = "basic") -> np.ndarray:
    """(N, N) adjacency of the blocks ``variants`` tiled on shared nodes, self-loops on input and output."""
    _check(kind, variants, VARIANTS, "variants")
    step = BLOCK_NODES[kind] - 1
    size = 1 + len(variants) * step
    a = np.zeros((size, size))
    for b, variant in enumerate(variants):
        a[b * step:(b + 1) * step + 1, b * step:(b + 1) * step + 1] += block_adjacency(variant, kind)
    a[0, 0] = a[-1, -1] = 1.0
    return a


def hyper_adjacency(adjacencies: np.ndarray, coupling: float = 1.0) -> np.ndarray:
    """(T N, T N) from (T, N, N): the A_k on the diagonal, ``coupling`` * I between distinct copies."""
    adjacencies = np.asarray(adjacencies, np.float64)
    t, n, _ = adjacencies.shape
    h = np.kron(np.ones((t, t)) - np.eye(t), coupling * np.eye(n))
    for k in range(t):
        h[k * n:(k + 1) * n, k * n:(k + 1) * n] = adjacencies[k]
    return h


def walk_distribution(h: np.ndarray, start: int = 0, steps: int = 6001) -> np.ndarray:
    """π = P^steps e_start with P = H diag(column sums)⁻¹: where a walk from ``start`` is after
    ``steps`` steps (by repeated squaring: log2(steps) matrix products)."""
    degree = h.sum(0)
    if np.any(degree <= 0):
        raise ValueError("every node of H needs an edge (coupling > 0 gives each copy one when T > 1)")
    p = np.linalg.matrix_power(h / degree[None, :], steps)
    return p[:, start]


def tas(adjacencies: np.ndarray, coupling: float = 1.0, *, method: str = "power", steps: int = 6001) -> np.ndarray:
    """(N,) topological accumulated score of each node over the T subnetworks (T, N, N); sums to 1.
    method "power": the walk from the input node (node 0 of copy 1); "degree": the closed form."""
    adjacencies = np.asarray(adjacencies, np.float64)
    t, n, _ = adjacencies.shape
    if method == "power":
        return walk_distribution(hyper_adjacency(adjacencies, coupling), 0, steps).reshape(t, n).sum(0)
    if method == "degree":
        score = adjacencies.sum(1).sum(0) + coupling * t * (t - 1)
        return score / score.sum()
    raise ValueError(f"unknown method {method!r}; choose one of: power, degree")


def path_nodes(routes: Sequence[str], kind: str = "basic") -> list[int]:
    """Node indices a path visits: the input node, then per block its out node ("skip") or every
    node after its in node ("conv")."""
    _check(kind, routes, ROUTES, "routes")
    step = BLOCK_NODES[kind] - 1
    nodes = [0]
    for b, route in enumerate(routes):
        nodes += [b * step + i for i in range(1, step + 1)] if route == "conv" else [(b + 1) * step]
    return nodes


def tps(scores: np.ndarray, routes: Sequence[str], kind: str = "basic", mode: str = "sum") -> float:
    """Topological path score: Σ (or Π, ``mode="product"``) of ``scores`` (N,) over the path's nodes."""
    values = np.asarray(scores)[path_nodes(routes, kind)]
    if mode == "sum":
        return float(values.sum())
    if mode == "product":
        return float(np.prod(values))
    raise ValueError(f"unknown mode {mode!r}; choose one of: sum, product")
