"""The anytime experiment end to end (smoke config on the digits): the sampler's record, the
budget curve, the plot, and its config errors."""
import json
import os

import pytest

from experiments import anytime
from research.core.config import ConfigError, load_config


def test_smoke_run_records_the_sampler_with_a_curve_over_the_budgets(tmp_path):
    # One sampler keeps the test short; the samplers themselves are tested in tests/anytime.
    config = load_config("configs/anytime.py:smoke", {"data.name": "digits", "samplers": ("tps",)})
    results = anytime.main(config, str(tmp_path))
    assert list(results["samplers"]) == ["tps"]
    for block in results["samplers"].values():
        assert len(block["curve"]) == len(config.eval.budgets)
        assert all(0 <= r["test_accuracy"] <= 1 and 0 <= r["val_accuracy"] <= 1 for r in block["candidates"])
        flops = [r["flops"] for r in block["candidates"]]
        assert flops == sorted(flops) and flops[-1] == block["largest_flops"]
        chosen = [p for p in block["curve"] if p["flops"]]
        assert all(p["flops"] <= b * block["largest_flops"] for p, b in zip(block["curve"], config.eval.budgets) if p["flops"])
        assert chosen, "the largest budget always holds a candidate"
    assert {"results.json", "results.md", "anytime.png", "tps"} <= set(os.listdir(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["budgets"] == list(config.eval.budgets)


@pytest.mark.parametrize("override, key", [
    ({"samplers": ("uniform", "greedy")}, "samplers"),
    ({"sampler.p_extra": 2.0}, "sampler.p_extra"),
    ({"model.name": "vit_tiny"}, "model.name"),
    ({"eval.budgets": (0.0, 1.0)}, "eval.budgets"),
    ({"data.val_size": 10_000}, "data.val_size"),
])
def test_bad_values_name_the_key(tmp_path, override, key):
    config = load_config("configs/anytime.py:smoke", {"data.name": "digits", **override})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        anytime.main(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "results.json")
