"""The KD-step benchmark on the tiny model: each variant timed, ratios against the first."""
import pytest

from tools.bench import kd_step


def test_tiny_run_times_each_variant():
    result = kd_step.main(["--tiny", "--repeats", "1", "--batch", "2", "--seq", "16",
                           "--variants", "all_fp32,attention_fp32"])
    rows = result["variants"]
    assert list(rows) == ["all_fp32", "attention_fp32"]
    for row in rows.values():
        assert row["tokens_per_s"] == pytest.approx(32 / row["seconds_per_step"])


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit):
        kd_step.main(["--tiny", "--variants", "all_fp64"])
