"""The Online-LoRA experiment end to end (smoke configs on embedded digits and the CIFAR-10 sample), its
metrics on known matrices, its evaluation schedule and its config errors."""
import json
import os

import numpy as np
import pytest
from flax import nnx

from experiments import online_lora
from research.adapters import online_stream
from research.adapters.online_stream import OnlineLearning
from research.core.config import ConfigError, build, load_config
from research.data import streams

KEYS = ("avg_acc", "forgetting", "n_plateaus", "seconds")
# 8 x 8 digits for the stream and the backbone's pre-training (patch size chosen automatically)
DIGITS = {"data.name": "digits", "pretrain.data": "digits", "data.test_per_class": 0, "model.patch_size": 0}


def test_every_method_writes_its_record_and_a_rerun_reuses_it(tmp_path, capsys):
    config = load_config("configs/online_lora.py:smoke", DIGITS)
    results = online_lora.main(config, str(tmp_path))
    assert list(results["methods"]) == list(online_stream.METHODS)
    for r in results["methods"].values():
        assert all(key in r for key in KEYS) and 0 <= r["avg_acc"] <= 1
        assert np.asarray(r["task_end_accs"]).shape == (5, 5)
        # the final task-end row is the last point of the curve, and avg_acc its mean
        assert r["curve"][-1]["task_accs"] == r["task_end_accs"][-1]
        assert r["avg_acc"] == pytest.approx(np.mean(r["task_end_accs"][-1]))
        # Scoring a task's images over its own classes can only help; the task ends are the boundaries.
        assert all(til >= cil for p in r["curve"] for til, cil in zip(p["task_il_accs"], p["task_accs"], strict=True))
        assert r["avg_acc_task_il"] == pytest.approx(np.mean(r["task_end_accs_task_il"][-1]))
        assert 0 <= r["ncm_acc"] <= 1 and len(r["ncm_task_accs"]) == 5
        ends = [p["position"] for p in r["curve"] if p["task_accs"] in r["task_end_accs"]]
        assert set(results["stream"]["boundaries"][1:]) <= set(ends)
    assert results["methods"]["sequential_ft"]["n_plateaus"] == 0
    assert results["stream"]["length"] == 200 and sum(results["test_examples"]) > 300
    assert {"results.json", "results.md", "accuracy.png", "pretrain", "methods", "online_lora"} <= set(
        os.listdir(tmp_path))
    capsys.readouterr()
    again = online_lora.main(config, str(tmp_path))
    assert capsys.readouterr().out.count("reusing") == len(online_stream.METHODS)
    assert again["methods"] == json.loads((tmp_path / "results.json").read_text())["methods"]
    # a changed setting runs the method again
    changed = load_config("configs/online_lora.py:smoke", {**DIGITS, "methods": ("lora",), "online_lora.lr": 0.01})
    online_lora.main(changed, str(tmp_path))
    assert "reusing" not in capsys.readouterr().out


def test_each_method_runs_at_the_lr_chosen_on_a_held_out_slice_and_a_seed_sweep_selects_once(tmp_path, capsys):
    # Online-LoRA alone: its selection also calibrates the plateaus (the baselines share the lr path).
    select_dir = str(tmp_path / "select")
    overrides = {**DIGITS, "methods": ("online_lora",), "select.lrs": (1e-3, 3e-3),
                 "select.workdir": select_dir}
    results = online_lora.main(load_config("configs/online_lora.py:smoke", overrides), str(tmp_path / "seed0"))
    out = capsys.readouterr().out
    assert out.count("select ") == 2 and "(kept)" not in out
    chosen = results["selection"]["online_lora"]
    assert chosen["lr"] == max((1e-3, 3e-3), key=lambda lr: (chosen["scores"][f"{lr:g}"], -lr))
    # the method's pass ran at the chosen lr: its record is signed with it
    record = json.loads((tmp_path / "seed0" / "methods" / "online_lora.json").read_text())
    assert record["signature"]["online_lora"]["lr"] == chosen["lr"]
    assert os.path.exists(os.path.join(select_dir, "online_lora_lr0.003.json"))
    calibration = results["selection"]["online_lora"]["calibration"]
    settings = results["selection"]["online_lora"]["settings"]
    online = json.loads((tmp_path / "seed0" / "methods" / "online_lora.json").read_text())["signature"]["online_lora"]
    assert (online["mean_threshold"], online["var_threshold"]) == (settings["online_lora.mean_threshold"],
                                                                   settings["online_lora.var_threshold"])
    assert calibration["boundaries"][0] == 0 and len(calibration["boundaries"]) == 5
    # the selection stream holds the training images less the held-out slice (5 per class here)
    assert chosen["stream_length"] == results["stream"]["length"] - 5 * 10
    # another seed reuses the selection passes and so chooses the same settings
    again = online_lora.main(load_config("configs/online_lora.py:smoke", {**overrides, "seed": 1}),
                             str(tmp_path / "seed1"))
    assert capsys.readouterr().out.count("(kept)") == 2
    assert again["selection"] == results["selection"]


