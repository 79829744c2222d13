"""Held-out perplexity of X-EcoMLA students before distillation, one row per variant: at
initialisation and, with ``reconstruct.steps > 0``, after layer-wise reconstruction.

    python -m tools.upcycle_init --variant "rope_key=shared" --variant "rope_key=shared_fit" \\
        --variant "rope_key=shared_fit reconstruct.steps=200" \\
        [--config configs/x_ecomla.py[:PRESET]] [--out runs/upcycle_init]

Each ``--variant`` is a space-separated list of overrides: a bare key is in the config's
``upcycle`` section (``kv_rank=1000000`` is a full-rank latent), ``reconstruct.KEY`` in its
``reconstruct`` section. The teacher, the calibration windows and the held-out windows are the
experiment's; the teacher is loaded and evaluated once. Prints perplexity and top-1 agreement with
the teacher per variant; writes OUT/upcycle_init.json and OUT/upcycle_init.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from research.upcycling.reconstruct import ReconstructConfig, reconstruct_layers
from research.upcycling.upcycle import UpcycleConfig, upcycle_gqa_to_mla
from research.core import config as config_lib
from research.data.sources import default_cache_dir
from research.data.text import TextWindows, text_windows
from research.distill.evaluate import lm_metrics_by_source, top1_predictions
from research.models.pretrained import LlamaSource, load_llama


def parse_variant(text: str) -> dict[str, str]:
    pairs = [item.partition("=") for item in text.split()]
    bad = [key for key, eq, _ in pairs if not eq]
    if bad:
        raise config_lib.ConfigError(f"--variant items must be key=value, got {bad} in {text!r}")
    return {key if "." in key else f"upcycle.{key}": value for key, _, value in pairs}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/x_ecomla.py")
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    base = config_lib.load_config(args.config)
    configs = [config_lib.apply_overrides(base, parse_variant(v), from_strings=True) for v in args.variant or [""]]
    upcycles = [config_lib.build(UpcycleConfig, c, "upcycle") for c in configs]  # every variant checked first
    layerwise = [config_lib.build(ReconstructConfig, c, "reconstruct") for c in configs]

    _, teacher, tokenizer = load_llama(config_lib.build(LlamaSource, base, "model"),
                                       default_cache_root=default_cache_dir())
    data = config_lib.build(TextWindows, base, "data")
    mix = text_windows(data, tokenizer)
    calibration = mix.train[mix.spread(data.calibration_windows, base.seed), :-1]
    teacher_top1 = {name: top1_predictions(teacher, w, args.batch) for name, w in mix.heldout.items()}
    teacher_ppl = lm_metrics_by_source(teacher, mix.heldout, args.batch)["ppl"]
    print(f"teacher: mean held-out perplexity over {', '.join(mix.names)} {teacher_ppl:.3f} "
          f"({data.eval_windows} windows of {data.seq_len} tokens each)", flush=True)
    rows = []
    for text, upcycle, reconstruct in zip(args.variant or ["(config)"], upcycles, layerwise):
        start = time.perf_counter()
        student, report = upcycle_gqa_to_mla(teacher, upcycle, calibration)
        if reconstruct.steps:
            fitting = mix.train[mix.spread(reconstruct.windows, base.seed + 1), :-1]
            reconstruct_layers(teacher, student, fitting, reconstruct, progress=False)
        seconds = time.perf_counter() - start
        metrics = lm_metrics_by_source(student, mix.heldout, args.batch, teacher_top1)
        rows.append({"variant": text, "kv_values_per_token": report["kv_values_per_token"],
                     "kv_ratio": report["kv_values_per_token"] / teacher.kv_values_per_token(),
                     "ppl": metrics["ppl"], "top1_agreement": metrics["top1_agreement"],
                     "teacher_ppl": teacher_ppl, "upcycle_s": seconds})
        print(f"{text:60s} KV {report['kv_values_per_token']:6d} ({100 * rows[-1]['kv_ratio']:5.1f}%)  "
              f"ppl {metrics['ppl']:10.2f}  top-1 {metrics['top1_agreement']:.3f}  ({seconds:.0f} s)", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "upcycle_init.json"), "w") as f:
            json.dump(rows, f, indent=2)
        with open(os.path.join(args.out, "upcycle_init.md"), "w") as f:
            f.write(f"| variant | KV values per token | perplexity at init (teacher {teacher_ppl:.2f}) | top-1 agreement |\n"
                    "|---|---|---|---|\n")
            f.writelines(f"| {r['variant']} | {r['kv_values_per_token']:,} ({100 * r['kv_ratio']:.1f}%) | "
                         f"{r['ppl']:,.2f} | {r['top1_agreement']:.3f} |\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
