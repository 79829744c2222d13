"""Runs the sweep a config file declares (``get_sweep(arg)``): each point its own run, with its own
workdir ``DIR/NNN``, on this machine, on a Ray cluster or on a TPU pod slice.

    python -m tools.sweep --experiment train_classifier --config configs/train_classifier.py:smoke --workdir runs/sweep --parallel 2
    python -m tools.sweep ... --backend ray                      # a local Ray instance
    python -m tools.sweep ... --backend ray --address auto       # a running cluster (ray start --head)
    python -m tools.sweep ... --backend tpu-pod --tpu_name NAME --zone ZONE --workdir gs://BUCKET/sweep --dry-run
    python -m tools.collect DIR --x optim.lr --y test_accuracy --group model.name

Every point is checked against the config before anything runs (``--set KEY=VALUE`` adds an
override to every point; ``--only 0,3`` picks points by index). A point whose ``results.json`` exists is skipped on every backend, so
running the same command again resumes a sweep: finished points stay, failed ones run again, and
one that was cut off resumes from its checkpoint. A failed point is reported with the end of its
log (``DIR/NNN/sweep.log``) and does not stop the others; the exit code is the number of points
that failed. A point stopped by SIGTERM with its checkpoint saved (exit 75: a preempted VM) is run
again at once and resumes, up to 3 times, on every backend. ``--processes N`` runs each point as N JAX processes (``jax.distributed``) on this
machine or on each Ray worker.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys

from research.core.config import ConfigError
from research.core.records import write_json_atomic
from tools.sweeps import local, points as points_lib, tpu_pod
from tools.sweeps.progress import Progress

BACKENDS = ("local", "ray", "tpu-pod")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="the module experiments/NAME.py")
    p.add_argument("--config", required=True, help="a config file with get_sweep, e.g. configs/train_classifier.py:smoke")
    p.add_argument("--workdir", required=True, help="the sweep's folder: one NNN/ per point")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every point")
    p.add_argument("--only", default="", metavar="I,J,...", help="run only these point indices (e.g. 0,1)")
    p.add_argument("--backend", choices=BACKENDS, default="local")
    p.add_argument("--processes", type=int, default=1, help="JAX processes per point (local and ray)")
    p.add_argument("--dry-run", "--print_commands", dest="dry_run", action="store_true",
                   help="print one shell command per point that is not done, and exit")
    g = p.add_argument_group("local")
    g.add_argument("--parallel", type=int, default=1, help="points at a time")
    g = p.add_argument_group("ray")
    g.add_argument("--address", default="", help="'auto' or ray://HOST:PORT; none starts a local instance")
    g.add_argument("--num_cpus", type=float, default=1, help="CPUs per point")
    g.add_argument("--num_gpus", type=float, default=0, help="GPUs per point")
    g.add_argument("--tpu_chips", type=float, default=0, help="the custom TPU resource per point")
    g.add_argument("--max_retries", type=int, default=3, help="re-runs of a point whose worker died")
    g.add_argument("--local_cpus", type=int, default=None, help="CPUs of a local instance (default: all)")
    g.add_argument("--ship_code", action="store_true", help="send this checkout to the workers (runtime_env)")
    g = p.add_argument_group("tpu-pod")
    g.add_argument("--tpu_name", default="", help="the TPU VM (gcloud) or the workload prefix (xpk)")
    g.add_argument("--zone", default="")
    g.add_argument("--project", default="")
    g.add_argument("--launcher", choices=("gcloud", "xpk"), default="gcloud")
    g.add_argument("--cluster", default="", help="xpk: the GKE cluster")
    g.add_argument("--tpu_type", default="", help="xpk: e.g. v5litepod-16")
    g.add_argument("--docker_image", default="", help="xpk: an image holding this checkout and its environment")
    g.add_argument("--remote_repo", default="research", help="the checkout on each worker")
    g.add_argument("--remote_python", default="python3")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of each worker")
    g.add_argument("--log_dir", default="", help="local logs of the launch commands (default runs/tpu_pod/NAME)")
    args = p.parse_args(argv)
    for name in ("parallel", "processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_retries < 0:
        p.error(f"--max_retries must be >= 0, got {args.max_retries}")
    return args


def key_values(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.removeprefix("config.")] = value
    return out


def make_points(args: argparse.Namespace) -> list[points_lib.Point]:
    if not os.path.exists(os.path.join("experiments", f"{args.experiment}.py")):
        known = sorted(f[:-3] for f in os.listdir("experiments") if f.endswith(".py") and not f.startswith("_"))
        raise ConfigError(f"--experiment {args.experiment!r}: no experiments/{args.experiment}.py; one of {', '.join(known)}")
    points = points_lib.make_points(args.experiment, args.config, args.workdir, key_values(args.set, "--set"))
    if not args.only:
        return points
    try:
        chosen = [int(i) for i in args.only.split(",")]
    except ValueError:
        raise ConfigError(f"--only {args.only!r}: expected point indices such as 0,1") from None
    bad = [i for i in chosen if not 0 <= i < len(points)]
    if bad:
        raise ConfigError(f"--only: no point {bad[0]}; the sweep has points 0..{len(points) - 1}")
    return [points[i] for i in chosen]


def pod_target(args: argparse.Namespace) -> tpu_pod.PodTarget:
    return tpu_pod.PodTarget(name=args.tpu_name, zone=args.zone, project=args.project, launcher=args.launcher,
                             cluster=args.cluster, tpu_type=args.tpu_type, docker_image=args.docker_image,
                             repo=args.remote_repo, python=args.remote_python,
                             env=tuple(key_values(args.env, "--env").items()))


def run(args: argparse.Namespace, points: list[points_lib.Point]) -> list:
    if args.backend == "local":
        return local.run(points, parallel=args.parallel, processes=args.processes)
    if args.backend == "ray":
        from tools.sweeps import ray_engine

        return ray_engine.run(points, address=args.address or None, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                              tpu=args.tpu_chips, max_retries=args.max_retries, processes=args.processes,
                              local_cpus=args.local_cpus, working_dir=os.getcwd() if args.ship_code else None)
    # tpu-pod: each launch blocks until its point ends on the slice; the done check runs there.
    target = pod_target(args)
    log_dir = args.log_dir or os.path.join("runs", "tpu_pod", os.path.basename(args.workdir.rstrip("/")))
    progress = Progress(len(points))
    for p in points:
        mirror = dataclasses.replace(p, workdir=os.path.join(log_dir, p.name))
        progress.finished(local.run_point(mirror, command=tpu_pod.launch_command(p, target)))
    return progress.outcomes


def summarize(workdir: str, points: list[points_lib.Point]) -> None:
    """``DIR/sweep.json``: every finished point's overrides and results; one line each."""
    summary = []
    for p in points:
        if p.done:
            with open(os.path.join(p.workdir, "results.json")) as f:
                summary.append({"workdir": p.workdir, "overrides": p.overrides, **json.load(f)})
    if not summary:
        return
    write_json_atomic(os.path.join(workdir, "sweep.json"), summary)  # a killed sweep leaves the old one whole
    for row in summary:
        accuracy = f"test_accuracy={row['test_accuracy']} " if "test_accuracy" in row else ""
        print(f"{row['workdir']}: {accuracy}{' '.join(f'{k}={v}' for k, v in row['overrides'].items())}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        points = make_points(args)
        target = pod_target(args) if args.backend == "tpu-pod" else None
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.dry_run:
        if target:
            print("\n".join(tpu_pod.commands(points, target)))  # the done check runs on the slice
        else:
            print("\n".join(shlex.join([sys.executable, *p.args]) for p in points if not p.done))
        return 0
    if args.backend != "tpu-pod":
        skipped = sum(p.done for p in points)
        if skipped:
            print(f"{skipped} of {len(points)} points are done (results.json) and are skipped", flush=True)
    outcomes = run(args, points)
    failed = [o for o in outcomes if not o.ok]
    if args.backend != "tpu-pod":
        summarize(args.workdir, points)
    if failed:
        print(f"{len(failed)} of {len(outcomes)} points failed: {', '.join(o.name for o in failed)} "
              f"(logs: DIR/NNN/sweep.log; run the same command again to re-run only them)", file=sys.stderr)
    return min(len(failed), 255)


if __name__ == "__main__":
    sys.exit(main())
