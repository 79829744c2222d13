"""tools/linear_probe: the resolution rule, and a tiny end-to-end probe on the CIFAR-10 sample."""
import json

import pytest

from research.core.config import load_config
from tools import linear_probe


def test_the_chosen_size_is_the_smallest_within_the_tolerance_of_the_largest():
    rows = [{"size": 64, "accuracy": 0.70}, {"size": 96, "accuracy": 0.80}, {"size": 128, "accuracy": 0.84},
            {"size": 224, "accuracy": 0.85}]
    assert linear_probe.choose(rows, 0.03) == 128   # 0.80 is 5 points below 0.85
    assert linear_probe.choose(rows, 0.05) == 96
    assert linear_probe.choose(rows, 0.0) == 224


def test_bad_sizes_fail_with_one_line(tmp_path):
    for sizes, message in (("64,x", "expected integers"), ("16,64", "must be >= 32")):
        with pytest.raises(SystemExit, match=message):
            linear_probe.main(["--sizes", sizes, "--out", str(tmp_path)])


@pytest.mark.slow  # about 15 s of EfficientNet compilation; the suite is over its time budget
def test_a_tiny_probe_writes_its_table(tmp_path, skip_without_imagenet_weights_or_data):
    skip_without_imagenet_weights_or_data(load_config("configs/online_lora.py:cifar10"))
    linear_probe.main(["--sizes", "32", "--train_limit", "100", "--test_limit", "50", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "probe.json").read_text())
    row, = record["rows"]
    assert record["chosen_size"] == 32 and 0.0 <= row["accuracy"] <= 1.0 and row["seconds_per_image"] > 0
    assert (tmp_path / "probe.png").exists() and "| 32 (chosen) |" in (tmp_path / "probe.md").read_text()
