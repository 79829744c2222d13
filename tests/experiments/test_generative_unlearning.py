"""The generative-unlearning experiment end to end (smoke config on the digits): every row, the
figures, resuming from finished rows, and its config errors."""
import json
import shutil

import numpy as np
import pytest

from experiments import generative_unlearning
from research.core.config import ConfigError, build, load_config
from research.models.mae import MaskConfig
from research.unlearning import generative, generative_benchmark, generative_report
from research.unlearning.generative_benchmark import GenerativeUnlearning


def smoke(**overrides) -> GenerativeUnlearning:
    return build(GenerativeUnlearning, load_config("configs/generative_unlearning.py:smoke", {**DIGITS, **overrides}))

DIGITS = {"generator.data.name": "digits", "generator.data.pad_to": 16, "proxy.name": "digits",
          "eval.image_size": 32, "eval.masks": ("center", "center_box")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    pytest.importorskip("torch", reason="the ImageNet weights are read with torch (the `ref` extra)")
    from research.models import efficientnet_lite as effnet
    try:
        effnet.pretrained_state_dict_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    workdir = tmp_path_factory.mktemp("gen_unlearn")
    config = load_config("configs/generative_unlearning.py:smoke", DIGITS)
    return workdir, generative_unlearning.main(config, str(workdir))


def test_smoke_run_reports_every_row_with_finite_metrics(finished):
    workdir, results = finished
    names = list(results["rows"])
    assert names[0] == "original" and names[1] == "ours (alpha 0.2)" and "ours, proxy retain digits (alpha 0.2)" in names
    assert set(names[-6:-2]) == {"max_loss", "noisy_label", "retain_label", "random_encoder"}
    for row in results["rows"].values():
        for group in ("retain", "forget"):
            cells = row["metrics"]["center"][group]
            assert all(np.isfinite(cells[m]["mean"]) for m in ("fid", "is", "cosine"))
            assert -1 <= cells["cosine"]["mean"] <= 1 and cells["is"]["mean"] >= 1 - 1e-9
    files = {p.name for p in workdir.iterdir()}
    assert {"results.json", "results.md", "samples_center.png", "tradeoff_center.png", "tradeoff_center_box.png",
            "tsne.png", "generator"} <= files
    assert "samples_center_box.png" not in files  # the same outputs as samples_center.png
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["masks"] == ["center", "center_box"] and set(saved["matched"]["center_box"]) == {"1.05", "1.1"}
    box = results["rows"]["original"]["metrics"]["center_box"]
    assert box["retain"]["fid"]["mean"] != results["rows"]["original"]["metrics"]["center"]["retain"]["fid"]["mean"]
    assert "at retain 1.05" in (workdir / "results.md").read_text()
    assert results["rows"]["noisy_label"]["method"] == "noisy_label" and results["rows"]["noisy_label"]["alpha"] == 0.2
    assert results["rows"]["original"]["method"] == "original"


def test_target_rows_are_untrained_ceilings_kept_out_of_the_matched_comparison(finished):
    workdir, results = finished
    assert list(results["rows"])[-2:] == ["forget target reached: ours", "forget target reached: noisy_label"]
    target = results["rows"]["forget target reached: noisy_label"]
    assert target["seconds"] == 0 and target["alpha"] is None and target["retain"] == "target"
    # Noise in the box is far from any digit: its FID is above the original generator's on both sets.
    for group in ("retain", "forget"):
        assert target["metrics"]["center_box"][group]["fid"]["mean"] > \
            results["rows"]["original"]["metrics"]["center_box"][group]["fid"]["mean"]
    saved = json.loads((workdir / "results.json").read_text())
    assert set(saved["matched"]["center"]["1.05"]) == {"ours", "ours, proxy retain", "max_loss", "noisy_label",
                                                      "retain_label", "random_encoder"}


def test_center_box_scores_the_hidden_box_and_the_whole_views_the_whole_image():
    exp = smoke(**{"eval.masks": ("center", "center_box", "outpaint")})
    images = (np.arange(2 * 16 * 16).reshape(2, 16, 16, 1) % 256).astype(np.uint8)

    class Pixels:  # the "features" are the pixels scored, to see the crop
        @staticmethod
        def features_and_logits(x):
            return x, None
    ref = generative_benchmark.reference_features({"retain": images}, Pixels, exp, (4, 4), 4, MaskConfig())
    np.testing.assert_array_equal(ref["center_box"]["retain"][0], images[:, 4:12, 4:12] / np.float32(255))
    for kind in ("center", "outpaint"):
        np.testing.assert_array_equal(ref[kind]["retain"][0], images / np.float32(255))


def test_baseline_alphas_give_each_baseline_a_row_per_alpha():
    exp = smoke(baselines=("noisy_label", "max_loss"), baseline_alphas=(0.1, 0.5))
    rows = {name: (c.method, c.alpha) if c else None for name, c, _ in generative_benchmark.method_rows(exp)}
    assert rows["noisy_label (alpha 0.1)"] == ("noisy_label", 0.1) and rows["max_loss (alpha 0.5)"] == ("max_loss", 0.5)
    # original, ours, proxy, 2 x 2 baselines, 2 target rows
    assert "noisy_label" not in rows and len(rows) == 1 + 1 + 1 + 2 * 2 + 2
    alone = smoke(baselines=(), target_rows=())  # () = ours alone
    assert [name for name, _, _ in generative_benchmark.method_rows(alone)] == [
        "original", "ours (alpha 0.2)", "ours, proxy retain digits (alpha 0.2)"]


def test_fid_ratios_are_per_seed_over_the_original_and_the_tradeoff_plot_is_written(tmp_path):
    def seeds(*pairs):  # per seed (retain FID, forget FID)
        return [{"center": {"retain": {"fid": r}, "forget": {"fid": f}}} for r, f in pairs]
    rows = {"original": {"method": "original", "alpha": None, "retain": "classes", "per_seed": seeds((10, 20), (20, 40))},
            "ours (alpha 0.2)": {"method": "ours", "alpha": 0.2, "retain": "classes",
                                 "per_seed": seeds((11, 60), (22, 100))},
            "noisy_label (alpha 0.1)": {"method": "noisy_label", "alpha": 0.1, "retain": "classes",
                                        "per_seed": seeds((12, 30), (20, 40))},
            "noisy_label (alpha 0.5)": {"method": "noisy_label", "alpha": 0.5, "retain": "classes",
                                        "per_seed": seeds((15, 50), (30, 80))}}
    results = {"data": "digits", "rows": rows}
    ratios = generative_report.fid_ratios(results, "center")
    np.testing.assert_allclose(ratios["ours (alpha 0.2)"]["retain"], [1.1, 1.1])
    np.testing.assert_allclose(ratios["ours (alpha 0.2)"]["forget"], [3.0, 2.5])
    np.testing.assert_allclose(ratios["noisy_label (alpha 0.5)"]["forget"], [2.5, 2.0])
    assert "original" not in ratios
    # Read at retain 1.1: ours (one alpha, exactly 1.1 in both seeds) gives 3.0 and 2.5; noisy label's
    # seed 0 spans 1.2-1.5 (not reached), seed 1 spans 1.0-1.5: 1.0 + (1.1 - 1.0) / 0.5 * (2.0 - 1.0).
    matched = generative_report.matched_forget_ratio(results, "center", 1.1)
    assert matched["ours"]["seeds"] == 2 and matched["ours"]["mean"] == pytest.approx(2.75)
    assert matched["noisy_label"]["seeds"] == 1 and matched["noisy_label"]["mean"] == pytest.approx(1.2)
    assert generative_report.matched_forget_ratio(results, "center", 2.0)["ours"]["seeds"] == 0
    generative_report.tradeoff_plot(str(tmp_path / "t.png"), results, "center")
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_a_rerun_reads_finished_rows_and_recomputes_only_a_row_saved_with_other_settings(finished, tmp_path,
                                                                                         monkeypatch):
    workdir, results = finished
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    record = run / "rows" / "seed0_noisy_label.json"
    saved = json.loads(record.read_text())
    saved["signature"]["unlearn"]["steps"] += 1  # as if saved by a run with other settings
    record.write_text(json.dumps(saved))

    recomputed = []

    def unlearn(generator, retain, forget, unlearn_config, *args, **kwargs):
        recomputed.append(unlearn_config.method)
        return generative.UnlearnResult(generator, 0.0, 0.0)
    monkeypatch.setattr(generative, "unlearn", unlearn)
    again = generative_unlearning.main(load_config("configs/generative_unlearning.py:smoke", DIGITS), str(run))
    assert recomputed == ["noisy_label"]
    assert again["rows"].keys() == results["rows"].keys()
    assert again["rows"]["max_loss"]["metrics"] == results["rows"]["max_loss"]["metrics"]
    assert json.loads(record.read_text())["signature"]["unlearn"]["steps"] == saved["signature"]["unlearn"]["steps"] - 1


def test_the_row_signature_changes_with_the_rows_settings_and_not_with_the_progress_bar():
    def signatures(**overrides):
        exp = smoke(**overrides)
        return {name: generative_benchmark.row_signature(exp, c, source)
                for name, c, source in generative_benchmark.method_rows(exp)}
    base = signatures()
    assert signatures(progress=True, seeds=(0, 1), **{"generator.train.progress": True}) == base
    steps = signatures(**{"unlearn.steps": 4})
    assert steps["original"] == base["original"] and steps["max_loss"] != base["max_loss"]
    assert all(a != b for a, b in zip(signatures(**{"eval.images_per_set": 8}).values(), base.values()))
    assert signatures(**{"generator.model.dim": 16})["original"] != base["original"]


@pytest.mark.parametrize("override, key", [
    ({"baselines": ("max_loss", "amnesia")}, "baselines"),
    ({"unlearn.batch_size": 7}, "unlearn.batch_size"),
    ({"eval.masks": ("random",)}, "eval.masks"),
    ({"forget_classes": (0, 5)}, "forget_classes"),
    ({"generator.model.patch_size": 0}, "generator.model.patch_size"),
    ({"proxy.name": "imagenet"}, "proxy.name"),
    ({"baseline_alphas": (0.1, -1.0)}, "baseline_alphas"),
    ({"target_rows": ("max_loss",)}, "target_rows"),
])
def test_bad_values_name_the_key(tmp_path, override, key):
    config = load_config("configs/generative_unlearning.py:smoke", {**DIGITS, **override})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        generative_unlearning.main(config, str(tmp_path))
    assert not (tmp_path / "results.json").exists()
