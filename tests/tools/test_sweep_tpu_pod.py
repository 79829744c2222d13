"""tools/sweep --backend tpu-pod: the printed commands survive two rounds of shell quoting, run the
point with the slice's environment, mount a gs:// workdir, and skip a point that is done."""
import json
import os
import shlex
import stat
import subprocess

import pytest

from tools import sweep
from tools.sweeps import tpu_pod
from tools.sweeps.points import Point

TRICKY = "it's a \"value\" with $HOME and spaces"


def point(workdir, index=0):
    return Point(index, {"note": TRICKY}, workdir,
                 ("-m", "experiments.train_classifier", "--config", "configs/x.py:smoke", f"--config.note={TRICKY}",
                  "--workdir", workdir))


def fake_tool(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def run_on_a_fake_worker(tmp_path, line):
    """Runs the --command of a printed gcloud line with bash, as a worker's login shell would."""
    argv = shlex.split(line)
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in argv
    inner = argv[-1].removeprefix("--command=")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    return subprocess.run(["bash", "-c", inner], cwd=tmp_path, env=env, capture_output=True, text=True)


@pytest.fixture
def worker(tmp_path):
    """A fake worker: a checkout folder and a 'python' that records its argv and environment."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "checkout").mkdir()
    fake_tool(tmp_path / "bin", "fakepython",
              'python3 -c "import json, os, sys; json.dump({\'argv\': sys.argv[1:], '
              '\'distributed\': os.environ.get(\'RESEARCH_DISTRIBUTED\'), \'data\': os.environ.get(\'RESEARCH_DATA_DIR\'), '
              '\'cwd\': os.getcwd()}, open(os.environ[\'RECORD\'], \'a\')); print(file=open(os.environ[\'RECORD\'], \'a\'))" "$@"\n')
    return tmp_path


def target(**kw):
    return tpu_pod.PodTarget(name="pod-v4-32", zone="us-central2-b", repo="checkout", python="fakepython",
                             env=(("RESEARCH_DATA_DIR", "/data dir"), ("RECORD", "record.jsonl")), **kw)


def test_the_worker_runs_the_point_with_its_arguments_intact_and_the_slice_environment(worker):
    p = point(str(worker / "sweep" / "000"))
    line, = tpu_pod.commands([p], target())
    result = run_on_a_fake_worker(worker, line)
    assert result.returncode == 0, result.stderr
    record = json.loads((worker / "checkout" / "record.jsonl").read_text().splitlines()[0])
    assert record["argv"] == list(p.args) and f"--config.note={TRICKY}" in record["argv"]
    assert record["distributed"] == "1" and record["data"] == "/data dir"
    assert record["cwd"] == str(worker / "checkout")


def test_a_point_whose_results_exist_on_the_shared_storage_is_skipped_on_the_worker(worker):
    p = point(str(worker / "sweep" / "000"))
    os.makedirs(p.workdir)
    open(os.path.join(p.workdir, "results.json"), "w").write("{}")
    assert run_on_a_fake_worker(worker, tpu_pod.commands([p], target())[0]).returncode == 0
    assert not (worker / "checkout" / "record.jsonl").exists()


def test_a_gs_workdir_is_mounted_once_with_gcsfuse_and_used_as_a_path(worker, monkeypatch):
    monkeypatch.setattr(tpu_pod, "GCS_MOUNT_ROOT", str(worker / "gcs"))
    fake_tool(worker / "bin", "gcsfuse", f'echo "$@" >> {worker}/gcsfuse.args\n')
    p = point("gs://my-bucket/sweeps/cls/000")
    line, = tpu_pod.commands([p], target())
    assert run_on_a_fake_worker(worker, line).returncode == 0
    assert (worker / "gcsfuse.args").read_text().split() == ["--implicit-dirs", "my-bucket", str(worker / "gcs" / "my-bucket")]
    record = json.loads((worker / "checkout" / "record.jsonl").read_text().splitlines()[0])
    assert record["argv"][-1] == str(worker / "gcs" / "my-bucket" / "sweeps" / "cls" / "000")


def test_xpk_makes_one_named_workload_per_point():
    t = tpu_pod.PodTarget(name="cls-sweep", launcher="xpk", cluster="my-cluster", tpu_type="v5litepod-16",
                          docker_image="gcr.io/p/research:latest", project="p")
    lines = tpu_pod.commands([point("/mnt/sweep/000", 0), point("/mnt/sweep/001", 1)], t)
    argv = shlex.split(lines[1])
    assert argv[:3] == ["xpk", "workload", "create"]
    assert {"--cluster=my-cluster", "--workload=cls-sweep-001", "--tpu-type=v5litepod-16", "--num-slices=1",
            "--docker-image=gcr.io/p/research:latest", "--project=p"} <= set(argv)
    assert argv[-1].startswith("--command=cd research && { test -f /mnt/sweep/001/results.json || env RESEARCH_DISTRIBUTED=1 ")


@pytest.mark.parametrize("kw, message", [
    ({"name": "pod"}, "needs --zone"),
    ({"name": "", "zone": "z"}, "needs --tpu_name"),
    ({"name": "Pod_1", "launcher": "xpk", "cluster": "c", "tpu_type": "t", "docker_image": "i"}, "lowercase"),
    ({"name": "pod", "launcher": "xpk"}, "needs --cluster, --tpu_type and --docker_image"),
])
def test_a_target_missing_what_its_launcher_needs_fails_naming_the_flag(kw, message):
    with pytest.raises(ValueError, match=message):
        tpu_pod.PodTarget(**kw)


def test_the_dry_run_prints_one_launch_line_per_point_of_the_real_config(tmp_path, capsys):
    assert sweep.main(["--experiment", "train_classifier", "--config", "configs/train_classifier.py:smoke",
                       "--workdir", "gs://bucket/sweep", "--backend", "tpu-pod", "--tpu_name", "pod", "--zone", "z",
                       "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.startswith("gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all") for line in lines)
    assert "/tmp/gcs/bucket/sweep/005" in lines[5]


def test_only_picks_points_by_index_and_names_a_missing_one(capsys):
    argv = ["--experiment", "train_classifier", "--config", "configs/train_classifier.py:smoke", "--workdir", "/mnt/s",
            "--backend", "tpu-pod", "--tpu_name", "pod", "--zone", "z", "--dry-run"]
    sweep.main(argv + ["--only", "1,4"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "/mnt/s/001/results.json" in lines[0] and "/mnt/s/004/results.json" in lines[1]
    with pytest.raises(SystemExit, match="no point 6; the sweep has points 0..5"):
        sweep.main(argv + ["--only", "6"])
