"""One table of a sweep: every point's overrides and the numbers of its results.json, as CSV and
markdown, a plot of one metric against one config field, and a TensorBoard hparams summary.

    python -m tools.collect runs/sweep                                   # DIR/collect.csv, collect.md, tensorboard/
    python -m tools.collect runs/sweep --x optim.lr --y test_accuracy --group model.name --logx
    python -m tools.collect runs/sweep --metrics 'test_*' wall_time_s    # only these columns
    tensorboard --logdir runs/sweep/tensorboard                          # HPARAMS tab: one row per point

A point is a folder ``DIR/NNN`` with ``point.json`` (its overrides; written by tools/sweep) and
``results.json``; points without results are listed with their state (failed / not run) and no
numbers. Metric columns are the numeric leaves of results.json as dotted paths (``mesh.data``),
chosen with shell-style patterns. The plot draws one line per value of ``--group``, points in
the order of ``--x``, to DIR/collect_<y>.png.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import glob
import json
import os
import sys
import time
from typing import Any


def flatten(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON tree as {dotted path: value} (booleans are not numbers here)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[:-1]] = float(tree)
    return out


def load(sweep_dir: str) -> list[dict]:
    """[{"point", "state", "overrides", "metrics"}] for every DIR/NNN, in folder order."""
    if not os.path.isdir(sweep_dir):
        raise FileNotFoundError(f"sweep folder {sweep_dir!r} does not exist")
    rows = []
    for run_dir in sorted(d for d in glob.glob(os.path.join(sweep_dir, "*")) if os.path.isdir(d)):
        point_file, results_file = os.path.join(run_dir, "point.json"), os.path.join(run_dir, "results.json")
        if not (os.path.exists(point_file) or os.path.exists(results_file)):
            continue  # not a point (tensorboard/, ...)
        overrides = json.load(open(point_file))["overrides"] if os.path.exists(point_file) else {}
        metrics, state = {}, "not run"
        if os.path.exists(results_file):
            metrics, state = flatten(json.load(open(results_file))), "done"
        elif os.path.exists(os.path.join(run_dir, "sweep.log")):
            state = "failed or running"
        rows.append({"point": os.path.basename(run_dir), "state": state, "overrides": overrides, "metrics": metrics})
    if not rows:
        raise FileNotFoundError(f"no points (NNN/point.json or NNN/results.json) under {sweep_dir!r}")
    return rows


def columns(rows: list[dict], patterns: list[str] | None) -> tuple[list[str], list[str]]:
    """(override fields, metric paths) in first-seen order; metrics filtered by ``patterns``."""
    fields, metrics = [], []
    for row in rows:
        fields += [k for k in row["overrides"] if k not in fields]
        metrics += [k for k in row["metrics"] if k not in metrics]
    if patterns:
        chosen = [m for m in metrics if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(m, p) for m in metrics)]
        if unmatched:
            raise KeyError(f"no point's results.json has a number matching {', '.join(map(repr, unmatched))}")
        metrics = chosen
    return fields, metrics


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def table(rows: list[dict], fields: list[str], metrics: list[str]) -> list[list[str]]:
    header = ["point", "state", *fields, *metrics]
    body = [[row["point"], row["state"], *(_cell(row["overrides"].get(f)) for f in fields),
             *(_cell(row["metrics"].get(m)) for m in metrics)] for row in rows]
    return [header, *body]


def markdown(cells: list[list[str]]) -> str:
    header, *body = cells
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]) + "\n"


def _value(row: dict, key: str):
    if key in row["overrides"]:
        return row["overrides"][key]
    if key in row["metrics"]:
        return row["metrics"][key]
    return None


def plot(rows: list[dict], x: str, y: str, group: str | None, path: str, logx: bool = False) -> None:
    """``y`` against ``x`` (an override or a metric), one line per value of ``group``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "done"]
    for key in (x, y) + ((group,) if group else ()):
        if not any(_value(r, key) is not None for r in done):
            raise KeyError(f"{key!r} is neither an override nor a metric of any finished point")
    lines: dict[str, list[tuple]] = {}
    for r in done:
        if _value(r, x) is not None and _value(r, y) is not None:
            lines.setdefault(_cell(_value(r, group)) if group else y, []).append((_value(r, x), _value(r, y)))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, xy in sorted(lines.items()):
        xy.sort(key=lambda t: t[0])
        ax.plot([str(a) if isinstance(a, str) else a for a, _ in xy], [b for _, b in xy], marker="o",
                label=f"{group}={label}" if group else label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{y} over {len(done)} points", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _hparam_value(value: Any) -> bool | float | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return _cell(value)


def tensorboard_hparams(rows: list[dict], fields: list[str], metrics: list[str], logdir: str) -> None:
    """The HPARAMS tab of TensorBoard: the experiment (fields, metrics) at ``logdir`` and one run
    ``logdir/NNN`` per finished point with its hyperparameters and final metrics."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    def write(folder: str, plugin_values: list[tuple[str, plugin_data_pb2.HParamsPluginData]],
              scalars: dict | None = None) -> None:
        writer = EventFileWriter(folder)
        values = [summary_pb2.Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data),
                                            tensor=metadata.NULL_TENSOR) for tag, data in plugin_values]
        values += [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in (scalars or {}).items()]
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary_pb2.Summary(value=values)))
        writer.close()

    done = [r for r in rows if r["state"] == "done"]
    infos = []
    for f in fields:
        values = [_hparam_value(r["overrides"][f]) for r in done if f in r["overrides"]]
        kind = (api_pb2.DATA_TYPE_BOOL if values and all(isinstance(v, bool) for v in values) else
                api_pb2.DATA_TYPE_FLOAT64 if values and all(isinstance(v, float) for v in values) else
                api_pb2.DATA_TYPE_STRING)
        infos.append(api_pb2.HParamInfo(name=f, type=kind))
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in metrics])
    os.makedirs(logdir, exist_ok=True)
    write(logdir, [(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))])
    for r in done:
        start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for f in fields:
            if f not in r["overrides"]:
                continue
            v = _hparam_value(r["overrides"][f])
            if isinstance(v, bool):
                start.hparams[f].bool_value = v
            elif isinstance(v, float):
                start.hparams[f].number_value = v
            else:
                start.hparams[f].string_value = v
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
        write(os.path.join(logdir, r["point"]),
              [(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
               (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))],
              {m: r["metrics"][m] for m in metrics if m in r["metrics"]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir")
    p.add_argument("--metrics", nargs="*", default=None, help="patterns of metric paths (default: every number)")
    p.add_argument("--x", default="", help="the config field (or metric) on the plot's x axis")
    p.add_argument("--y", default="", help="the metric on the plot's y axis")
    p.add_argument("--group", default="", help="one line per value of this field")
    p.add_argument("--logx", action="store_true")
    p.add_argument("--no_tensorboard", action="store_true")
    args = p.parse_args(argv)
    if bool(args.x) != bool(args.y):
        p.error("--x and --y go together")
    try:
        rows = load(args.sweep_dir)
        fields, metrics = columns(rows, args.metrics)
        cells = table(rows, fields, metrics)
        with open(os.path.join(args.sweep_dir, "collect.csv"), "w", newline="") as f:
            csv.writer(f).writerows(cells)
        text = markdown(cells)
        with open(os.path.join(args.sweep_dir, "collect.md"), "w") as f:
            f.write(text)
        print(text, end="")
        if args.x:
            path = os.path.join(args.sweep_dir, f"collect_{args.y.replace('/', '_')}.png")
            plot(rows, args.x, args.y, args.group or None, path, args.logx)
            print(f"plot: {path}")
        if not args.no_tensorboard:
            tensorboard_hparams(rows, fields, metrics, os.path.join(args.sweep_dir, "tensorboard"))
    except (FileNotFoundError, KeyError) as e:
        sys.exit(f"error: {e.args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
