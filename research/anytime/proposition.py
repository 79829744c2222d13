"""The TIPS proposition, checked on an MLP of basic blocks: does a path with a higher topological
path score (TPS) have larger input-output Jacobian singular values at initialisation?

The network: x (B, 784) -> h_0 = relu(x W_0 + b_0) (B, W), then D basic blocks, each two
Linear(W, W) + ReLU layers and a skip. A path takes, in each block, the skip (identity) or the
chain; along it, from h_0 to the last block's output,

    J_path(x) = Π_l diag(relu'(z_l(x))) W_lᵀ      (W, W) per sample, z_l the chain layer's input to ReLU,

with the z_l of the path's own forward pass. Its score is the mean of J_path's singular values over
the W directions and a batch of inputs. The path's TPS comes from the graph of the full network
(every block "full"; ``research.anytime.graph``), where a skip visits 1 node and a chain 3.

``init``: "torch" (PyTorch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights
and biases, what the reference's analysis builds) or "he" (N(0, 2 / fan_in), zero bias: the
ReLU-preserving scale).
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from research.anytime import graph

INITS = ("torch", "he")


def _linear(key, fan_in: int, fan_out: int, init: str) -> tuple[jax.Array, jax.Array]:
    kw, kb = jax.random.split(key)
    if init == "torch":
        bound = 1.0 / np.sqrt(fan_in)
        return (jax.random.uniform(kw, (fan_in, fan_out), minval=-bound, maxval=bound),
                jax.random.uniform(kb, (fan_out,), minval=-bound, maxval=bound))
    if init == "he":
        return jax.random.normal(kw, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in), jnp.zeros(fan_out)
    raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")


def init_mlp(key: jax.Array, depth: int, width: int = 80, in_dim: int = 784, init: str = "torch") -> dict:
    """{"stem": (W (in_dim, width), b), "blocks": [((W1, b1), (W2, b2)), ...] (depth of them)}."""
    keys = jax.random.split(key, 1 + 2 * depth)
    layers = [_linear(k, width, width, init) for k in keys[1:]]
    return {"stem": _linear(keys[0], in_dim, width, init), "blocks": list(zip(layers[0::2], layers[1::2]))}


def path_singular_values(params: dict, x: jax.Array, routes: Sequence[str]) -> jax.Array:
    """(B, W) singular values of J_path at each input of x (B, in_dim); routes: "skip" | "conv" per block."""
    if len(routes) != len(params["blocks"]):
        raise ValueError(f"a path needs one route per block: {len(params['blocks'])}, got {len(routes)}")
    w0, b0 = params["stem"]
    h = jax.nn.relu(x @ w0 + b0)
    jac = jnp.broadcast_to(jnp.eye(h.shape[1]), (h.shape[0],) + (h.shape[1],) * 2)  # (B, W, W): d h / d h_0
    for route, layers in zip(routes, params["blocks"]):
        if route == "skip":
            continue
        for w, b in layers:
            z = h @ w + b
            h = jax.nn.relu(z)
            # d h_new / d h_0 = diag(relu'(z)) Wᵀ (d h / d h_0)
            jac = (z > 0)[:, :, None] * jnp.einsum("io,bij->boj", w, jac)
    return jnp.linalg.svd(jac, compute_uv=False)


@dataclasses.dataclass(frozen=True)
class PathRecord:
    depth: int
    routes: tuple[str, ...]
    nodes: int            # nodes the path visits (the input node included)
    tps_sum: float
    tps_product: float
    mean_sigma: float


def sample_paths(depth: int, per_mix: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    """Up to ``per_mix`` distinct paths for each number of chains c = 0..depth (all when fewer exist)."""
    paths = []
    for convs in range(depth + 1):
        placements = list(itertools.combinations(range(depth), convs))
        chosen = rng.choice(len(placements), size=min(per_mix, len(placements)), replace=False)
        for i in sorted(chosen):
            paths.append(tuple("conv" if b in placements[i] else "skip" for b in range(depth)))
    return paths


def check(x: np.ndarray, depths: Sequence[int] = (6, 7, 8, 9, 10), *, width: int = 80, per_mix: int = 4,
          init: str = "torch", seed: int = 0) -> list[PathRecord]:
    """TPS and mean Jacobian singular value of sampled paths of MLPs of each depth (one MLP per depth)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(x.reshape(len(x), -1), jnp.float32)
    records = []
    for depth in depths:
        params = init_mlp(jax.random.key(seed * 1000 + depth), depth, width, x.shape[1], init)
        scores = graph.tas(graph.network_adjacency(["full"] * depth)[None], method="degree")
        for routes in sample_paths(depth, per_mix, rng):
            sigma = float(path_singular_values(params, x, routes).mean())
            records.append(PathRecord(depth, routes, len(graph.path_nodes(routes)), graph.tps(scores, routes),
                                      graph.tps(scores, routes, mode="product"), sigma))
    return records


def rank_correlations(records: Sequence[PathRecord]) -> dict[str, float]:
    """Spearman rho of TPS (sum and product) against the mean singular value: over all paths, and
    the mean of the within-group rho over groups of equal node count (groups of >= 3 paths)."""
    sigma = np.array([r.mean_sigma for r in records])
    out = {}
    for mode in ("sum", "product"):
        tps = np.array([getattr(r, f"tps_{mode}") for r in records])
        out[f"spearman_{mode}"] = float(scipy.stats.spearmanr(tps, sigma).statistic)
        within = []
        for n in sorted({r.nodes for r in records}):
            idx = [i for i, r in enumerate(records) if r.nodes == n]
            if len(idx) >= 3 and np.ptp(tps[idx]) > 0:
                within.append(scipy.stats.spearmanr(tps[idx], sigma[idx]).statistic)
        out[f"spearman_{mode}_equal_nodes"] = float(np.mean(within)) if within else float("nan")
    return out
