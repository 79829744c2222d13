"""Cells per second for a zero-cost proxy on NAS-Bench-201: one cell at a time vs vmapped.

    python -m tools.bench.proxies [--proxy zico] [--cells 8] [--chunk 8] [--images 256]
                                  [--width 16] [--cells-per-stage 5] [--no-masked] [--no-primitives] [--all]
                                  [--out FILE.json]

Four ways to score the same ``--cells`` random cells (same seed, same random batch):
  exact-primitives  one network per cell, primitive by primitive (``jax.disable_jit``);
  exact-serial      one network per cell, op by op (what the correlation experiment does on CPU:
                    each NB201 operation compiles once and serves every cell);
  masked-serial     the masked super-network, compiled once, one cell per call;
  masked-vmap       the super-network, compiled once, ``--chunk`` cells per call (vmap over the
                    one-hot choices).
Compilation is timed apart from the steady state (a warm-up call first). Prints cells/s of each
and the ratios exact-serial / exact-primitives, vmap / masked-serial and vmap / exact-serial.
``--no-masked`` skips the two masked ways; ``--all`` then scores all 15,625 cells with the vmapped
program and reports the wall time (meant for an accelerator).
On a 24 GB CPU machine the full-size masked network (C=16, N=5) scoring ZiCo holds about 10 GB
per cell, so a chunk above 1 does not fit: measure there with ``--width 8 --cells-per-stage 1``,
or at full size with ``--no-masked``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.nas import nb201, proxies, scoring


def _batch(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.normal(size=(n, 32, 32, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def _timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default="zico", choices=proxies.PROXY_NAMES)
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--images", type=int, default=0, help="0 = the proxy's own batch size")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--cells-per-stage", type=int, default=5)
    parser.add_argument("--no-masked", action="store_true", help="only the two exact ways")
    parser.add_argument("--no-primitives", action="store_true",
                        help="skip exact-primitives (un-jitted, the slowest way; ratios against it are left out)")
    parser.add_argument("--all", action="store_true", help="score all 15,625 cells (vmapped)")
    parser.add_argument("--out", default="")
    return parser


def main(argv=None) -> None:
    command_line = parser()
    args = command_line.parse_args(argv)
    if args.all and args.no_masked:
        command_line.error("--all scores with the masked network; drop --no-masked")

    proxy = proxies.get(args.proxy)
    n_images = args.images or max(proxy.batch_size, 1)
    batch = proxies.take(_batch(n_images), n_images)
    rng = np.random.default_rng(0)
    cells = nb201.all_cells()[rng.choice(nb201.NUM_CELLS, args.cells, replace=False)]
    # The warm-up cell holds every operation, so no timed cell meets an operation compiled first.
    warm = np.array([nb201.CONV3, nb201.CONV1, nb201.POOL, nb201.SKIP, nb201.NONE, nb201.CONV3])
    key = jax.random.key(0)
    size = dict(C=args.width, N=args.cells_per_stage)
    report = _Report({"proxy": args.proxy, "images": n_images, "cells": args.cells, "chunk": args.chunk,
                      "width": args.width, "cells_per_stage": args.cells_per_stage,
                      "device": str(jax.devices()[0].platform)})

    def exact(cell):  # one cell network, op by op
        model = nb201.NB201Network(tuple(cell), rngs=nnx.Rngs(0), **size)
        return proxies.score(args.proxy, model, batch, key, jit=False, batch_size=n_images)

    if not args.no_primitives:
        with jax.disable_jit():
            _, report["exact_primitives_warmup_s"] = _timed(lambda: exact(warm))
            _, seconds = _timed(lambda: [exact(c) for c in cells])
        report["exact_primitives_cells_per_s"] = len(cells) / seconds
    _, report["exact_serial_warmup_s"] = _timed(lambda: exact(warm))
    _, seconds = _timed(lambda: [exact(c) for c in cells])
    report["exact_serial_cells_per_s"] = len(cells) / seconds
    if not args.no_primitives:
        report["exact_serial_over_primitives"] = (report["exact_serial_cells_per_s"]
                                                  / report["exact_primitives_cells_per_s"])
    if args.no_masked:
        return _write(report, args.out)

    masked = nb201.NB201Network(None, rngs=nnx.Rngs(0), **size)
    for name, chunk in (("masked_serial", 1), ("masked_vmap", args.chunk)):
        with jax.enable_x64(True) if proxy.float64 else contextlib.nullcontext():
            scorer = scoring.cell_scorer(args.proxy, masked, batch, key, n_images)
            first = jnp.asarray(nb201.one_hot(np.repeat(warm[None], chunk, axis=0)))
            _, report[f"{name}_compile_s"] = _timed(lambda: scorer(first))
            groups = [cells[i:i + chunk] for i in range(0, len(cells), chunk)]
            groups = [np.concatenate([g, np.repeat(g[-1:], chunk - len(g), axis=0)]) for g in groups]
            _, seconds = _timed(lambda: [scorer(jnp.asarray(nb201.one_hot(g))) for g in groups])
        report[f"{name}_cells_per_s"] = len(cells) / seconds
    report["vmap_over_masked_serial"] = report["masked_vmap_cells_per_s"] / report["masked_serial_cells_per_s"]
    report["vmap_over_exact_serial"] = report["masked_vmap_cells_per_s"] / report["exact_serial_cells_per_s"]
    if args.all:  # the steady rate's estimate first: a time limit may stop the whole run
        report["all_cells_estimate_s"] = nb201.NUM_CELLS / report["masked_vmap_cells_per_s"]
        _, seconds = _timed(lambda: scoring.score_cells(args.proxy, masked, nb201.all_cells(), batch,
                                                        key, chunk=args.chunk, batch_size=n_images))
        report["all_cells_seconds"] = seconds
    _write(report, args.out)


class _Report(dict):
    """A dict that prints each figure as it is measured, so that a run stopped by a time limit has
    shown what it had (the slow parts are compilation and ``--all``)."""

    def __init__(self, items: dict):
        super().__init__()
        for k, v in items.items():
            self[k] = v

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"{key:30s} {value:.4g}" if isinstance(value, float) else f"{key:30s} {value}", flush=True)


def _write(report: dict, out: str) -> None:
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
