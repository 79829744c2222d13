"""The unlearning experiment end to end on embedded digits (smoke configs), its records and reuse, and
its config errors."""
import json
import os

import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from experiments import unlearning
from research.core.config import ConfigError, build, load_config
from research.data.pipeline import ImageArrays
from research.models import build_model
from research.unlearning.model import Unlearnable
from research.unlearning.benchmark import METHODS, Unlearning
from research.unlearning.recipe import TrainRecipe

KEYS = ("retain_acc", "forget_acc", "test_acc", "mia", "gap_to_retrain", "seconds")
DIGITS = {"data.name": "digits", "pretrain.data": "digits", "model.patch_size": 0}
SMALL_MLP = {**DIGITS, "model.name": "mlp", "model.hidden_sizes": (16,)}  # the method code paths, compiled fast


def test_every_method_and_scenario_is_recorded_and_a_rerun_reuses_them(tmp_path, capsys):
    config = load_config("configs/unlearning.py:smoke", SMALL_MLP)
    results = unlearning.main(config, str(tmp_path))
    assert list(results["scenarios"]) == ["class", "random"]
    for block in results["scenarios"].values():
        assert list(block["methods"]) == ["original", *METHODS]
        for row in block["methods"].values():
            assert all(k in row for k in KEYS)
            assert all(0 <= row[k] <= 100 for k in ("retain_acc", "forget_acc", "test_acc", "mia"))
        assert block["methods"]["retrain"]["gap_to_retrain"] == 0
    cls = results["scenarios"]["class"]
    assert cls["n_forget"] == 8 and cls["n_retain"] == 32  # 5 classes x 8 images, one class forgotten
    assert results["scenarios"]["random"]["n_forget"] == 4
    assert results["num_params"] == 64 * 16 + 16 + 16 * 5 + 5  # every parameter of the MLP
    assert {"results.json", "results.md", "unlearning.png", "seed_0", "pretrain"} <= set(os.listdir(tmp_path))
    assert {"results.json", "results.md", "trained.npz", "methods"} <= set(os.listdir(tmp_path / "seed_0"))
    capsys.readouterr()
    again = unlearning.main(config, str(tmp_path))
    assert not [line for line in capsys.readouterr().out.splitlines() if line.endswith(" s")]  # nothing recomputed
    assert again["scenarios"] == json.loads((tmp_path / "results.json").read_text())["scenarios"]
    # One baseline's hyperparameter changed: only that method runs again, in each scenario.
    changed = load_config("configs/unlearning.py:smoke", {**SMALL_MLP, "baselines.finetune.lr": 0.02})
    unlearning.main(changed, str(tmp_path))
    ran = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.endswith(" s")]
    assert ran == ["finetune", "finetune"]


def test_scale_sweep_walks_the_scrub_direction_and_reruns_only_ntk(tmp_path, capsys):
    base = {**SMALL_MLP, "methods": ("retrain", "ntk"), "scenarios": ("class",)}
    unlearning.main(load_config("configs/unlearning.py:smoke", {**base, "ntk.scale": "none"}), str(tmp_path))
    capsys.readouterr()
    results = unlearning.main(load_config("configs/unlearning.py:smoke",
                                          {**base, "ntk.scale": "none", "ntk.scale_sweep": (0, 1)}), str(tmp_path))
    ran = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.endswith(" s")]
    assert ran == ["ntk"]  # an ntk setting changed: retraining is reused
    rows = results["scenarios"]["class"]["methods"]
    at_zero, at_one = rows["ntk"]["info_sweep"]
    for key in unlearning.REPORTED:
        assert at_zero[key] == pytest.approx(rows["original"][key])  # s = 0: the trained model
        assert at_one[key] == pytest.approx(rows["ntk"][key])        # s = 1: the scrub with scale "none"
    assert at_one["gap_to_retrain"] == pytest.approx(rows["ntk"]["gap_to_retrain"])
    assert "ntk_scale_sweep.png" in os.listdir(tmp_path)
    assert "| 0 |" in (tmp_path / "results.md").read_text()


