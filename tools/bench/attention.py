"""MLA attention kernels against the XLA reference: decode in device time and bandwidth, prefill in TFLOP/s.

    python -m tools.bench.attention [--batches 1,8,32,128] [--contexts 1024,4096,16384,65536]
                                    [--heads 16] [--kv-rank 512] [--rope-dim 64] [--repeats 10]
                                    [--prefill-lengths 2048,4096,8192] [--out FILE.json]
                                    [--kernel-options block_t=32,num_warps=8] [--tune]
                                    [--write-dispatch FILE.json]

One decode step (one query per sequence, every sequence at the full context) of DeepSeek-shaped
MLA in bfloat16: H query heads, a latent cache of r_kv + d_r numbers per token. Each row times, in
the same run and on the same inputs, on the device (CUPTI, ``tools/bench/device_time.py``; the
wall clock on a CPU, where the kernels are emulated and the figures say nothing of speed):
  xla         ``research.attention.ops.mla_absorbed_attention`` (every kernel XLA launches for it);
  triton      the Pallas Triton kernel (``research.kernels.mla_decode``): the kernel alone and
              with its log-sum-exp combine;
  mosaic_gpu  the Pallas Mosaic GPU kernel (``research.kernels.mla_decode_mgpu``), on a GPU;
  read        a plain reduction over c_kv and k_pe: the bandwidth the device really gives for these
              bytes, the measured roofline.
GB/s counts the bytes of c_kv + k_pe once; each kernel's row gives its % of the measured roofline
and its ratio to XLA (kernel + combine against XLA's total).

``--kernel-options`` passes launch settings to the Triton kernel (block_t, block_h, num_splits,
num_warps, num_stages). ``--tune`` times every launch ``tune_grid`` holds (those the static report,
``tools/bench/kernel_report.py``, accepted for this shape) on each (B, S), fastest first, and skips
the prefill rows. ``--write-dispatch FILE`` writes the grid's times for this device kind into a
dispatch table (``research.kernels.dispatch``; other device kinds in FILE are kept).

Prefill rows time MLA's naive path (d_qk = 192, d_v = 128, H heads, causal, batch 1) forward and
forward + backward: ``research.attention.ops.mla_attention`` (xla) against tokamax's kernel
(``research.kernels.prefill``), in TFLOP/s of the causal half (4 T^2 H (d_qk + d_v) / 2 forward,
2.5x that for the backward).
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from research.attention.ops import mla_absorbed_attention
from research.kernels.mla_decode import DEFAULT_LAUNCH, block_dims, mla_decode, occupancy_key, occupancy_keys
from research.kernels.mla_decode_tpu import mla_decode_tpu
from tools.bench.device_time import device_ms, sets_for
from tools.bench.kernel_report import GRID
from tools.bench.kv_decode import median_seconds, write_rows

def tune_grid(heads: int, kv_rank: int, rope_dim: int, dtype: str = "bfloat16", block_h: int = 64) -> list[tuple]:
    """(block_t, num_warps, num_stages) of every launch the static report accepted at this shape
    (it fits the shared memory, spills nothing and keeps a tile in flight), the default first."""
    accepted = occupancy_keys()
    dims = block_dims(heads, kv_rank, rope_dim, block_h)
    default = tuple(DEFAULT_LAUNCH[k] for k in ("block_t", "num_warps", "num_stages"))
    grid = [launch for launch in GRID if occupancy_key(*launch, *dims, dtype) in accepted]
    return sorted(grid, key=lambda launch: launch != default)


def decode_kernels(backend: str) -> dict:
    """{name: (decode function, kernel-name fragment for CUPTI)} of the kernels that run on ``backend``."""
    if backend == "tpu":
        return {"mosaic_tpu": (mla_decode_tpu, "mla_decode_tpu")}
    if backend != "gpu":
        return {"triton": (lambda *a, **k: mla_decode(*a, interpret=True, **k), "dense_kernel")}
    kernels = {"triton": (mla_decode, "dense_kernel")}
    try:
        from research.kernels.mla_decode_mgpu import mla_decode_mgpu
        kernels["mosaic_gpu"] = (mla_decode_mgpu, "mla_decode_mgpu")
    except ImportError:
        pass
    return kernels


def parse_options(text: str) -> dict[str, int]:
    """'block_t=128,num_warps=8' -> {'block_t': 128, 'num_warps': 8}; '' -> {}."""
    allowed = ("block_t", "block_h", "num_splits", "num_warps", "num_stages")
    options = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in allowed or not value.isdigit():
            raise ValueError(f"--kernel-options: '{item}' is not KEY=INT with KEY one of {', '.join(allowed)}")
        options[key] = int(value)
    return options


def decode_inputs(batch, context, heads, kv_rank, rope_dim, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(batch, heads, kv_rank), (batch, heads, rope_dim), (batch, context, kv_rank), (batch, context, 1, rope_dim)]
    return (*(jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes)), jnp.full((batch,), context, jnp.int32))


def decode_row(batch: int, context: int, heads: int, kv_rank: int, rope_dim: int, repeats: int,
               dtype=jnp.bfloat16, options: dict | None = None, only: tuple[str, ...] | None = None,
               reuse: dict | None = None) -> dict:
    """One (B, S) cell: XLA, the read roofline and each kernel (``only``: a subset of them; the
    Triton kernel with launch ``options``) on the same inputs. ``reuse`` holds times already
    measured on this cell (the tuning loop times XLA and the roofline once)."""
    options, reuse = options or {}, reuse or {}
    nbytes = batch * context * (kv_rank + rope_dim) * jnp.dtype(dtype).itemsize
    sets = sets_for(nbytes) if jax.default_backend() == "gpu" else 1  # rotation defeats a GPU's L2
    arg_sets = [decode_inputs(batch, context, heads, kv_rank, rope_dim, dtype, seed) for seed in range(sets)]
    scale = (128 + rope_dim) ** -0.5  # DeepSeek-V2: d_n 128 + d_r 64

    def xla(q_lat, q_pe, c_kv, k_pe, lengths):
        return mla_absorbed_attention(q_lat[:, None], q_pe[:, None], c_kv, k_pe, (lengths - 1)[:, None], scale=scale)[:, 0]

    def read(q_lat, q_pe, c_kv, k_pe, lengths):
        return jnp.sum(c_kv, dtype=jnp.float32) + jnp.sum(k_pe, dtype=jnp.float32)

    row = {"batch": batch, "context": context, "heads": heads, "kv_rank": kv_rank, "rope_dim": rope_dim,
           "dtype": jnp.dtype(dtype).name, "kernel_options": options, "gigabytes": nbytes / 1e9,
           "input_sets": len(arg_sets)}
    want = jax.jit(xla)(*arg_sets[0]).astype(jnp.float32)
    for name, fn, fragment in (("xla", xla, None), ("read", read, None)):
        row.update(reuse.get(name) or _timed(name, fn, arg_sets, repeats, fragment, nbytes))
    for name, (kernel, fragment) in decode_kernels(jax.default_backend()).items():
        if only and name not in only:
            continue
        fn = lambda *a, kernel=kernel: kernel(*a, scale=scale, **(options if name == "triton" else {}))
        try:
            row[f"{name}_max_abs_error"] = float(jnp.abs(jax.jit(fn)(*arg_sets[0]).astype(jnp.float32) - want).max())
            row.update(_timed(name, fn, arg_sets, repeats, fragment, nbytes))
        except Exception as e:  # noqa: BLE001 -- one kernel's failure is recorded, the others still run
            if only:
                raise  # tuning reports a failed launch itself
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        row[f"{name}_vs_xla"] = row["xla_ms"] / row[f"{name}_ms"]
        row[f"{name}_pct_roofline"] = 100 * row["read_ms"] / row[f"{name}_ms"]
    return row


def _timed(name, fn, arg_sets, repeats, fragment, nbytes) -> dict:
    t = device_ms(fn, arg_sets, repeats, kernel=fragment)
    out = {f"{name}_ms": t["total_ms"], f"{name}_gb_per_s": nbytes / 1e6 / t["total_ms"], "timer": t["timer"],
           f"{name}_launches": t["launches"]}
    if t["kernel_ms"] is not None:
        out[f"{name}_kernel_ms"] = t["kernel_ms"]
        out[f"{name}_kernel_gb_per_s"] = nbytes / 1e6 / t["kernel_ms"] if t["kernel_ms"] else None
    return out


def best_launch(path: str) -> tuple[dict, str]:
    """(the launch of a ``--tune`` run's rows, JSON at ``path``, with the least Triton time summed
    over the cells where it ran, a line saying where it came from); ({}, why) -- the kernel's
    defaults -- when the file is missing, unreadable or has no launch timed on every cell (a
    tuning step that timed out must not stop the grid)."""
    try:
        with open(path) as f:
            rows = [r for r in json.load(f) if "triton_ms" in r]
    except (OSError, ValueError) as e:
        return {}, f"the default launch: cannot read {path} ({type(e).__name__})"
    cells = {(r["batch"], r["context"]) for r in rows}
    totals: dict[tuple, list[float]] = {}
    for r in rows:
        totals.setdefault(tuple(sorted(r["kernel_options"].items())), []).append(r["triton_ms"])
    complete = {launch: sum(ms) for launch, ms in totals.items() if len(ms) == len(cells)}
    if not complete:
        return {}, f"the default launch: {path} holds no launch timed on every cell"
    launch = dict(min(complete, key=complete.get))
    return launch, f"{launch}, the fastest over the {len(cells)} cells of {path}"


def tune_rows(batch: int, context: int, heads: int, kv_rank: int, rope_dim: int, repeats: int) -> list[dict]:
    """decode_row of the Triton kernel for every launch of ``tune_grid``, fastest first; a launch
    that fails to compile or run gives a row with its error instead of times."""
    rows, reuse = [], {}
    for block_t, num_warps, num_stages in tune_grid(heads, kv_rank, rope_dim):
        options = {"block_t": block_t, "num_warps": num_warps, "num_stages": num_stages}
        try:
            row = decode_row(batch, context, heads, kv_rank, rope_dim, repeats, options=options, only=("triton",),
                             reuse=reuse)
        except Exception as e:  # noqa: BLE001 -- one launch's failure is a row
            rows.append({"batch": batch, "context": context, "kernel_options": options,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
            continue
        reuse = {name: {k: row[k] for k in row if k.startswith(name + "_") or k == "timer"} for name in ("xla", "read")}
        rows.append(row)
    return sorted(rows, key=lambda r: r.get("triton_ms", float("inf")))


def write_dispatch(rows: list[dict], path: str, device: str) -> dict:
    """Merges this device kind's decode rows into the dispatch table at ``path`` (atomically)."""
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)["devices"]
    cell = lambda r: (r["batch"], r["context"], r["heads"], r["kv_rank"])
    measured = {cell(r): {"batch": r["batch"], "context": r["context"], "heads": r["heads"], "kv_rank": r["kv_rank"],
                          "ms": {name: r.get(f"{name}_ms") for name in ("xla", "triton", "mosaic_gpu")},
                          "triton_options": r.get("kernel_options") or {}}
                for r in rows if "xla_ms" in r and r.get("timer") == "cupti"}
    if measured:  # wall-clock figures (a CPU) never enter the table; other cells of this device are kept
        table[device] = sorted({**{cell(r): r for r in table.get(device, [])}, **measured}.values(), key=cell)
    document = {"about": "device time (CUPTI) of absorbed MLA decode per implementation and cell, bfloat16, "
                         "d_r 64; written by python -m tools.bench.attention --write-dispatch", "devices": table}
    with open(path + ".tmp", "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return document


def prefill_row(length: int, heads: int, repeats: int, qk_dim: int = 192, v_dim: int = 128, rope_dim: int = 64,
                dtype=jnp.bfloat16) -> dict:
    from research.attention.ops import mla_attention
    from research.kernels import prefill

    keys = jax.random.split(jax.random.key(0), 5)
    nope = qk_dim - rope_dim
    shapes = [(1, length, heads, nope), (1, length, heads, rope_dim), (1, length, heads, nope),
              (1, length, 1, rope_dim), (1, length, heads, v_dim)]
    args = [jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes)]
    positions = jnp.arange(length)[None]
    reason = prefill.unavailable_reason()
    impls = {"xla": mla_attention}
    if reason is None:
        impls["tokamax"] = prefill.mla_attention
    forward_flops = 4 * length * length * heads * (qk_dim + v_dim) / 2
    row = {"length": length, "heads": heads, "qk_dim": qk_dim, "v_dim": v_dim, "kernel": "tokamax" if reason is None
           else f"none ({reason})"}
    for name, fn in impls.items():
        forward = jax.jit(lambda *a, fn=fn: fn(*a, positions, scale=qk_dim ** -0.5))
        grad = jax.jit(jax.grad(lambda *a, fn=fn: fn(*a, positions, scale=qk_dim ** -0.5).astype(jnp.float32).sum(),
                                argnums=range(5)))
        row[f"{name}_forward_tflops"] = forward_flops / median_seconds(lambda: forward(*args), repeats) / 1e12
        row[f"{name}_backward_tflops"] = 3.5 * forward_flops / median_seconds(lambda: grad(*args), repeats) / 1e12
    return row