def test_the_batches_method_is_online_lora_with_the_official_buffer():
    exp = build(OnlineLearning, load_config("configs/online_lora.py:smoke", DIGITS))
    assert exp.for_method("online_lora_batches").online_lora.buffer == "batches"
    assert exp.for_method("online_lora").online_lora.buffer == "samples"
    assert exp.for_method("er", {"baselines.lr": 3e-4}).baseline_config("er").lr == 3e-4
    assert online_stream.lr_key("lora") == "online_lora.lr" and online_stream.lr_key("er") == "baselines.lr"


def test_imagenet_backbone_with_a_frozen_prefix_a_fresh_head_and_lora_on_the_tails_pointwise_convolutions(
        tmp_path, skip_without_imagenet_weights_or_data, monkeypatch):
    """The `cifar10_160` preset's model, without its stream (that runs as the slow test below)."""
    from research.adapters import lora
    from research.core.mesh import make_mesh
    from research.models import efficientnet_lite as effnet

    config = load_config("configs/online_lora.py:cifar10_160,smoke", {"methods": ("online_lora",)})
    skip_without_imagenet_weights_or_data(config)
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path / "cache"))  # where the prefix features are kept
    workdir = tmp_path / "run"
    workdir.mkdir()
    exp = build(OnlineLearning, config)
    backbone = online_lora.make_backbone(exp, make_mesh(), str(workdir), 10, (32, 32, 3))
    assert backbone.info["source"] == "imagenet" and not os.listdir(workdir)  # no pre-training stage
    model = backbone.new_model()
    assert isinstance(model, effnet.EfficientNetTail) and model.start == 11 and len(model.blocks) == 5
    torch_state = effnet.pretrained_state_dict()
    np.testing.assert_array_equal(model.blocks[0].expand.conv.kernel[...],
                                  torch_state["_blocks.11._expand_conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.blocks[4].project.bn.var[...], torch_state["_blocks.15._bn2.running_var"])
    assert model.head.kernel.shape == (1280, 10)
    np.testing.assert_array_equal(model.head.kernel[...], backbone.new_model().head.kernel[...])  # one head for all
    # The prefix runs once per image: 32 px -> stride 16 after block 10, 112 channels
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
    features = backbone.encode(images)
    assert features.shape == (3, 2, 2, 112) and features.dtype == np.float32
    assert np.isfinite(model(backbone.preprocess(features))).all()
    # Kept per set of images: the same images are read back, other images are encoded anew
    (cached,) = (tmp_path / "cache" / "online_lora_prefix").iterdir()
    np.save(cached, features + 1.0)
    np.testing.assert_array_equal(backbone.encode(images), features + 1.0)
    np.testing.assert_allclose(backbone.encode(images[:2]), features[:2], rtol=1e-5, atol=1e-5)  # another program

    def layers(kind):
        return {path: m for path, m in nnx.iter_graph(model) if isinstance(m, kind)}
    pointwise = {path for path, conv in layers(nnx.Conv).items() if conv.kernel_size == (1, 1)}
    online_lora.make_learner("online_lora", model, exp, backbone.preprocess)
    adapted = layers(lora.LoraLayer)
    # the expand and project convolutions of blocks 11-15 and the last convolution
    assert set(adapted) == pointwise and len(pointwise) == 2 * 5 + 1
    assert all(layer.base.kernel.shape[:2] == (1, 1) for layer in adapted.values())


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cifar10", "cifar10_160"])
def test_efficientnet_lite_stream_trains_lora_on_pointwise_convolutions(tmp_path, skip_without_imagenet_weights_or_data,
                                                                       preset):
    config = load_config(f"configs/online_lora.py:{preset},smoke", {"methods": ("online_lora",)})
    skip_without_imagenet_weights_or_data(config)
    results = online_lora.main(config, str(tmp_path))
    assert results["backbone"]["source"] == "imagenet" and results["model"] == "efficientnet_lite0"
    assert results["backbone"].get("frozen_blocks", 0) == (11 if preset == "cifar10_160" else 0)
    assert 0 <= results["methods"]["online_lora"]["avg_acc"] <= 1


def test_si_blurry_reports_a_auc_and_a_last_over_the_classes_seen_so_far(tmp_path):
    config = load_config("configs/online_lora.py:smoke", {**DIGITS, "stream.kind": "si_blurry", "eval.auc_every": 50,
                                                           "methods": ("online_lora",)})
    results = online_lora.main(config, str(tmp_path))
    r = results["methods"]["online_lora"]
    positions = [p["position"] for p in r["auc_curve"]]
    assert positions[0] >= 50 and positions[-1] == results["stream"]["length"] == 200 and len(positions) == 4
    seen = [p["seen_classes"] for p in r["auc_curve"]]
    assert seen == sorted(seen) and seen[-1] == 10
    assert r["a_auc"] == pytest.approx(np.mean([p["accuracy"] for p in r["auc_curve"]]))
    assert r["a_last"] == r["auc_curve"][-1]["accuracy"]
    assert "| method | A_auc (%) | A_last (%) |" in (tmp_path / "results.md").read_text()


def test_metrics_on_a_known_matrix():
    acc = [[0.9, 0.0, 0.0],
           [0.7, 0.8, 0.0],
           [0.5, 0.8, 0.9]]
    avg, forgetting = online_stream.continual_metrics(acc)
    assert avg == pytest.approx((0.5 + 0.8 + 0.9) / 3)
    assert forgetting == pytest.approx(((0.9 - 0.5) + (0.8 - 0.8)) / 2)
    assert online_stream.continual_metrics([[0.7]]) == (0.7, 0.0)
    with pytest.raises(ValueError, match="square"):
        online_stream.continual_metrics([[0.1, 0.2]])


def test_evaluation_positions_cover_every_task_end():
    train_labels = np.repeat(np.arange(4), 25)
    data = type("Data", (), {"labels": train_labels, "num_classes": 4, "__len__": lambda self: 100})()
    stream = streams.make_stream(data, [(0, 1), (2, 3)], kind="sharp")
    positions = online_stream.eval_positions(stream, points_per_task=1)
    assert positions == {25: False, 50: True, 75: False, 100: True}


@pytest.mark.parametrize("override, key", [
    ({"methods": ("online_lora", "replay")}, "methods"),
    ({"stream.kind": "fuzzy"}, "stream.kind"),
    ({"backbone.source": "imagenet"}, "backbone.source"),
    ({"baselines.ewc_alpha": 0.0}, "baselines.ewc_alpha"),
    ({"stream.num_tasks": 0}, "stream.num_tasks"),
    ({"backbone.frozen_blocks": 3}, "backbone.frozen_blocks"),   # needs the ImageNet weights
    ({"backbone.frozen_blocks": -1}, "backbone.frozen_blocks"),
    ({"select.lrs": (1e-3, -1e-3)}, "select.lrs"),
    ({"select.lrs": (1e-3,), "select.holdout_per_class": 20}, "select.holdout_per_class"),  # 20 per class in all
])
def test_bad_config_values_name_the_key(override, key, tmp_path):
    config = load_config("configs/online_lora.py:smoke", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        online_lora.main(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing written before the config is known to be good
