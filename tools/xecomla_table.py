"""Markdown tables of X-EcoMLA runs' held-out perplexity per text source, against the teacher's:
one row per evaluation point (initialisation, after the layer-wise step, each KD budget, final).

    python -m tools.xecomla_table runs/x_ecomla_mix [runs/x_ecomla_kjv ...] [--out table.md]

Reads each run's results.json (and its budgets); a cell is perplexity (relative to the teacher's on
that source) / top-1 agreement with the teacher.
"""
from __future__ import annotations

import argparse
import json
import os


def _cell(ppl: float, teacher: float, agreement: float | None) -> str:
    text = f"{ppl:,.2f} ({100 * (ppl / teacher - 1):+.0f}%)"
    return text if agreement is None else f"{text} / {agreement:.3f}"


def run_rows(workdir: str) -> tuple[list[str], list[list[str]]]:
    """(source names, rows) of one run: [label, cell per source, mean cell, KD tokens]."""
    if not os.path.isfile(os.path.join(workdir, "results.json")):
        budgets = os.path.join(workdir, "budgets.json")
        raise SystemExit(f"error: {workdir} has no results.json (the run did not finish)"
                         + (f"; the KD budgets it reached are in {budgets}" if os.path.isfile(budgets) else ""))
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    by_source = results["by_source"]
    with open(os.path.join(workdir, "config.json")) as f:  # the mix's order (results.json sorts its keys)
        order = json.load(f).get("data", {}).get("sources", [])
    names = [n for n in order if n in by_source["teacher"]] or sorted(by_source["teacher"])
    teacher = {n: by_source["teacher"][n]["ppl"] for n in names}
    teacher["mean"] = results["ppl_teacher"]

    def row(label, sources, mean, agreement, tokens=""):
        cells = [_cell(sources[n]["ppl"], teacher[n], sources[n].get("top1_agreement")) for n in names]
        return [label, *cells, _cell(mean, teacher["mean"], agreement), f"{tokens:,}" if tokens != "" else ""]

    rows = [["teacher", *(f"{teacher[n]:.2f}" for n in names), f"{teacher['mean']:.2f}", ""],
            row("initialisation", by_source["init"], results["ppl_student_init"], results["top1_agreement_init"])]
    if results.get("reconstruct_s"):
        rows.append(row(f"layer-wise step ({results['reconstruct_s'] / 60:.1f} min)", by_source["reconstructed"],
                        results["ppl_student_reconstructed"], results["top1_agreement_reconstructed"]))
    for budget in results.get("budgets", []):
        rows.append(row(f"{budget['minutes']:.0f} min of KD (step {budget['step']})", budget["sources"],
                        budget["ppl"], budget["top1_agreement"], budget["tokens"]))
    if not results.get("budgets"):
        rows.append(row(f"after KD (step {results['steps']})", by_source["kd"], results["ppl_student_kd"],
                        results["top1_agreement_kd"], results["train_tokens"]))
    return names, rows


def table(workdir: str) -> str:
    names, rows = run_rows(workdir)
    head = ["point", *names, "mean", "KD tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    text = "\n\n".join(f"{w}\n\n{table(w)}" for w in args.workdirs)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
