"""Commands that run each point on every worker of a Cloud TPU VM slice, or as an xpk workload.

Every worker of a slice runs the same command; ``RESEARCH_DISTRIBUTED=1`` makes the experiment call
``jax.distributed.initialize()``, which finds the slice's coordinator, process count and index
from the TPU metadata, so one point is one multi-host run over the whole slice.

A point's workdir must be storage every worker sees. The experiments write with ordinary file
I/O, so a ``gs://BUCKET/PATH`` workdir is used through a gcsfuse mount at ``/tmp/gcs/BUCKET`` that
the command makes on each worker (once; ``mountpoint`` guards it); a path (NFS, Filestore, a
mount made beforehand) is used as it is. The done check runs on the worker: a point whose
``results.json`` exists is skipped there, so re-running the commands resumes a sweep, and a
point that was interrupted resumes from its checkpoint.

    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='cd research && ...'
    xpk workload create --cluster CLUSTER --workload NAME-000 --tpu-type=v5litepod-16 ... --command='...'
"""
from __future__ import annotations

import dataclasses
import posixpath
import re
import shlex
from typing import Literal, Sequence

from tools.sweeps.points import Point

GCS_MOUNT_ROOT = "/tmp/gcs"


@dataclasses.dataclass(frozen=True)
class PodTarget:
    """Where and how the points run. ``name`` is the TPU VM (gcloud) or the workload prefix (xpk)."""
    name: str
    zone: str = ""
    project: str = ""
    launcher: Literal["gcloud", "xpk"] = "gcloud"
    cluster: str = ""             # xpk only
    tpu_type: str = ""            # xpk only, e.g. v5litepod-16
    docker_image: str = ""        # xpk only: an image with this checkout and its environment
    repo: str = "research"        # the checkout on each worker (relative to the login directory)
    python: str = "python3"
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if not self.name:
            raise ValueError("tpu-pod needs --tpu_name (the TPU VM, or the xpk workload prefix)")
        if self.launcher == "gcloud" and not self.zone:
            raise ValueError("tpu-pod with gcloud needs --zone")
        if self.launcher == "xpk" and not (self.cluster and self.tpu_type and self.docker_image):
            raise ValueError("tpu-pod with xpk needs --cluster, --tpu_type and --docker_image")
        if self.launcher == "xpk" and not re.fullmatch(r"[a-z]([-a-z0-9]{0,34}[a-z0-9])?", self.name):
            raise ValueError(f"xpk workload prefix {self.name!r}: lowercase letters, digits and '-', at most 36")


def shared_path(workdir: str) -> tuple[str, str]:
    """(the path the workers use, the shell that makes it visible) for a point's workdir."""
    if not workdir.startswith("gs://"):
        return workdir, ""
    bucket, _, rest = workdir[len("gs://"):].partition("/")
    if not bucket:
        raise ValueError(f"workdir {workdir!r} names no bucket (gs://BUCKET/PATH)")
    mount = posixpath.join(GCS_MOUNT_ROOT, bucket)
    q = shlex.quote(mount)
    make = f"mkdir -p {q} && (mountpoint -q {q} || gcsfuse --implicit-dirs {shlex.quote(bucket)} {q})"
    return posixpath.join(mount, rest), make


def worker_command(point: Point, target: PodTarget) -> str:
    """The shell line each worker runs for ``point``."""
    path, mount = shared_path(point.workdir)
    args = list(point.args)
    args[args.index("--workdir") + 1] = path
    env = [("RESEARCH_DISTRIBUTED", "1"), *target.env]
    run = shlex.join(["env", *(f"{k}={v}" for k, v in env), target.python, *args])
    done = shlex.quote(posixpath.join(path, "results.json"))
    steps = [f"cd {shlex.quote(target.repo)}", *([mount] if mount else []), f"{{ test -f {done} || {run}; }}"]
    return " && ".join(steps)


def launch_command(point: Point, target: PodTarget) -> list[str]:
    """The argument list that starts ``point`` on the slice from this machine."""
    inner = worker_command(point, target)
    if target.launcher == "gcloud":
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", target.name, f"--zone={target.zone}"]
        if target.project:
            cmd.append(f"--project={target.project}")
        return cmd + ["--worker=all", f"--command={inner}"]
    cmd = ["xpk", "workload", "create", f"--cluster={target.cluster}", f"--workload={target.name}-{point.index:03d}",
           f"--tpu-type={target.tpu_type}", "--num-slices=1", f"--docker-image={target.docker_image}"]
    if target.zone:
        cmd.append(f"--zone={target.zone}")
    if target.project:
        cmd.append(f"--project={target.project}")
    return cmd + [f"--command={inner}"]


def commands(points: Sequence[Point], target: PodTarget) -> list[str]:
    """One shell line per point, ready to paste (``--dry-run`` prints these)."""
    return [shlex.join(launch_command(p, target)) for p in points]