def test_seeds_report_the_mean_and_sd_of_their_runs_and_share_the_backbone(tmp_path):
    base = {**SMALL_MLP, "methods": ("retrain", "ntk"), "scenarios": ("random",)}
    results = unlearning.main(load_config("configs/unlearning.py:smoke", {**base, "seeds": (0, 1)}), str(tmp_path))
    assert results["seeds"] == [0, 1] and {"seed_0", "seed_1", "pretrain"} <= set(os.listdir(tmp_path))
    per_seed = [json.loads((tmp_path / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    for method, row in results["scenarios"]["random"]["methods"].items():
        for key in ("forget_acc", "gap_to_retrain"):
            values = [run["scenarios"]["random"]["methods"][method][key] for run in per_seed]
            assert row[f"{key}_values"] == values
            assert row[key] == pytest.approx(np.mean(values)) and row[f"{key}_sd"] == pytest.approx(np.std(values, ddof=1))
    assert per_seed[0]["scenarios"]["random"]["methods"]["ntk"]["forget_acc"] is not None
    assert results["ntk_seconds_over_retrain_seconds"]["random"] > 0
    assert " ± " in (tmp_path / "results.md").read_text()
    # One seed alone is the same run as that seed inside the pair (its records are reused).
    alone = unlearning.main(load_config("configs/unlearning.py:smoke", {**base, "seeds": (1,)}), str(tmp_path))
    assert alone["scenarios"]["random"]["methods"]["ntk"]["forget_acc"] == \
        per_seed[1]["scenarios"]["random"]["methods"]["ntk"]["forget_acc"]


def test_exact_theory_preset_trains_to_convergence_and_scrubs_with_scale_one(tmp_path):
    config = load_config("configs/unlearning.py:exact_theory,smoke", {**SMALL_MLP, "methods": ("retrain", "ntk"),
                                                                       "scenarios": ("random",)})
    assert (config.unlearn.loss, config.unlearn.optimizer, config.ntk.scale) == ("mse", "gauss_newton", "none")
    results = unlearning.main(config, str(tmp_path))
    assert results["scenarios"]["random"]["methods"]["ntk"]["info_scale"] == 1.0
    # Trained near a minimum: the recipe's gradient at w(D) and at the retrain is far below w_init's.
    seed = json.loads((tmp_path / "seed_0" / "results.json").read_text())
    assert seed["grad_norm"]["trained"] < 1e-2 * seed["grad_norm"]["init"]
    assert results["scenarios"]["random"]["methods"]["retrain"]["info_grad_norm"] < 1e-2 * seed["grad_norm"]["init"]


def test_trained_model_is_reused_only_for_the_same_settings(tmp_path):
    model = build_model("mlp", num_classes=3, input_shape=(4, 4, 1), rngs=nnx.Rngs(0), hidden_sizes=(8,))
    init = Unlearnable.from_model(model)
    rng = np.random.default_rng(0)
    data = ImageArrays(rng.integers(0, 256, (24, 4, 4, 1), dtype=np.uint8), rng.integers(0, 3, 24).astype(np.int32),
                       ("a", "b", "c"))
    recipe, path = TrainRecipe(epochs=1, batch_size=8), str(tmp_path / "trained.npz")
    first, seconds = unlearning.trained_params(init, data, recipe, path, 0, False, "settings A")
    again, seconds_again = unlearning.trained_params(init, data, recipe, path, 0, False, "settings A")
    assert seconds > 0 and seconds_again == 0.0  # read back, not trained
    np.testing.assert_array_equal(ravel_pytree(first)[0], ravel_pytree(again)[0])
    _, seconds_other = unlearning.trained_params(init, data, TrainRecipe(lr=0.1, epochs=1, batch_size=8), path, 0,
                                                 False, "settings B")
    assert seconds_other > 0  # other settings: trained again


def test_fast_ntk_on_visual_prompts_runs(tmp_path):
    config = load_config("configs/unlearning.py:vit_prompts,smoke",
                         {**DIGITS, "methods": ("retrain", "ntk", "finetune"), "scenarios": ("random",),
                          "data.train_per_class": 8, "unlearn.num_prompts": 2})
    results = unlearning.main(config, str(tmp_path))
    rows = results["scenarios"]["random"]["methods"]
    # 80 samples x 10 classes = 800 kernel rows < 2,314 parameters: the sample-space solve
    assert rows["ntk"]["info_space"] == "samples" and rows["ntk"]["info_num_params"] == results["num_params"]
    # prompts (2 x 192) + head (192 x 10 + 10)
    assert results["num_params"] == 2 * 192 + 192 * 10 + 10


def test_fast_ntk_effnet_unlearns_the_bn_affine_parameters_and_a_fresh_head_of_the_imagenet_weights(
        tmp_path, skip_without_imagenet_weights_or_data):
    """The `fast_ntk_effnet` preset's model at w_init, without training and scrubbing (the slow test below)."""
    from research.models import efficientnet_lite as effnet

    config = load_config("configs/unlearning.py:fast_ntk_effnet,smoke")
    skip_without_imagenet_weights_or_data(config)
    exp = build(Unlearning, config)
    shape = exp.input_shape((32, 32, 3))
    state, preprocess, info = unlearning.pretrained_backbone(exp, None, str(tmp_path), shape)
    assert info["data"] == "imagenet" and not os.listdir(tmp_path)  # no pre-training stage
    model, subset = unlearning.model_at_init(exp, state, 10, shape, seed=0)
    torch_state = effnet.pretrained_state_dict()
    np.testing.assert_array_equal(model.blocks[5].depthwise.bn.scale[...], torch_state["_blocks.5._bn1.weight"])
    np.testing.assert_array_equal(model.last_conv.bn.mean[...], torch_state["_bn1.running_mean"])
    init = Unlearnable.from_model(model, subset, preprocess)
    # BN affine parameters (2 x 21,008 channels) and a 10-class head on 1,280 features, nothing else
    assert init.num_params == 2 * 21008 + 1280 * 10 + 10
    assert {str(path[-1]) for path, _ in nnx.to_flat_state(init.params)} == {"scale", "bias", "kernel"}


@pytest.mark.slow
def test_fast_ntk_on_the_imagenet_efficientnet_runs(tmp_path, skip_without_imagenet_weights_or_data):
    config = load_config("configs/unlearning.py:fast_ntk_effnet,smoke",
                         {"methods": ("retrain", "ntk"), "scenarios": ("class",), "data.train_per_class": 3,
                          "unlearn.epochs": 1})
    skip_without_imagenet_weights_or_data(config)
    results = unlearning.main(config, str(tmp_path))
    assert results["model"] == "efficientnet_lite0" and results["pretrain"]["data"] == "imagenet"
    assert "pretrain" not in os.listdir(tmp_path)  # no pre-training stage
    ntk_row = results["scenarios"]["class"]["methods"]["ntk"]
    # BN affine parameters (2 x 21,008 channels) + a 10-class head on 1,280 features; 30 samples x 10
    # classes = 300 kernel rows, so the sample-space solve
    assert results["num_params"] == 2 * 21008 + 1280 * 10 + 10
    assert ntk_row["info_space"] == "samples" and np.isfinite(ntk_row["gap_to_retrain"])


@pytest.mark.parametrize("override, message", [
    ({"methods": ("retrain", "oracle")}, "methods.: unknown"),
    ({"scenarios": ("half",)}, "scenarios.: unknown"),
    ({"unlearn.subset": "prompts"}, "needs a ViT"),
    ({"forget_fraction": 1.5}, "forget_fraction"),
    ({"ntk.scale": "double"}, "ntk.scale"),
    ({"ntk.scale_sweep": (1, "two")}, "ntk.scale_sweep"),
    ({"ntk.linearize_at": "final"}, "ntk.linearize_at"),
    ({"seeds": (0, 0)}, "seeds"),
    ({"unlearn.decay_toward": "one"}, "unlearn.decay_toward"),
    ({"backbone.source": "hub"}, "backbone.source"),
    ({"backbone.source": "imagenet"}, "efficientnet_lite0 only"),
    ({"data.image_size": 64}, "data.image_size"),
])
def test_bad_config_values_fail_with_the_key(tmp_path, override, message):
    config = load_config("configs/unlearning.py:smoke", {**DIGITS, **override})
    with pytest.raises(ConfigError, match=message):
        unlearning.main(config, str(tmp_path))