def format_prefill_row(row: dict) -> str:
    text = (f"prefill T={row['length']:6d} H={row['heads']}: xla forward {row['xla_forward_tflops']:.3f} TFLOP/s, "
            f"forward+backward {row['xla_backward_tflops']:.3f} TFLOP/s")
    if "tokamax_forward_tflops" in row:
        text += (f" | tokamax {row['tokamax_forward_tflops']:.3f} / {row['tokamax_backward_tflops']:.3f} TFLOP/s "
                 f"({row['tokamax_forward_tflops'] / row['xla_forward_tflops']:.2f}x / "
                 f"{row['tokamax_backward_tflops'] / row['xla_backward_tflops']:.2f}x)")
    return text + f" | kernel: {row['kernel']}"


def format_row(row: dict) -> str:
    text = (f"B={row['batch']:4d} S={row['context']:6d} H={row['heads']} [{row['timer']}] | read {row['read_gb_per_s']:7.0f} GB/s "
            f"| xla {row['xla_ms']:8.3f} ms {row['xla_gb_per_s']:7.0f} GB/s")
    for name in ("triton", "mosaic_gpu", "mosaic_tpu"):
        if f"{name}_ms" in row:
            kernel = f" (kernel {row[f'{name}_kernel_ms']:.3f})" if row.get(f"{name}_kernel_ms") else ""
            text += (f" | {name} {row[f'{name}_ms']:8.3f} ms{kernel} {row[f'{name}_gb_per_s']:7.0f} GB/s "
                     f"{row[f'{name}_pct_roofline']:4.0f}% of read, {row[f'{name}_vs_xla']:.2f}x xla, "
                     f"max |diff| {row[f'{name}_max_abs_error']:.1e}")
    return text


