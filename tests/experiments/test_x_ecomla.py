"""The X-EcoMLA experiment end to end (smoke: a tiny random GQA model with SmolLM2's tokenizer on
the KJV text), its resume, and its config errors."""
import json
import os

import pytest

from experiments import x_ecomla
from research.core.checkpoint import CheckpointMismatchError
from research.core.config import ConfigError, load_config

REQUIRED = ("kv_values_per_token_teacher", "kv_values_per_token_student", "kv_ratio", "ppl_teacher",
            "ppl_student_init", "ppl_student_kd", "top1_agreement_kd", "train_tokens", "wall_time_s")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("x_ecomla")
    config = load_config("configs/x_ecomla.py:smoke")
    return config, str(workdir), x_ecomla.main(config, str(workdir))


def test_smoke_run_writes_a_complete_record(smoke_run):
    config, workdir, results = smoke_run
    assert all(results[k] is not None for k in REQUIRED)
    # 2 layers; GQA: 2 KV heads x 16 dims x 2; MLA: r_kv 8 + d_r 4
    assert results["kv_values_per_token_teacher"] == 2 * 64 and results["kv_values_per_token_student"] == 2 * 12
    assert results["kv_ratio"] == pytest.approx(12 / 64)
    assert results["train_tokens"] == config.train.steps * config.train.batch_size * config.data.seq_len
    assert 0 <= results["top1_agreement_kd"] <= 1 and results["ppl_teacher"] > 1
    assert {"results.json", "upcycle.json", "reconstruct.json", "config.json", "curves.png", "heldout.png", "tb",
            "checkpoints"} <= set(os.listdir(workdir))
    report = json.loads(open(os.path.join(workdir, "reconstruct.json")).read())
    assert all(after <= before for before, after in zip(report["error_before"], report["error_after"]))
    assert json.loads(open(os.path.join(workdir, "results.json")).read())["kv_ratio"] == results["kv_ratio"]


def test_rerun_resumes_from_the_final_checkpoint(smoke_run):
    config, workdir, results = smoke_run
    again = x_ecomla.main(config, workdir)
    assert again["steps"] == results["steps"]
    assert again["ppl_student_kd"] == pytest.approx(results["ppl_student_kd"], rel=1e-6)


def test_a_workdir_of_other_settings_is_refused_before_upcycling(smoke_run, monkeypatch):
    config, workdir, _ = smoke_run
    monkeypatch.setattr(x_ecomla, "upcycle_gqa_to_mla", lambda *a, **k: pytest.fail("upcycled before the check"))
    changed = load_config("configs/x_ecomla.py:smoke", {"reconstruct.lr": 2e-3})
    with pytest.raises(CheckpointMismatchError, match="reconstruct"):
        x_ecomla.main(changed, workdir)


def test_time_budget_evaluates_and_ends_the_run(tmp_path):
    # No layer-wise step: the budgets time the KD loop alone (the smoke run above covers that step).
    config = load_config("configs/x_ecomla.py:smoke", {"train.budget_minutes": (1e-5, 2e-5), "reconstruct.steps": 0})
    results = x_ecomla.main(config, str(tmp_path))
    budgets = json.loads(open(tmp_path / "budgets.json").read())
    assert budgets == results["budgets"] and budgets[-1]["minutes"] >= 2e-5
    assert results["steps"] == budgets[-1]["step"] < config.train.steps  # the first step (compiling) passes both
    assert set(budgets[-1]["sources"]) == set(config.data.sources)  # per source, and their mean
    assert budgets[-1]["ppl"] == pytest.approx(sum(m["ppl"] for m in budgets[-1]["sources"].values()) / 4)
    from tools import xecomla_table
    lines = xecomla_table.table(str(tmp_path)).splitlines()
    assert lines[0].startswith("| point | kjv | handbook | jargon | fortunes | mean") and len(lines) == 2 + 2 + len(budgets)
    with pytest.raises(ValueError, match="uninterrupted"):  # a resumed run's clock would restart
        x_ecomla.main(config, str(tmp_path))


def test_export_tool_refuses_a_native_mla_run_in_one_line(smoke_run, tmp_path, capsys):
    from tools import export_deepseek

    with pytest.raises(SystemExit) as stop:
        export_deepseek.main(["--workdir", smoke_run[1], "--out", str(tmp_path / "export")])
    assert stop.value.code == 2 and "target 'deepseek_v3'" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_deepseek_preset_exports_what_transformers_loads_and_the_tool_exports_the_same(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import numpy as np
    from safetensors.numpy import load_file

    from tools import export_deepseek

    config = load_config("configs/x_ecomla.py:smoke,deepseek", {"reconstruct.steps": 0})
    results = x_ecomla.main(config, str(tmp_path / "run"))
    out = export_deepseek.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    at_end, by_tool = (load_file(os.path.join(d, "model.safetensors")) for d in (results["export"], out))
    assert at_end.keys() == by_tool.keys() and all(np.array_equal(at_end[k], by_tool[k]) for k in at_end)
    student, tokenizer, step = export_deepseek.restore_student(str(tmp_path / "run"))
    ids = np.asarray([tokenizer.encode("In the beginning God created the heaven and the earth.")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(student(ids)[0])
    assert step == config.train.steps and np.abs(ours - theirs).max() <= 1e-5 * np.abs(ours).max()
    with pytest.raises(SystemExit):  # --out exists
        export_deepseek.main(["--workdir", str(tmp_path / "run"), "--out", out])
    # The evaluation tool rebuilds the student from the checkpoint and finds the run's own figures.
    from tools import eval_heldout
    figures = eval_heldout.main(["--workdir", str(tmp_path / "run"), "--batch", str(config.train.batch_size)])
    assert figures["student"] == pytest.approx({**{n: m["ppl"] for n, m in results["by_source"]["kd"].items()},
                                                "mean": results["ppl_student_kd"]}, rel=1e-5)


def test_gpu_preset_needs_a_model_directory_and_runs_smoke_sized(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path"):
        x_ecomla.main(load_config("configs/x_ecomla.py:gpu"), str(tmp_path / "gpu"))
    results = x_ecomla.main(load_config("configs/x_ecomla.py:gpu,smoke"), str(tmp_path / "smoke"))
    assert results["steps"] == 3 and results["ppl_student_kd"] > 1


@pytest.mark.parametrize("override,key", [
    ({"train.budget_minutes": (30, 15)}, "train.budget_minutes"),
    ({"reconstruct.trainable": "mlp"}, "reconstruct.trainable"),
    ({"upcycle.rope_mode": "middle"}, "upcycle.rope_mode"),
    ({"upcycle.rope_dim": 3}, "upcycle.rope_dim"),
    ({"upcycle.gqa_layers": (0, "x")}, "upcycle.gqa_layers"),
    ({"distill.trainable": "mlp"}, "distill.trainable"),
    ({"data.heldout_every": 1}, "data.heldout_every"),
    ({"model.source": "onnx"}, "model.source"),
    ({"model.num_layers": -1}, "model.num_layers"),
])
def test_bad_values_name_the_key(tmp_path, override, key):
    config = load_config("configs/x_ecomla.py:smoke", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        x_ecomla.main(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "results.json")
