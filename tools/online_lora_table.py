"""The Online-LoRA table of a seed sweep (``configs/online_lora.py:cifar10_160``'s get_sweep): per
method, each figure as mean ± sample sd over the seeds that finished it, then Online-LoRA against each
other method without replay, across seeds (in units of the larger sd) and within each seed (paired:
both methods saw the same stream).

    python -m tools.online_lora_table runs/online_lora_c10_160          # prints it; DIR/online_lora_table.md
    python -m tools.online_lora_table DIR --versus online_lora_batches  # the official buffer against the rest

A seed is a folder ``DIR/*/`` with the experiment's ``methods/METHOD.json`` records, which are written
as each method finishes, so a sweep that is still running already has rows; a seed's results.json
adds the nearest-class-mean accuracy of the pre-trained features (``ncm_backbone``).

Columns besides the experiment's own: *learning acc* is the mean over tasks j of the class-incremental
accuracy on task j right after its own segment, a_{j,j} (Riemer et al., ICLR 2019, "learning
accuracy"): low values with a high task-incremental accuracy mean the head had not yet come to
prefer a task's classes when its segment ended. *lr* is the Adam learning rate each record was run
at (from its signature: chosen on the held-out slice, or configured). A sweep run with
``eval.auc_every`` (the Si-Blurry stream) adds A_auc and A_last, and the comparison gives each of
the average accuracy, A_auc and A_last, and the paired difference in forgetting.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from research.adapters.online_stream import LABELS, METHODS, lr_key

NO_REPLAY = ("online_lora", "online_lora_batches", "lora", "sequential_ft", "online_ewc")
COLUMNS = (("avg acc", "avg_acc"), ("forgetting", "forgetting"), ("learning acc", "learning_acc"),
           ("task-IL acc", "avg_acc_task_il"), ("task-IL forgetting", "forgetting_task_il"), ("NCM acc", "ncm_acc"),
           ("A_auc", "a_auc"), ("A_last", "a_last"))
COUNTS = (("lr", "lr"), ("plateaus", "plateaus"), ("train s", "seconds"))  # not percentages
HEADLINE = (("avg acc", "avg_acc"), ("A_auc", "a_auc"), ("A_last", "a_last"))


def figures(method: str, record: dict) -> dict[str, float]:
    """The table's figures of one method's record (accuracies as fractions)."""
    result = record["result"]
    out = {key: float(result[key]) for _, key in COLUMNS if key in result}
    out["learning_acc"] = float(np.mean(np.diag(np.asarray(result["task_end_accs"], np.float64))))
    out["plateaus"], out["seconds"] = float(result["n_plateaus"]), float(result["seconds"])
    section, name = lr_key(method).split(".")
    if name in record["signature"].get(section, {}):
        out["lr"] = float(record["signature"][section][name])
    return out


def cell(key: str, x: list[float]) -> str:
    if not x:
        return ""
    if key == "lr":  # a choice, not a measurement: the values themselves
        return "/".join(f"{v:g}" for v in sorted(set(x)))
    scale, digits = (1, 0) if key == "seconds" else (1, 1) if key == "plateaus" else (100, 2)
    return f"{scale * np.mean(x):.{digits}f} ± {scale * sd(x):.{digits}f}"


def load(sweep_dir: str) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {seed folder: figures}}, methods in the experiment's order."""
    paths = sorted(glob.glob(os.path.join(sweep_dir, "*", "methods", "*.json")))
    if not paths:
        raise FileNotFoundError(f"no DIR/*/methods/*.json under {sweep_dir!r}")
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for path in paths:
        method = os.path.splitext(os.path.basename(path))[0]
        seed = os.path.basename(os.path.dirname(os.path.dirname(path)))
        with open(path) as f:
            runs.setdefault(method, {})[seed] = figures(method, json.load(f))
    return {m: runs[m] for m in METHODS if m in runs}


def sd(x) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def table(runs: dict[str, dict[str, dict[str, float]]], versus: str = "online_lora") -> str:
    """Per-method rows, then ``versus`` minus each other method without replay."""
    def present(key: str) -> bool:
        return any(key in f for seeds in runs.values() for f in seeds.values())

    columns = [(name, key) for name, key in COLUMNS + COUNTS if present(key)]
    lines = ["Mean ± sd over seeds (%; n = seeds that finished the method)", "",
             "| method | n | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for method, seeds in runs.items():
        cells = [cell(key, [f[key] for f in seeds.values() if key in f]) for _, key in columns]
        lines.append(f"| {LABELS[method]} | {len(seeds)} | " + " | ".join(cells) + " |")
    if versus in runs:
        headline = [(name, key) for name, key in HEADLINE if present(key)]
        label = LABELS[versus]
        lines += ["", f"{label} minus each method without replay (points): across seeds (difference of means, "
                  "in units of the larger sd), within seeds (mean ± sd of the paired differences) and the seeds "
                  f"where {label} is ahead; forgetting within seeds (negative: {label} forgets less)", "",
                  "| method | " + " | ".join(f"{name} across | {name} within | ahead" for name, _ in headline)
                  + " | forgetting within |", "|---" * (3 * len(headline) + 2) + "|"]
        ours = runs[versus]
        for method in [m for m in NO_REPLAY if m in runs and m != versus]:
            common = sorted(set(ours) & set(runs[method]))
            cells = []
            for _, key in headline + [("forgetting", "forgetting")]:
                a = [f[key] for f in ours.values() if key in f]
                b = [f[key] for f in runs[method].values() if key in f]
                paired = [100 * (ours[s][key] - runs[method][s][key]) for s in common
                          if key in ours[s] and key in runs[method][s]]
                within = f"{np.mean(paired):+.2f} ± {sd(paired):.2f}" if paired else ""
                if key == "forgetting":
                    cells.append(within)
                    continue
                spread = max(sd(a), sd(b))
                diff = 100 * (np.mean(a) - np.mean(b)) if a and b else float("nan")
                across = f"{diff:+.2f} ({diff / (100 * spread):+.1f} sd)" if spread > 0 else f"{diff:+.2f}"
                cells += [across, within, f"{sum(p > 0 for p in paired)}/{len(paired)}"]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", help="the sweep's --workdir (DIR/*/methods/*.json)")
    p.add_argument("--versus", choices=NO_REPLAY,
                   help="the method compared with each other method without replay (default: online_lora)")
    args = p.parse_args(argv)
    try:
        runs = load(args.sweep_dir)
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        sys.exit(f"error: {e}")
    if args.versus and args.versus not in runs:
        sys.exit(f"error: --versus {args.versus}: no {args.sweep_dir}/*/methods/{args.versus}.json")
    text = table(runs, args.versus or "online_lora")
    bound = []
    for path in sorted(glob.glob(os.path.join(args.sweep_dir, "*", "results.json"))):
        with open(path) as f:
            bound.append(json.load(f)["ncm_backbone"])
    if bound:  # the experiment's results.json: the pre-trained features before any training
        text += (f"\n\nNearest-class-mean accuracy of the pre-trained features: {100 * np.mean(bound):.2f} ± "
                 f"{100 * sd(bound):.2f}% over {len(bound)} seeds")
    with open(os.path.join(args.sweep_dir, "online_lora_table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
