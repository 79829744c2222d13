"""What every experiment reports: seed means and spreads, markdown tables, figures.

A stochastic result is run over seeds and reported as mean and spread: ``mean_sd(values)`` gives
the mean and the sample standard deviation (ddof 1, 0 for a single seed), ``merge_seeds`` does it
for the metrics of a list of per-seed rows, and ``cell`` prints "mean ± sd". Tables are GitHub
markdown (``table``). Figures are made with ``figure`` (matplotlib's Agg backend, so no display is
needed) and written with ``save``, atomically like every other file of a run.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from research.core.records import write_bytes_atomic


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of ``values``; sd 0 for a single value."""
    values = np.asarray(list(values), np.float64)
    if values.size == 0:
        raise ValueError("mean_sd of no values")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def merge_seeds(rows: Sequence[Mapping], keys: Iterable[str]) -> dict:
    """One row from per-seed ``rows`` (dicts with the same keys): the first row's entries, and for each
    of ``keys`` the mean over the seeds, beside it ``KEY_sd`` (`mean_sd`) and ``KEY_values`` (per seed)."""
    merged = dict(rows[0])
    for key in keys:
        values = [float(row[key]) for row in rows]
        mean, sd = mean_sd(values)
        merged.update({key: mean, f"{key}_sd": sd, f"{key}_values": values})
    return merged


def cell(mean: float, sd: float | None = None, digits: int = 2) -> str:
    """"1.23 ± 0.45", or "1.23" without a spread (``sd`` None or 0)."""
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd else f"{mean:.{digits}f}"


def table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """A markdown table's lines: the header, the rule, one line per row (cells as given, str())."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def figure(columns: int = 1, rows: int = 1, panel: tuple[float, float] = (6.0, 4.0)):
    """(fig, axes) with ``axes`` a (rows, columns) array, each panel ``panel`` inches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, columns, figsize=(panel[0] * columns, panel[1] * rows), squeeze=False)


def save(fig, path: str, dpi: int = 110) -> None:
    """``fig`` as a PNG at ``path``, written atomically, and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def bars(ax, names: Sequence[str], means: Sequence[float], sds: Sequence[float] | None = None,
         points: Sequence[Sequence[float]] | None = None, highlight: Iterable[str] = ()) -> None:
    """One bar per name at its mean, the seeds' sd as error bars and each seed's value as a dot;
    the names in ``highlight`` in orange."""
    x = np.arange(len(names))
    marked = set(highlight)
    ax.bar(x, means, yerr=sds, capsize=3, color=["tab:orange" if n in marked else "tab:blue" for n in names])
    for i, values in enumerate(points or []):
        ax.plot([i] * len(values), values, "k.", ms=4)
    ax.set_xticks(x, names, rotation=60)


def curves(history: Mapping[str, Sequence[tuple[int, float]]], path: str, title: str = "") -> None:
    """A PNG at ``path`` with a panel per metric family of ``history`` ({name: [(step, value)]}):
    loss, accuracy, learning rate, perplexity (log scale), agreement."""
    families = {"loss": [k for k in history if "loss" in k],
                "accuracy": [k for k in history if "accuracy" in k],
                "learning rate": [k for k in history if k.endswith("lr")],
                "perplexity": [k for k in history if "ppl" in k],
                "agreement": [k for k in history if "agreement" in k]}
    families = {k: v for k, v in families.items() if v}
    if not families:
        return
    fig, axes = figure(len(families), panel=(5.0, 3.6))
    for ax, (family, keys) in zip(axes[0], families.items()):
        for key in sorted(keys):
            steps, values = zip(*history[key])
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set(xlabel="step", title=family, yscale="log" if family == "perplexity" else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save(fig, path)
