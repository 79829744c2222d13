"""The unlearning experiment end to end on embedded digits (smoke configs), its records and reuse, and
its config errors."""
import json
import os

import pytest

from experiments import unlearning
from research.core.config import ConfigError, load_config

KEYS = ("retain_acc", "forget_acc", "test_acc", "mia", "gap_to_retrain", "seconds")
DIGITS = {"data.name": "digits", "pretrain.data": "digits", "model.patch_size": 0}
SMALL_MLP = {**DIGITS, "model.name": "mlp", "model.hidden_sizes": (16,)}  # the method code paths, compiled fast


def test_every_method_and_scenario_is_recorded_and_a_rerun_reuses_them(tmp_path, capsys):
    config = load_config("configs/unlearning.py:smoke", SMALL_MLP)
    results = unlearning.main(config, str(tmp_path))
    assert list(results["scenarios"]) == ["class", "random"]
    for block in results["scenarios"].values():
        assert list(block["methods"]) == ["original", *unlearning.METHOD_NAMES]
        for row in block["methods"].values():
            assert all(k in row for k in KEYS)
            assert all(0 <= row[k] <= 100 for k in ("retain_acc", "forget_acc", "test_acc", "mia"))
        assert block["methods"]["retrain"]["gap_to_retrain"] == 0
    cls = results["scenarios"]["class"]
    assert cls["n_forget"] == 8 and cls["n_retain"] == 32  # 5 classes x 8 images, one class forgotten
    assert results["scenarios"]["random"]["n_forget"] == 4
    assert results["num_params"] == 64 * 16 + 16 + 16 * 5 + 5  # every parameter of the MLP
    assert {"results.json", "results.md", "unlearning.png", "trained.npz", "pretrain"} <= set(os.listdir(tmp_path))
    capsys.readouterr()
    again = unlearning.main(config, str(tmp_path))
    out = capsys.readouterr().out
    assert " s\n" not in out.split("trained on D")[1].split("**class**")[0]  # nothing was recomputed
    assert again["scenarios"] == json.loads((tmp_path / "results.json").read_text())["scenarios"]


def test_fast_ntk_on_visual_prompts_runs(tmp_path):
    config = load_config("configs/unlearning.py:vit_prompts,smoke",
                         {**DIGITS, "methods": "retrain,ntk,finetune", "scenarios": "random",
                          "data.train_per_class": 8, "unlearn.num_prompts": 2})
    results = unlearning.main(config, str(tmp_path))
    rows = results["scenarios"]["random"]["methods"]
    # 80 samples x 10 classes = 800 kernel rows < 2,314 parameters: the sample-space solve
    assert rows["ntk"]["info_space"] == "samples" and rows["ntk"]["info_num_params"] == results["num_params"]
    # prompts (2 x 192) + head (192 x 10 + 10)
    assert results["num_params"] == 2 * 192 + 192 * 10 + 10


@pytest.mark.parametrize("override, message", [
    ({"methods": "retrain,oracle"}, "methods: unknown"),
    ({"scenarios": "half"}, "scenarios: unknown"),
    ({"unlearn.subset": "prompts"}, "needs a ViT"),
    ({"forget_fraction": 1.5}, "forget_fraction"),
    ({"ntk.scale": "double"}, "ntk.scale"),
])
def test_bad_config_values_fail_with_the_key(tmp_path, override, message):
    config = load_config("configs/unlearning.py:smoke", {**DIGITS, **override})
    with pytest.raises(ConfigError, match=message):
        unlearning.main(config, str(tmp_path))
