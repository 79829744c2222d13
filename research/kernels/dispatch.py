"""Measured dispatch: which implementation of absorbed MLA decode ``attention_impl=auto`` runs.

``mla_decode_dispatch.json`` beside this file is written by the GPU tuning run
(``python -m tools.bench.attention --write-dispatch``, a step of ``tools/bench/gpu_check.py``): for
each device kind, one row per measured cell (B, S, H, r_kv) with each implementation's device time
and the Triton launch that was timed (``triton_options``). ``choose`` returns the fastest
implementation at the measured cell nearest to a call's shape (same H and r_kv; B and S nearest in
log2) with the launch options to run it with, and ``xla`` where the device kind, the H / r_kv pair
or the whole table is missing, so ``auto`` never runs a kernel that no measurement showed faster.
"""
from __future__ import annotations

import functools
import json
import math
import os

TABLE_FILE = os.path.join(os.path.dirname(__file__), "mla_decode_dispatch.json")
IMPLEMENTATIONS = ("xla", "triton", "mosaic_gpu")
ROW_FIELDS = {"batch", "context", "heads", "kv_rank", "ms"}


@functools.cache
def load_table(path: str = TABLE_FILE) -> dict:
    """{device kind: [row, ...]} with rows {"batch", "context", "heads", "kv_rank", "ms": {impl: ms}};
    {} when the file is absent. A malformed file raises naming the file."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            table = json.load(f)["devices"]
        bad = [row for rows in table.values() for row in rows if not ROW_FIELDS <= set(row)]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        bad = [f"{type(e).__name__}: {e}"]
    if bad:
        raise ValueError(f"{path}: not a dispatch table (first bad entry: {bad[0]}); rewrite it with "
                         "python -m tools.bench.attention --write-dispatch")
    return table


def _distance(row: dict, batch: int, context: int) -> float:
    return abs(math.log2(row["batch"] / batch)) + abs(math.log2(row["context"] / context))


def choose(device_kind: str, batch: int, context: int, heads: int, kv_rank: int, table: dict | None = None,
           exclude: tuple[str, ...] = ()) -> str:
    """The implementation measured fastest on ``device_kind`` at the cell nearest (B, S) with the
    same H and r_kv, leaving out ``exclude`` (kernels that cannot take the call's shapes); ``xla``
    where nothing was measured."""
    return choose_with_options(device_kind, batch, context, heads, kv_rank, table, exclude)[0]


def choose_with_options(device_kind: str, batch: int, context: int, heads: int, kv_rank: int,
                        table: dict | None = None, exclude: tuple[str, ...] = ()) -> tuple[str, dict]:
    """``choose`` and the launch options the chosen kernel was timed with ({} for xla)."""
    rows = [r for r in (load_table() if table is None else table).get(device_kind, [])
            if r["heads"] == heads and r["kv_rank"] == kv_rank]
    if not rows:
        return "xla", {}
    nearest = min(rows, key=lambda r: _distance(r, batch, context))
    times = {impl: ms for impl, ms in nearest["ms"].items()
             if impl in IMPLEMENTATIONS and impl not in exclude and ms is not None}
    impl = min(times, key=times.get) if "xla" in times else "xla"
    return impl, dict(nearest.get(f"{impl}_options") or {})
