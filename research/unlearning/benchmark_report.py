"""How the unlearning benchmark's results read: the markdown tables and the two figures.

``summary`` is what ``experiments/unlearning.py`` writes to results.json (or one seed's, in
seed_<s>/results.json): ``scenarios`` -> scenario -> ``methods`` -> method -> row, each row with the
metrics of REPORTED and ``gap_to_retrain`` (and their ``_sd`` / ``_values`` over seeds).
"""
from __future__ import annotations

from research.core import report

REPORTED = ("retain_acc", "forget_acc", "test_acc", "mia")


def _cell(row: dict, key: str, digits: int = 2) -> str:
    return report.cell(row[key], row.get(f"{key}_sd"), digits)


def results_table(summary: dict) -> str:
    """Markdown: one table per scenario (mean ± sd over the seeds when there are several)."""
    seeds = summary.get("seeds", [summary.get("seed")])
    lines = []
    for scenario, block in summary["scenarios"].items():
        lines += [f"\n**{scenario}** ({block['n_retain']} retain, {block['n_forget']} forget, {block['n_test']} test; "
                  f"{summary['num_params']:,} parameters in the subset; seeds {', '.join(map(str, seeds))})\n"]
        lines += report.table(["method", "retain acc", "forget acc", "test acc", "MIA", "gap to retrain", "seconds"],
                              [[method, *(_cell(r, k) for k in (*REPORTED, "gap_to_retrain")), _cell(r, "seconds", 1)]
                               for method, r in block["methods"].items()])
        ratio = summary.get("ntk_seconds_over_retrain_seconds", {}).get(scenario)
        if ratio is not None:
            lines += ["", f"NTK scrub seconds / retrain seconds (same recipe): {ratio:.2f}"]
        ntk_row = block["methods"].get("ntk", {})
        if ntk_row.get("info_sweep"):
            lines += ["", f"NTK scrub along its direction, w(D) + s dw (the scrub took s = {ntk_row['info_scale']:.2f}):", ""]
            lines += report.table(["s", "retain acc", "forget acc", "test acc", "MIA", "gap to retrain"],
                                  [[f"{p['scale']:g}", *(f"{p[k]:.2f}" for k in (*REPORTED, "gap_to_retrain"))]
                                   for p in ntk_row["info_sweep"]])
    return "\n".join(lines)


def plot_results(summary: dict, path: str) -> None:
    """Gap to retrain per method and scenario, bars at the mean with the seeds' sd as error bars and
    each seed as a dot: the figure a reader looks at first."""
    scenarios = list(summary["scenarios"])
    fig, axes = report.figure(len(scenarios), panel=(6, 3.8))
    for ax, scenario in zip(axes[0], scenarios):
        rows = summary["scenarios"][scenario]["methods"]
        names = [m for m in rows if m != "retrain"]
        report.bars(ax, names, [rows[m]["gap_to_retrain"] for m in names],
                    [rows[m].get("gap_to_retrain_sd", 0) for m in names],
                    [rows[m].get("gap_to_retrain_values", []) for m in names], highlight=("ntk",))
        ax.set_title(f"forget {scenario}: mean |gap| to retrain (points), {len(summary.get('seeds', [0]))} seed(s)")
    report.save(fig, path, dpi=100)


def plot_sweep(summary: dict, path: str) -> None:
    """Retain / forget / test accuracy and MIA at w(D) + s dw against s, one panel per scenario;
    dashed: retraining's values; dotted vertical: the scale the scrub took (``ntk.scale``)."""
    scenarios = [s for s, b in summary["scenarios"].items() if b["methods"].get("ntk", {}).get("info_sweep")]
    if not scenarios:
        return
    fig, axes = report.figure(len(scenarios), panel=(5.5, 3.6))
    for ax, scenario in zip(axes[0], scenarios):
        rows = summary["scenarios"][scenario]["methods"]
        sweep = rows["ntk"]["info_sweep"]
        for key, color in zip(REPORTED, ("tab:blue", "tab:red", "tab:green", "tab:purple")):
            ax.plot([p["scale"] for p in sweep], [p[key] for p in sweep], "o-", color=color, label=key)
            ax.axhline(rows["retrain"][key], color=color, ls="--", lw=0.8)
        ax.axvline(rows["ntk"]["info_scale"], color="k", ls=":", lw=1)
        ax.set(xlabel="s in w(D) + s dw", ylabel="%", title=f"forget {scenario}: dashed = retrain")
        ax.legend(fontsize=7)
    report.save(fig, path, dpi=100)
