"""MLA attention kernels against the XLA reference: decode in achieved bandwidth, prefill in TFLOP/s.

    python -m tools.bench.attention [--batches 1,8,32,128] [--contexts 1024,4096,16384,65536]
                                    [--heads 16] [--kv-rank 512] [--rope-dim 64] [--repeats 10]
                                    [--prefill-lengths 2048,4096,8192] [--out FILE.json]
                                    [--kernel-options block_t=128,num_warps=8] [--tune]

One decode step (one query per sequence, every sequence at the full context) of DeepSeek-shaped
MLA in bfloat16: H query heads, a latent cache of r_kv + d_r numbers per token. Each row times
(median of ``--repeats`` after compilation) ``research.attention.ops.mla_absorbed_attention``
(xla) and the Pallas kernel (``research.kernels``: Triton on a GPU, Mosaic on a TPU) in the same
run, and reports GB/s = bytes of c_kv + k_pe read once / time, and the kernel's speed-up.

``--kernel-options`` passes launch settings to the decode kernel (block_t, block_h, num_splits,
num_warps, num_stages). ``--tune`` times every combination of TUNE_GRID on each (B, S) instead of the
defaults and prints them fastest first (a setting the compiler rejects is reported, not fatal); it
skips the prefill rows.

Prefill rows time MLA's naive path (d_qk = 192, d_v = 128, H heads, causal, batch 1) forward and
forward + backward: ``research.attention.ops.mla_attention`` (xla) against tokamax's kernel
(``research.kernels.prefill``), in TFLOP/s of the causal half (4 T^2 H (d_qk + d_v) / 2 forward,
2.5x that for the backward).

On a CPU there is no kernel to time: the kernel runs in interpret mode (its grid emulated by XLA:CPU
loops), at small default sizes, and the table says so. Those figures check that the benchmark runs
and agrees with the reference; they say nothing about the kernel's speed on a GPU or TPU.
"""
from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp

from research.attention.ops import mla_absorbed_attention
from research.kernels.mla_decode import mla_decode
from research.kernels.mla_decode_tpu import mla_decode_tpu
from tools.bench.kv_decode import median_seconds, write_rows


def kernel_for_backend(backend: str):
    """(decode function, label): the kernel that runs on ``backend``; interpret mode off GPU / TPU."""
    if backend == "tpu":
        return mla_decode_tpu, "pallas-mosaic-tpu"
    if backend == "gpu":
        return mla_decode, "pallas-triton"
    return (lambda *a, **k: mla_decode(*a, interpret=True, **k)), "pallas-interpret (CPU emulation)"


TUNE_GRID = {"block_t": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)}


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


def decode_row(batch: int, context: int, heads: int, kv_rank: int, rope_dim: int, repeats: int,
               dtype=jnp.bfloat16, seed: int = 0, options: dict | None = None,
               xla_ms: float | None = None) -> dict:
    """One (B, S) cell: XLA and the kernel (with launch ``options``) on the same inputs. ``xla_ms``
    reuses an XLA time already measured on this cell (the tuning loop times XLA once)."""
    options = options or {}
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(batch, heads, kv_rank), (batch, heads, rope_dim), (batch, context, kv_rank), (batch, context, 1, rope_dim)]
    q_lat, q_pe, c_kv, k_pe = (jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes))
    lengths = jnp.full((batch,), context, jnp.int32)
    scale = (128 + rope_dim) ** -0.5  # DeepSeek-V2: d_n 128 + d_r 64
    xla = jax.jit(lambda *a: mla_absorbed_attention(a[0][:, None], a[1][:, None], a[2], a[3],
                                                    (a[4] - 1)[:, None], scale=scale)[:, 0])
    kernel, label = kernel_for_backend(jax.default_backend())
    args = (q_lat, q_pe, c_kv, k_pe, lengths)
    error = float(jnp.abs(kernel(*args, scale=scale, **options).astype(jnp.float32)
                          - xla(*args).astype(jnp.float32)).max())
    gigabytes = batch * context * (kv_rank + rope_dim) * jnp.dtype(dtype).itemsize / 1e9
    row = {"batch": batch, "context": context, "heads": heads, "kv_rank": kv_rank, "rope_dim": rope_dim,
           "dtype": jnp.dtype(dtype).name, "kernel": label, "kernel_options": options, "max_abs_error": error}
    for name, fn in (("xla", lambda: xla(*args)), ("pallas", lambda: kernel(*args, scale=scale, **options))):
        seconds = xla_ms / 1e3 if name == "xla" and xla_ms is not None else median_seconds(fn, repeats)
        row[f"{name}_ms"] = 1e3 * seconds
        row[f"{name}_gb_per_s"] = gigabytes / seconds
    row["speedup"] = row["xla_ms"] / row["pallas_ms"]
    return row


def tune_rows(batch: int, context: int, heads: int, kv_rank: int, rope_dim: int, repeats: int) -> list[dict]:
    """decode_row for every combination of TUNE_GRID, fastest kernel first; a combination that fails
    to compile or run gives a row with its error instead of times."""
    rows, xla_ms = [], None
    for values in itertools.product(*TUNE_GRID.values()):
        options = dict(zip(TUNE_GRID, values))
        try:
            rows.append(decode_row(batch, context, heads, kv_rank, rope_dim, repeats, options=options, xla_ms=xla_ms))
            xla_ms = rows[-1]["xla_ms"]
        except Exception as e:  # noqa: BLE001 -- e.g. a tile past the GPU's shared memory
            rows.append({"batch": batch, "context": context, "kernel_options": options,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
    return sorted(rows, key=lambda r: r.get("pallas_ms", float("inf")))


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
    return (f"B={row['batch']:4d} S={row['context']:6d} H={row['heads']}: xla {row['xla_ms']:9.3f} ms "
            f"{row['xla_gb_per_s']:8.1f} GB/s | {row['kernel']} {row['pallas_ms']:9.3f} ms "
            f"{row['pallas_gb_per_s']:8.1f} GB/s | speed-up {row['speedup']:.2f}x | max |diff| {row['max_abs_error']:.1e}")


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
    parser.add_argument("--tune", action="store_true", help="time every TUNE_GRID combination on each (B, S)")
    return parser


def main(argv=None) -> list[dict]:
    on_cpu = jax.default_backend() == "cpu"
    command_line = parser()
    args = command_line.parse_args(argv)
    try:
        options = parse_options(args.kernel_options)
    except ValueError as e:
        command_line.error(str(e))
    device = jax.devices()[0].device_kind
    print(f"{device}: absorbed MLA decode, H={args.heads}, r_kv={args.kv_rank}, d_r={args.rope_dim}, bfloat16"
          + (" -- CPU: the kernel is emulated (interpret mode); these are not kernel speeds" if on_cpu else ""),
          flush=True)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            if args.tune:
                for row in tune_rows(batch, context, args.heads, args.kv_rank, args.rope_dim, args.repeats):
                    rows.append({**row, "device": device})
                    print(format_row(row) + f" | {row['kernel_options']}" if "error" not in row
                          else f"B={batch} S={context} {row['kernel_options']}: {row['error']}", flush=True)
                continue
            row = decode_row(batch, context, args.heads, args.kv_rank, args.rope_dim, args.repeats, options=options)
            row["device"] = device
            rows.append(row)
            print(format_row(row), flush=True)
    for length in (int(n) for n in args.prefill_lengths.split(",") if n and not args.tune):
        row = prefill_row(length, args.heads, args.repeats)
        row["device"] = device
        rows.append(row)
        print(format_prefill_row(row), flush=True)
    return write_rows(rows, args.out)


if __name__ == "__main__":
    main()
