"""Every figure that needs an accelerator, in runs that each write one JSON (a run: under 8 minutes).

    python -m tools.bench.gpu_check --out gpu_check.json            # on a GPU (or TPU) machine
    python -m tools.bench.gpu_check --only train_step,proxies --out more.json
    python -m tools.bench.gpu_check --dry-run --out dry.json         # anywhere: tiny sizes, CPU

Steps, each a subprocess with its own time limit, so that one failure or hang costs only itself.
The default run is the decode kernel's (targets: >= 3.0 TB/s on an H200, >= 2.3 on an H100, at
B >= 32, S >= 16k, and >= 1.7x XLA there; the whole SmolLM2-MLA step >= 1.3x XLA at B 32, S 16k):
  kernel_tests   ``pytest tests/kernels`` on the device: the Pallas kernels compiled for it, not
                 interpreted (the tests interpret only off the kernel's platform);
  decode_tune    every Triton launch the static report accepted (``tools.bench.attention --tune``)
                 on B 32, 128 x S 16k, 64k, in device time, fastest first;
  attention      the decode grid, B {1, 8, 32, 128} x S {1k, 4k, 16k, 64k}: XLA, the Triton kernel
                 at the launch fastest in decode_tune, the Mosaic GPU kernel and the measured read
                 roofline, in device time; writes the dispatch table ``mla_decode_dispatch.json``
                 (copy it to research/kernels/ to commit it);
  attention_smollm2  the same at SmolLM2-MLA's shape (H 9, r_kv 56, d_r 4), B 8, 32 x S 8k-32k, into
                 the same dispatch table;
  model_decode   ``tools.bench.kv_decode --pallas --dtype bfloat16``: a whole SmolLM2-shaped decode
                 step, GQA vs MLA-absorbed on XLA vs on the kernel, B 8 at S 8k, 32k, B 32 at S 8k,
                 16k, 32k.
Named with ``--only`` (not in the default run):
  train_step     ``tools.bench.train_step``: ResNet-20 training, ours vs PyTorch on the same device;
  proxies        ``tools.bench.proxies``: vmapped masked NB201 scoring vs one cell at a time, and the
                 wall time of all 15,625 cells.
``--dry-run`` runs the same steps at tiny sizes on the CPU, so that CI keeps the script working.
What the GPU machine lacks (ml_collections; tokamax and its import-time dependencies) travels as
wheels: ``tools/bench/gpu_wheels.sh`` downloads them and says how to install them there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# The limits add up to 480 s (8 minutes); every step writes its rows as it measures them.
FULL = {
    "kernel_tests": (["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"], 90),
    "decode_tune": (["-m", "tools.bench.attention", "--tune", "--batches", "32,128", "--contexts", "16384,65536",
                     "--repeats", "5", "--out", "{tmp}/decode_tune.json"], 110),
    "attention": (["-m", "tools.bench.attention", "--kernel-options-from", "{tmp}/decode_tune.json",
                   "--prefill-lengths", "", "--write-dispatch", "{tmp}/mla_decode_dispatch.json",
                   "--out", "{tmp}/attention.json"], 100),
    # SmolLM2-MLA at 6.4x (r_kv 56, one RoPE key of 4): the shape auto meets in this project's own model
    "attention_smollm2": (["-m", "tools.bench.attention", "--batches", "8,32", "--contexts", "8192,16384,32768",
                           "--heads", "9", "--kv-rank", "56", "--rope-dim", "4", "--prefill-lengths", "",
                           "--write-dispatch", "{tmp}/mla_decode_dispatch.json",
                           "--out", "{tmp}/attention_smollm2.json"], 60),
    "model_decode_b8": (["-m", "tools.bench.kv_decode", "--pallas", "--dtype", "bfloat16", "--batch", "8",
                         "--contexts", "8192,32768", "--repeats", "5", "--out", "{tmp}/model_decode_b8.json"], 50),
    "model_decode_b32": (["-m", "tools.bench.kv_decode", "--pallas", "--dtype", "bfloat16", "--batch", "32",
                          "--contexts", "8192,16384,32768", "--repeats", "5", "--out", "{tmp}/model_decode_b32.json"], 70),
}
DRY = {
    "kernel_tests": (["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "-k", "combine or split_choice"], 120),
    "decode_tune": (["-m", "tools.bench.attention", "--tune", "--batches", "1", "--contexts", "64", "--heads", "16",
                     "--kv-rank", "512", "--rope-dim", "64", "--repeats", "1", "--out", "{tmp}/decode_tune.json"], 300),
    "attention": (["-m", "tools.bench.attention", "--batches", "1", "--contexts", "64", "--heads", "16",
                   "--kv-rank", "512", "--rope-dim", "64", "--repeats", "1", "--prefill-lengths", "",
                   "--kernel-options-from", "{tmp}/decode_tune.json", "--write-dispatch", "{tmp}/mla_decode_dispatch.json",
                   "--out", "{tmp}/attention.json"], 120),
    "attention_smollm2": (["-m", "tools.bench.attention", "--batches", "1", "--contexts", "64", "--heads", "9",
                           "--kv-rank", "56", "--rope-dim", "4", "--repeats", "1", "--prefill-lengths", "",
                           "--write-dispatch", "{tmp}/mla_decode_dispatch.json", "--out", "{tmp}/attention_smollm2.json"],
                          120),
    "model_decode_b8": (["-m", "tools.bench.kv_decode", "--pallas", "--tiny", "--dtype", "bfloat16", "--batch", "2",
                         "--contexts", "32", "--layers", "1", "--kv-rank", "8",
                         "--repeats", "1", "--out", "{tmp}/model_decode_b8.json"], 120),
}
# Run only when named in --only.
OPTIONAL = {
    "train_step": (["-m", "tools.bench.train_step", "--rounds", "3"], 45),
    "proxies": (["-m", "tools.bench.proxies", "--proxy", "zico", "--cells", "32", "--chunk", "32", "--all", "--no-primitives",
                 "--out", "{tmp}/proxies.json"], 160),
}
DRY_OPTIONAL = {
    "train_step": (["-m", "tools.bench.train_step", "--batch", "4", "--steps", "1", "--rounds", "1", "--threads", "1"], 120),
    "proxies": (["-m", "tools.bench.proxies", "--proxy", "naswot", "--cells", "2", "--chunk", "2", "--width", "2", "--no-primitives",
                 "--cells-per-stage", "1", "--images", "2", "--out", "{tmp}/proxies.json"], 120),
}


def run_step(name: str, argv: list[str], limit: int, tmp: str, env: dict) -> dict:
    """Runs one step; returns its status, seconds, output tail and the JSON it wrote (if any)."""
    argv = [a.replace("{tmp}", tmp) for a in argv]
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=limit, env=env)
        status, output = ("ok" if done.returncode == 0 else f"exit {done.returncode}"), done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout or b""  # bytes even with text=True (a subprocess quirk)
        status, output = f"timeout after {limit} s", partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    # The whole output is kept: a step that fails late has printed its earlier rows.
    result = {"status": status, "seconds": round(time.perf_counter() - start, 1), "output": output,
              "output_tail": "\n".join(output.strip().splitlines()[-25:])}
    written = os.path.join(tmp, f"{name}.json")
    if os.path.exists(written):
        with open(written) as f:
            result["result"] = json.load(f)
    print(f"[{name}] {status} in {result['seconds']} s", flush=True)
    print(result["output_tail"], flush=True)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--only", default="", help="comma-separated step names, run in that order (default: all)")
    args = parser.parse_args(argv)
    steps = DRY if args.dry_run else FULL
    if args.only:
        named = {**steps, **(DRY_OPTIONAL if args.dry_run else OPTIONAL)}
        unknown = set(args.only.split(",")) - set(named)
        if unknown:
            parser.error(f"unknown steps {sorted(unknown)}; choose from {', '.join(named)}")
        steps = {k: named[k] for k in args.only.split(",")}  # in the order given
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.pop("JAX_PLATFORMS", None)  # tests/conftest.py defaults to cpu; let JAX find the device
        env["RESEARCH_TEST_PLATFORM"] = "device"
    tmp = os.path.abspath(os.path.splitext(args.out)[0] + "_parts")
    os.makedirs(tmp, exist_ok=True)
    report = {"dry_run": args.dry_run, "python": sys.version.split()[0], "steps": {}}
    for name, (step_argv, limit) in steps.items():
        report["steps"][name] = run_step(name, step_argv, limit, tmp, env)
        with open(args.out, "w") as f:  # written after every step: a killed run keeps what it had
            json.dump(report, f, indent=1)
    failed = [n for n, r in report["steps"].items() if r["status"] != "ok"]
    print(f"wrote {args.out}: {len(report['steps']) - len(failed)} of {len(report['steps'])} steps ok"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return report


if __name__ == "__main__":
    main()
