"""The prepared GPU script is ready whenever a GPU is at hand: every step's command line parses (the
full-size ones too, which only a GPU runs), the script runs steps in the order asked and writes one
JSON, and ``--dry-run`` runs every step end to end at tiny sizes on the CPU (``slow``: the benches
behind it have their own tests)."""
import importlib
import json
import os
import subprocess
import sys

import pytest

from tools.bench import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("size", ["FULL", "DRY", "OPTIONAL", "DRY_OPTIONAL"])
def test_every_steps_command_line_parses(size, tmp_path):
    for name, (argv, _) in getattr(gpu_check, size).items():
        argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
        assert argv[0] == "-m", name
        if argv[1] == "pytest":
            assert os.path.isdir(os.path.join(REPO, argv[-1] if "-k" not in argv else argv[argv.index("-k") - 1]))
            continue
        bench = importlib.import_module(argv[1])
        try:
            bench.parser().parse_args(argv[2:])
        except SystemExit:
            pytest.fail(f"{size} step {name}: {' '.join(argv[1:])} does not parse")


def run_gpu_check(tmp_path, *args) -> dict:
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "tools.bench.gpu_check", "--dry-run", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = {name: step["output_tail"] for name, step in report["steps"].items() if step["status"] != "ok"}
    assert report["dry_run"] and not failed, failed
    return report["steps"]


def test_named_steps_run_in_the_order_given_and_keep_their_whole_output(tmp_path):
    steps = run_gpu_check(tmp_path, "--only", "train_step,kernel_tests")
    assert list(steps) == ["train_step", "kernel_tests"]
    assert "ratio ours / PyTorch" in steps["train_step"]["output_tail"]
    assert "passed" in steps["kernel_tests"]["output_tail"]
    for step in steps.values():
        assert step["output"].strip().endswith(step["output_tail"].splitlines()[-1])


@pytest.mark.slow  # every bench at tiny sizes, one subprocess each (about 40 s of CI's 2 cores)
def test_dry_run_completes_every_step_and_writes_one_json(tmp_path):
    steps = run_gpu_check(tmp_path)
    assert list(steps) == list(gpu_check.DRY)
    tuned = steps["decode_tune"]["result"][0]["kernel_options"]
    assert steps["attention"]["result"][0]["kernel_options"] == tuned  # the grid ran the fastest launch
    assert steps["attention"]["result"][0]["triton_max_abs_error"] < 3e-2
    assert "absorbed-pallas" in steps["model_decode_b8"]["output_tail"]
    steps = run_gpu_check(tmp_path, "--only", "proxies")
    assert steps["proxies"]["result"]["masked_vmap_cells_per_s"] > 0


def test_an_unknown_step_is_named(capsys):
    try:
        gpu_check.main(["--dry-run", "--only", "attention,nope"])
    except SystemExit as e:
        assert e.code == 2
    assert "unknown steps ['nope']; choose from kernel_tests, decode_tune" in capsys.readouterr().err