def parser() -> argparse.ArgumentParser:
    """The command line (its defaults depend on the backend: small sizes on a CPU)."""
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,4" if on_cpu else "1,8,32,128")
    parser.add_argument("--contexts", default="256,1024" if on_cpu else "1024,4096,16384,65536")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-rank", type=int, default=512)
    parser.add_argument("--rope-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3 if on_cpu else 10)
    parser.add_argument("--prefill-lengths", default="256" if on_cpu else "2048,4096,8192", help="'' to skip")
    parser.add_argument("--out", default="")
    parser.add_argument("--kernel-options", default="", help="decode kernel launch settings, e.g. block_t=128,num_warps=8")
    parser.add_argument("--kernel-options-from", default="",
                        help="a --tune run's JSON: use the launch with the least Triton time summed over its cells")
    parser.add_argument("--tune", action="store_true", help="time every launch of tune_grid on each (B, S)")
    parser.add_argument("--write-dispatch", default="", help="write the grid's device times into this dispatch table")
    return parser


def main(argv=None) -> list[dict]:
    on_cpu = jax.default_backend() == "cpu"
    command_line = parser()
    args = command_line.parse_args(argv)
    try:
        options = parse_options(args.kernel_options)
        if args.kernel_options_from:
            tuned, source = best_launch(args.kernel_options_from)
            print(f"Triton launch: {source}", flush=True)
            options = {**tuned, **options}
    except ValueError as e:
        command_line.error(str(e))
    if args.write_dispatch and args.tune:
        command_line.error("--write-dispatch records a grid at one launch per kernel; run it without --tune")
    device = jax.devices()[0].device_kind
    print(f"{device}: absorbed MLA decode, H={args.heads}, r_kv={args.kv_rank}, d_r={args.rope_dim}, bfloat16"
          + (" -- CPU: the kernel is emulated (interpret mode) and timed by the wall clock; these are not kernel "
             "speeds" if on_cpu else ""), flush=True)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            if args.tune:
                for row in tune_rows(batch, context, args.heads, args.kv_rank, args.rope_dim, args.repeats):
                    rows.append({**row, "device": device})
                    print(format_row(row) + f" | {row['kernel_options']}" if "error" not in row
                          else f"B={batch} S={context} {row['kernel_options']}: {row['error']}", flush=True)
                write_rows(rows, args.out)  # after every cell: a step killed by its time limit keeps them
                continue
            row = decode_row(batch, context, args.heads, args.kv_rank, args.rope_dim, args.repeats, options=options)
            row["device"] = device
            rows.append(row)
            print(format_row(row), flush=True)
            write_rows(rows, args.out)
    for length in (int(n) for n in args.prefill_lengths.split(",") if n and not args.tune):
        row = prefill_row(length, args.heads, args.repeats)
        row["device"] = device
        rows.append(row)
        print(format_prefill_row(row), flush=True)
    if args.write_dispatch:
        written = write_dispatch([r for r in rows if "xla_ms" in r], args.write_dispatch, device)
        print(f"wrote {len(written['devices'].get(device, []))} {device} cells to {args.write_dispatch}", flush=True)
    return write_rows(rows, args.out)


if __name__ == "__main__":
    main()
