"""Time on the device, not around a call: CUPTI kernel timings through jax's Mosaic GPU profiler.

A wall clock around a jitted call counts dispatch (tens of microseconds), which at B 8, S 4k is
longer than the kernel (~13 us at 3 TB/s). ``device_ms`` asks CUPTI for the duration of every
kernel the call launches and sums them; ``kernel`` picks out the launches whose name contains a
given string (the Pallas kernel alone, without its combine). Where CUPTI is not available (a
CPU) it falls back to the wall clock and says so in ``timer``.

The inputs rotate over ``arg_sets`` (each a tuple of arrays), so that when one set fits in the
GPU's L2 (50 MB on an H100 / H200) the next run does not find it there: use enough sets that
their bytes exceed twice L2 (``sets_for``). The sets run in one jitted program, so XLA may fuse
small kernels across sets; that can only flatter an XLA baseline, never a Pallas kernel.
"""
from __future__ import annotations

import inspect
import statistics
import time

import jax

L2_BYTES = 50 * 2 ** 20


def sets_for(nbytes: int, at_least: int = 2 * L2_BYTES, most: int = 48) -> int:
    """How many input sets of ``nbytes`` each to rotate over so that together they exceed ``at_least``."""
    return max(1, min(most, -(-at_least // max(nbytes, 1))))


def _cupti():
    """jax's CUPTI profiler's ``measure`` where it runs here (a GPU backend), else None."""
    if jax.default_backend() != "gpu":
        return None
    try:
        from jax.experimental.mosaic.gpu import profiler
    except ImportError:
        return None
    return profiler.measure


def device_ms(fn, arg_sets: list[tuple], repeats: int, kernel: str | None = None) -> dict:
    """Median over ``repeats`` rounds of the per-call device time of ``fn``, one round calling it
    on every set of ``arg_sets`` in turn (one jitted program, so the sets stay in order) ->
    {"total_ms", "kernel_ms" (launches whose name holds ``kernel``; None without it),
    "timer": "cupti" | "wall", "launches": kernel names of one round}."""
    n = len(arg_sets)
    run_all = jax.jit(lambda sets: [fn(*args) for args in sets])
    jax.block_until_ready(run_all(arg_sets))                    # compile and warm up
    measure = _cupti()
    if measure is None:
        rounds = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(run_all(arg_sets))
            rounds.append(1e3 * (time.perf_counter() - start) / n)
        return {"total_ms": statistics.median(rounds), "kernel_ms": None, "timer": "wall", "launches": []}
    supported = inspect.signature(measure).parameters
    options = {k: v for k, v in (("aggregate", False), ("iterations", repeats)) if k in supported}
    rounds = []
    for _ in range(1 if "iterations" in options else repeats):
        _, timings = measure(run_all, **options)(arg_sets)
        rounds += timings if "iterations" in options and repeats > 1 else [timings]
    totals = [sum(ms for _, ms in r) / n for r in rounds]
    picked = [sum(ms for name, ms in r if kernel in name) / n for r in rounds] if kernel else None
    return {"total_ms": statistics.median(totals), "kernel_ms": statistics.median(picked) if kernel else None,
            "timer": "cupti", "launches": [name for name, _ in rounds[0]]}
