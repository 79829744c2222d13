"""The efficient fine-tuning experiment end to end (smoke configs on embedded digits), and its errors."""
import json
import os
import subprocess
import sys

import pytest

from experiments import efficient_finetune
from research.backprop.finetune import EfficientFinetune
from research.core.config import ConfigError, build, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = ("test_acc", "backward_flops", "activation_bytes", "backward_seconds_per_step")


def test_cnn_variants_write_their_record_and_a_rerun_reuses_them(tmp_path, capsys):
    config = load_config("configs/efficient_finetune.py:smoke", {"data.name": "digits"})
    results = efficient_finetune.main(config, str(tmp_path))
    variants = results["variants"]
    assert list(variants) == ["vanilla", "filter_r2", "filter_r4", "head_only"]
    for r in variants.values():
        assert all(key in r for key in KEYS) and 0 <= r["test_acc"] <= 1
    assert results["finetuned_layers"] == ["blocks/8/conv1", "blocks/8/conv2"]
    # the same layers are trained, with a smaller backward (digits reach these layers at 2x2, so
    # R = 2 and R = 4 both pool to one patch)
    assert variants["vanilla"]["trainable_params"] == variants["filter_r2"]["trainable_params"]
    for name in ("filter_r2", "filter_r4"):
        assert variants["vanilla"]["backward_flops"] > 2 * variants[name]["backward_flops"]
    assert variants["vanilla"]["activation_bytes"] > variants["filter_r2"]["activation_bytes"]
    assert {"results.json", "results.md", "tradeoff.png", "pretrain", "finetune"} <= set(os.listdir(tmp_path))
    # Run again in the same workdir: the pre-training resumes from its final checkpoint and every
    # finished variant is reused as it was recorded, its timing included.
    capsys.readouterr()
    again = efficient_finetune.main(config, str(tmp_path))
    assert capsys.readouterr().out.count("reusing") == len(variants)
    assert again["pretrain"]["steps"] == results["pretrain"]["steps"]
    assert again["pretrain"]["test_acc"] == results["pretrain"]["test_acc"]
    assert again["variants"] == json.loads((tmp_path / "results.json").read_text())["variants"]
    assert again["variants"]["filter_r4"]["backward_seconds_per_step"] == variants["filter_r4"]["backward_seconds_per_step"]
    # A changed setting that shapes a variant runs it again (from its final fine-tuning checkpoint).
    changed = load_config("configs/efficient_finetune.py:smoke",
                          {"data.name": "digits", "finetune.variants": ("filter_r2",), "measure.repeats": 2})
    rerun = efficient_finetune.main(changed, str(tmp_path))
    assert "reusing" not in capsys.readouterr().out
    assert rerun["variants"]["filter_r2"]["test_acc"] == variants["filter_r2"]["test_acc"]


def test_vit_lbp_wht_variants(tmp_path):
    config = load_config("configs/efficient_finetune.py:vit,smoke",
                         {"data.name": "digits", "finetune.variants": ("vanilla", "lbp_k2"), "data.split": "samples"})
    results = efficient_finetune.main(config, str(tmp_path))
    assert len(results["finetuned_layers"]) == 12  # q, k, v, out, fc1, fc2 of the last two blocks
    variants = results["variants"]
    assert variants["vanilla"]["analytic_backward_flops"] > variants["lbp_k2"]["analytic_backward_flops"]


@pytest.mark.parametrize("overrides,message", [
    ({"finetune.variants": ("vanilla", "filter_r0")}, "unknown variant 'filter_r0'"),
    ({"finetune.variants": ("lbp_k4",)}, "lbp_k4 does not apply to resnet20"),
    ({"finetune.unit": "stages"}, "'finetune.unit' = 'stages' is not allowed"),
    ({"data.split": "random"}, "'data.split' = 'random' is not allowed"),
])
def test_bad_config_is_rejected_before_any_work(overrides, message):
    config = load_config("configs/efficient_finetune.py:smoke", overrides)
    with pytest.raises(ConfigError, match=message):
        build(EfficientFinetune, config)


def test_cli_reports_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.efficient_finetune", "--config",
                           "configs/efficient_finetune.py:smoke", "--config.finetune.variants=filter_rx",
                           "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: finetune.variants: unknown variant 'filter_rx'"), proc.stderr
