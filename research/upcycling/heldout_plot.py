"""heldout.png of an X-EcoMLA run: held-out perplexity per text source against KD steps (log scale),
one colour per source, the teacher's as a dashed line of the same colour.

Points: step 0 is the student KD starts from (after the layer-wise step when there is one), then
each time budget's read-off (``results["budgets"]``) or, without budgets, the end of KD.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from research.core import report


def heldout_series(results: Mapping) -> dict[str, list[tuple[int, float]]]:
    """{source: [(KD step, student perplexity)]} from a results.json."""
    by_source = results["by_source"]
    points = [(0, by_source["reconstructed"])]
    if results.get("budgets"):
        points += [(b["step"], b["sources"]) for b in results["budgets"]]
    else:
        points.append((results["steps"], by_source["kd"]))
    return {name: [(step, sources[name]["ppl"]) for step, sources in points] for name in by_source["teacher"]}


def plot_heldout(results: Mapping, path: str, order: Sequence[str] = (), title: str = "") -> None:
    series = heldout_series(results)
    names = [n for n in order if n in series] or sorted(series)
    fig, axes = report.figure(1, panel=(6.0, 4.0))
    ax = axes[0][0]
    for i, name in enumerate(names):
        colour = f"C{i}"
        steps, ppl = zip(*series[name])
        ax.plot(steps, ppl, marker="o", color=colour, label=name)
        ax.axhline(results["by_source"]["teacher"][name]["ppl"], color=colour, linestyle="--", linewidth=1)
    ax.set(xlabel="KD step", ylabel="held-out perplexity (teacher dashed)", yscale="log", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    report.save(fig, path)
