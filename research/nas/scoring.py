"""Scoring NB201 cells with a proxy: one compiled program for any cell, ``vmap`` over many.

The masked super-network (``nb201.NB201Network(None)``) takes its cell as data, so
``score_cells`` compiles a proxy once and evaluates it on a chunk of cells at a time with
``vmap`` over the one-hot choices; every cell sees the same initial weights (one seed) and the
same batch, as the protocol of the correlation experiments asks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.nas import nb201, proxies


def cell_scorer(name: str, model: nb201.NB201Network, batch: dict, key=None,
                batch_size: int | None = None) -> Callable:
    """A jitted ``(cells_one_hot (n, 6, 5)) -> (n,)`` scores for proxy ``name``, reading
    ``batch_size`` images (default: the proxy's own)."""
    if model.cell is not None:
        raise ValueError("cell_scorer needs the masked network: NB201Network(None, ...)")
    proxy = proxies.get(name)
    batch = proxies.read_batch(proxy, batch, batch_size)
    graphdef, state = nnx.split(model)

    def one(ops, state, batch, key):
        m = nnx.merge(graphdef, state, copy=True)
        m.ops[...] = ops.astype(m.ops[...].dtype)
        return proxy.fn(m, batch, key)

    # State and batch go in as arguments: closed over, they would be constants that XLA folds
    # through the network at compile time (minutes for a super-network).
    scores = jax.jit(jax.vmap(one, in_axes=(0, None, None, None)))
    return lambda ops: scores(ops, state, batch, key)


def score_cells(name: str, model: nb201.NB201Network, cells: Sequence[Sequence[int]], batch: dict,
                key=None, chunk: int = 8, progress: Callable | None = None,
                batch_size: int | None = None) -> np.ndarray:
    """Proxy ``name`` of every cell in ``cells`` ((n, 6) op indices), ``chunk`` cells per call;
    the last chunk is padded so there is one compilation. ``progress(k)`` after each chunk."""
    cells = np.asarray(cells, np.int32).reshape(-1, len(nb201.EDGES))
    chunk = max(1, min(chunk, len(cells)))
    proxy = proxies.get(name)
    with jax.enable_x64(True) if proxy.float64 else contextlib.nullcontext():
        scorer = cell_scorer(name, model, batch, key, batch_size)
        out = []
        for start in range(0, len(cells), chunk):
            part = cells[start:start + chunk]
            padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
            out.append(np.asarray(scorer(jnp.asarray(nb201.one_hot(padded))))[:len(part)])
            if progress is not None:
                progress(len(part))
    return np.concatenate(out).astype(np.float64)
