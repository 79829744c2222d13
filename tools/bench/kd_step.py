"""Tokens per second of X-EcoMLA's distillation step, by what is trained and in which dtype.

    python -m tools.bench.kd_step [--batch 4] [--seq 128] [--repeats 3] [--tiny] [--out FILE.json]

The student is SmolLM2-135M upcycled at 6.4x (configs/x_ecomla.py's default); the teacher is the
original model. One jitted KD step (teacher forward, student forward and backward, AdamW) is timed
per variant (median of ``--repeats`` after the step that compiles):
  all_fp32         every parameter trained, float32 compute (the experiment's default)
  attention_fp32   only the attention layers trained (MLP, norms, embeddings frozen)
  all_bf16 / attention_bf16   the same with bfloat16 compute (parameters stay float32)
Ratios are tokens/s over all_fp32's, measured in the same run. ``--tiny`` runs a 2-layer random
model (seconds; for tests of the script, not a speed).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import optax
from flax import nnx

from research.upcycling.upcycle import UpcycleConfig, upcycle_gqa_to_mla
from research.core.train import create_train_state
from research.data.sources import default_cache_dir
from research.distill import DistillConfig, make_kd_train_step
from research.models.pretrained import LlamaSource, load_llama

VARIANTS = {"all_fp32": ("all", "float32"), "attention_fp32": ("attention", "float32"),
            "all_bf16": ("all", "bfloat16"), "attention_bf16": ("attention", "bfloat16")}


def time_variant(trainable: str, dtype: str, batch: np.ndarray, repeats: int, tiny: bool) -> float:
    """Median seconds of one KD step."""
    source = LlamaSource(source="random" if tiny else "gguf", dtype=dtype)
    _, teacher, _ = load_llama(source, default_cache_root=default_cache_dir())
    upcycle = UpcycleConfig(kv_rank=8 if tiny else 56, rope_dim=4, rope_mode="high")
    student, _ = upcycle_gqa_to_mla(teacher, upcycle)
    tx = optax.adamw(1e-4, weight_decay=0.0)
    defs, state = create_train_state(student, tx, DistillConfig(trainable=trainable).trainable_filter())
    teacher_graphdef, teacher_state = nnx.split(teacher)
    step = jax.jit(make_kd_train_step(defs, tx, teacher_graphdef), donate_argnums=0)
    data = {"inputs": batch[:, :-1], "labels": batch[:, 1:], "mask": np.ones(batch[:, 1:].shape, np.float32)}
    state, _ = jax.block_until_ready(step(state, teacher_state, data))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(step(state, teacher_state, data))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    tokens = args.batch * args.seq
    batch = np.random.default_rng(0).integers(0, 1000, (args.batch, args.seq + 1)).astype(np.int32)
    rows = {}
    for name in names:
        seconds = time_variant(*VARIANTS[name], batch, args.repeats, args.tiny)
        rows[name] = {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds}
        base = rows.get(names[0])
        print(f"{name:16s} {seconds:8.3f} s/step  {tokens / seconds:8.1f} tokens/s  "
              f"{base['seconds_per_step'] / seconds:5.2f}x {names[0]}", flush=True)
    result = {"batch": args.batch, "seq": args.seq, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
              "variants": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
