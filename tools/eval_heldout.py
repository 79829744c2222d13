"""Held-out perplexity and top-1 agreement per text source of an X-EcoMLA run's latest checkpoint
(target deepseek_v3, which the checkpoint alone rebuilds), beside its teacher's, on the held-out
documents of the run's text mix, or of ``configs/x_ecomla.py``'s default mix for a run whose data
section names other keys (an earlier version's KJV-only runs): every run is measured on the same
held-out sources.

    python -m tools.eval_heldout --workdir RUN [--out FILE.json] [--batch 4]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections

from research.core import config as config_lib
from research.data.sources import default_cache_dir
from research.data.text import TextWindows, text_windows
from research.distill.evaluate import lm_metrics_by_source, top1_predictions
from research.models.pretrained import load_llama
from research.core.records import write_json_atomic
from tools.export_deepseek import restore_student, run_settings


def _run_mix(workdir: str) -> TextWindows:
    with open(os.path.join(workdir, "config.json")) as f:
        settings = ml_collections.ConfigDict(json.load(f))
    try:
        return config_lib.build(TextWindows, settings, "data")
    except (KeyError, TypeError, ValueError) as e:
        print(f"the run's data section does not build ({str(e).splitlines()[0]}); using the default mix")
        return TextWindows()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a run of experiments.x_ecomla with target deepseek_v3")
    parser.add_argument("--out", default="", help="write the figures here as JSON")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        exp = run_settings(args.workdir)
        student, _, step = restore_student(args.workdir)
    except (config_lib.ConfigError, config_lib.PathNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _, teacher, tokenizer = load_llama(exp.model, seed=exp.seed, default_cache_root=default_cache_dir())
    mix = text_windows(_run_mix(args.workdir), tokenizer)
    teacher_top1 = {name: top1_predictions(teacher, w, args.batch) for name, w in mix.heldout.items()}
    teacher_eval = lm_metrics_by_source(teacher, mix.heldout, args.batch)
    student_eval = lm_metrics_by_source(student, mix.heldout, args.batch, teacher_top1)
    result = {"workdir": args.workdir, "step": step, "sources": list(mix.names),
              "teacher": {n: m["ppl"] for n, m in teacher_eval["sources"].items()} | {"mean": teacher_eval["ppl"]},
              "student": {n: m["ppl"] for n, m in student_eval["sources"].items()} | {"mean": student_eval["ppl"]},
              "top1_agreement": {n: m["top1_agreement"] for n, m in student_eval["sources"].items()}
              | {"mean": student_eval["top1_agreement"]}}
    print(f"step {step} of {args.workdir}: held-out perplexity (vs the teacher), top-1 agreement")
    for name in [*mix.names, "mean"]:
        t, s = result["teacher"][name], result["student"][name]
        print(f"  {name:10s} {s:9.2f} ({100 * (s / t - 1):+.1f}% of {t:.2f})  {result['top1_agreement'][name]:.3f}")
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
