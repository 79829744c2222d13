"""How the generative unlearning benchmark's results read: seed summaries, the markdown tables, the
trade-off and t-SNE figures.

``results`` is what ``experiments/generative_unlearning.py`` writes to results.json: ``rows`` ->
row name -> {method, alpha, retain, metrics {view: {set: {metric: {mean, sd}}}}, seconds, per_seed}.
The methods are compared at matched retain FID (``MATCHED_RETAIN``), not at one alpha, whose meaning
differs between objectives.
"""
from __future__ import annotations

import numpy as np

from research.core import report

METRICS = ("fid", "is", "cosine")
MATCHED_RETAIN = (1.05, 1.10)  # retain FID / original's at which the methods' forget FID is compared


def summarize(per_seed: list[dict]) -> dict:
    """{mask: {set: {metric: {"mean", "sd"}}}} over the seeds' metric dicts (`report.mean_sd`)."""
    first = per_seed[0]
    return {kind: {name: {m: dict(zip(("mean", "sd"), report.mean_sd(s[kind][name][m] for s in per_seed)))
                          for m in METRICS} for name in first[kind]} for kind in first}


def table_md(results: dict) -> str:
    lines = []
    for kind in results["masks"]:
        lines += [f"### {kind} mask", "",
                  "| method | retain FID | retain IS | retain cos | forget FID | forget IS | forget cos | forget FID / original | retain FID / original | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        orig = results["rows"]["original"]["metrics"][kind]
        for name, row in results["rows"].items():
            m = row["metrics"][kind]
            cell = lambda s, k: f"{m[s][k]['mean']:.2f} ± {m[s][k]['sd']:.2f}" if k == "fid" else \
                f"{m[s][k]['mean']:.3f} ± {m[s][k]['sd']:.3f}"
            ratio = lambda s: m[s]["fid"]["mean"] / max(orig[s]["fid"]["mean"], 1e-12)
            lines.append(f"| {name} | {cell('retain', 'fid')} | {cell('retain', 'is')} | {cell('retain', 'cosine')} | "
                         f"{cell('forget', 'fid')} | {cell('forget', 'is')} | {cell('forget', 'cosine')} | "
                         f"{ratio('forget'):.2f} | {ratio('retain'):.2f} | {row['seconds']:.0f} |")
        lines.append("")
        matched = results["matched"][kind]
        lines += ["forget FID / original's, read at the alpha where retain FID / original's is "
                  + " and ".join(f"{at:g}" for at in MATCHED_RETAIN) + " (seeds that reach it):", "",
                  "| method | " + " | ".join(f"at retain {at:g}" for at in MATCHED_RETAIN) + " |",
                  "|---|" + "---|" * len(MATCHED_RETAIN)]
        for label in matched[f"{MATCHED_RETAIN[0]:g}"]:
            cells = [matched[f"{at:g}"][label] for at in MATCHED_RETAIN]
            lines.append(f"| {label} | " + " | ".join(
                f"{c['mean']:.2f} ± {c['sd']:.2f} ({c['seeds']})" if c["seeds"] else "not reached" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def fid_ratios(results: dict, kind: str) -> dict[str, dict[str, np.ndarray]]:
    """{row: {"retain", "forget": FID / the original's FID, per seed}} under mask ``kind``."""
    orig = results["rows"]["original"]["per_seed"]
    return {name: {s: np.array([seed[kind][s]["fid"] / max(o[kind][s]["fid"], 1e-12)
                                for seed, o in zip(row["per_seed"], orig, strict=True)]) for s in ("retain", "forget")}
            for name, row in results["rows"].items() if name != "original"}


def families(results: dict) -> dict[str, list[str]]:
    """{method (", proxy retain" for the proxy rows): its row names in order of alpha}, the original and
    the target rows aside."""
    out: dict[str, list[str]] = {}
    for name, row in results["rows"].items():
        if name != "original" and row["retain"] != "target":
            out.setdefault(row["method"] + (", proxy retain" if row["retain"] == "proxy" else ""), []).append(name)
    return {k: sorted(v, key=lambda n: results["rows"][n]["alpha"]) for k, v in out.items()}


def matched_forget_ratio(results: dict, kind: str, at: float) -> dict[str, dict[str, float]]:
    """Each method's forget FID / original's at the alpha where its retain FID / original's is ``at``:
    per seed, the piecewise-linear curve through the method's alphas (ordered by retain ratio) read
    at ``at``; mean and sd over the seeds that reach it (no extrapolation; if none does, None). The
    methods are then compared at one cost to the retain set, not at one alpha, whose meaning differs
    between objectives."""
    ratios = fid_ratios(results, kind)
    out = {}
    for label, names in families(results).items():
        per_seed = []
        for seed in range(len(ratios[names[0]]["retain"])):
            x = np.array([ratios[n]["retain"][seed] for n in names])
            y = np.array([ratios[n]["forget"][seed] for n in names])
            order = np.argsort(x)
            if x[order[0]] <= at <= x[order[-1]]:
                per_seed.append(float(np.interp(at, x[order], y[order])))
        mean, sd = report.mean_sd(per_seed) if per_seed else (None, None)
        out[label] = {"mean": mean, "sd": sd, "seeds": len(per_seed)}
    return out


def tradeoff_plot(path: str, results: dict, kind: str) -> None:
    """Forget FID against retain FID, both over the original's (mean and sd over seeds): one curve per
    method over its alphas, and the target region (forget >= 2x, retain within 10%) shaded."""
    ratios = fid_ratios(results, kind)
    fig, axes = report.figure(panel=(6.5, 4.5))
    ax = axes[0, 0]
    for label, names in families(results).items():
        retain = [report.mean_sd(ratios[n]["retain"]) for n in names]
        forget = [report.mean_sd(ratios[n]["forget"]) for n in names]
        x, y = [m for m, _ in retain], [m for m, _ in forget]
        ax.errorbar(x, y, xerr=[sd for _, sd in retain], yerr=[sd for _, sd in forget], marker="o", ms=4, capsize=2,
                    label=label)
        for n, xi, yi in zip(names, x, y):
            ax.annotate(f"{results['rows'][n]['alpha']:g}", (xi, yi), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.fill_between([min(ax.get_xlim()[0], 1.0), 1.1], 2.0, max(ax.get_ylim()[1], 2.1), color="tab:green",
                    alpha=0.12, label="target")
    for at in MATCHED_RETAIN:  # where results.md compares the methods
        ax.axvline(at, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="retain FID / original's (lower is better)", ylabel="forget FID / original's (higher is better)",
           title=f"{results['data']}, {kind} mask: the trade-off of each method over alpha")
    ax.legend(fontsize=7)
    report.save(fig, path)


def tsne_plot(path: str, features: dict[str, dict[str, np.ndarray]], seed: int) -> None:
    """2-D t-SNE of the generated images' features, one colour per (row, set)."""
    from sklearn.manifold import TSNE

    labels, chunks = [], []
    for row, sets in features.items():
        for name, f in sets.items():
            chunks.append(f)
            labels += [f"{row}: {name}"] * len(f)
    stacked = np.concatenate(chunks)
    xy = TSNE(2, perplexity=min(30, len(stacked) - 1), random_state=seed, init="pca").fit_transform(stacked)
    labels = np.asarray(labels)
    fig, axes = report.figure(panel=(6.5, 5))
    ax = axes[0, 0]
    for name in dict.fromkeys(labels):
        sel = labels == name
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, alpha=0.6, label=name)
    ax.set(title="t-SNE of EfficientNet-Lite0 features of generated images", xticks=[], yticks=[])
    ax.legend(fontsize=7)
    report.save(fig, path)
