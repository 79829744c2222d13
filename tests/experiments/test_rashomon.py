"""The Rashomon experiment end to end on the breast-cancer data (smoke config): its record, its
plots, a rerun that reuses the trained models, and its config errors."""
import json
import os

import pytest

from experiments import rashomon
from research.core.config import ConfigError, build, load_config, load_sweep
from research.multiplicity.benchmark import Multiplicity
from research.multiplicity.metrics import METRICS


def test_smoke_run_records_every_method_per_eps_and_a_rerun_reuses_the_trained_models(tmp_path):
    config = load_config("configs/rashomon.py:smoke")
    results = rashomon.main(config, str(tmp_path))
    assert list(results["methods"]) == ["dropout", "retrain", "awp"]
    for block in results["methods"].values():
        assert [r["eps"] for r in block["by_eps"]] == list(config.rashomon.epsilons)
        for row in block["by_eps"]:
            assert all(k in row for k in METRICS) and 1.0 <= row["rashomon_capacity"] <= 2.0
    assert results["methods"]["dropout"]["models_explored"] == 3 * 4
    assert results["methods"]["awp"]["models_explored"] == 2 * 2  # 2 points x 2 classes
    assert set(results["speedup_per_model"]) == {"retrain", "awp"}
    assert set(results["mitigation"]) == {"single", "ensemble", "selection"}
    assert {"results.json", "results.md", "multiplicity.png", "losses.png", "reference", "retrain"} <= set(
        os.listdir(tmp_path))
    first = json.loads((tmp_path / "retrain" / "seed_1" / "train_seconds.json").read_text())["seconds"]
    again = rashomon.main(config, str(tmp_path))  # the trained models come back from their checkpoints
    assert again["retrain_losses"] == pytest.approx(results["retrain_losses"], abs=1e-6)
    assert again["methods"]["dropout"]["by_eps"] == results["methods"]["dropout"]["by_eps"]
    assert json.loads((tmp_path / "retrain" / "seed_1" / "train_seconds.json").read_text())["seconds"] == first


@pytest.mark.parametrize("overrides, message", [
    ({"retrain_seeds": (0, 1)}, "retrain_seeds"),
    ({"methods": ("retrain",)}, "methods"),
    ({"methods": ("dropout", "bootstrap")}, "bootstrap"),
    ({"rashomon.kind": "uniform"}, "rashomon.kind"),
    ({"awp.steps": 0}, "awp.steps"),
    ({"data.name": "imagenet"}, "data.name"),
])
def test_bad_settings_fail_before_anything_runs(tmp_path, overrides, message):
    config = load_config("configs/rashomon.py:smoke", overrides)
    with pytest.raises(ConfigError, match=message):
        rashomon.main(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("preset", ["", ":fashion_mnist", ":cifar10"])
def test_the_seed_sweep_gives_each_reference_seed_its_own_retraining_seeds(preset):
    points = load_sweep("configs/rashomon.py" + preset)
    seeds = [p["seed"] for p in points]
    assert len(set(seeds)) == len(seeds) == 5
    retrain = [s for p in points for s in p["retrain_seeds"]]
    assert len(set(retrain)) == len(retrain) and not set(retrain) & set(seeds)
    for point in points:
        config = load_config("configs/rashomon.py" + preset, point)
        assert len(config.retrain_seeds) == len(load_config("configs/rashomon.py" + preset).retrain_seeds)
        build(Multiplicity, config)  # every point is a valid run
