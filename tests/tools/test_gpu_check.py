"""The prepared GPU script runs end to end on the CPU at tiny sizes (``--dry-run``), so it is ready
whenever a GPU is at hand: every step succeeds and its figures land in the one JSON."""
import json
import subprocess
import sys

from tools.bench import gpu_check


def test_dry_run_completes_every_step_and_writes_one_json(tmp_path):
    out = tmp_path / "dry.json"
    done = subprocess.run([sys.executable, "-m", "tools.bench.gpu_check", "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and set(report["steps"]) == set(gpu_check.DRY)
    failed = {name: step["output_tail"] for name, step in report["steps"].items() if step["status"] != "ok"}
    assert not failed, failed
    steps = report["steps"]
    assert steps["attention"]["result"][0]["max_abs_error"] < 3e-2
    assert "absorbed-pallas" in steps["model_decode_b8"]["output_tail"]
    assert "ratio ours / PyTorch" in steps["train_step"]["output_tail"]
    assert steps["proxies"]["result"]["masked_vmap_cells_per_s"] > 0


def test_an_unknown_step_is_named(capsys):
    try:
        gpu_check.main(["--dry-run", "--only", "attention,nope"])
    except SystemExit as e:
        assert e.code == 2
    assert "unknown steps ['nope']; choose from kernel_tests" in capsys.readouterr().err
