"""tools/online_lora_table: mean ± sd per method over the seeds of a sweep, the learning accuracy from
the task-end matrix, and Online-LoRA against the other methods across and within seeds."""
import json

import pytest

from tools import online_lora_table


def write_record(folder, method, avg_acc, diagonal=(0.5, 0.5), signature=None, **more):
    (folder / "methods").mkdir(parents=True, exist_ok=True)
    accs = [[diagonal[0], 0.0], [0.25, diagonal[1]]]
    result = {"avg_acc": avg_acc, "forgetting": 0.1, "avg_acc_task_il": 0.8, "forgetting_task_il": 0.0,
              "ncm_acc": 0.75, "task_end_accs": accs, "n_plateaus": 2, "seconds": 100.0, **more}
    (folder / "methods" / f"{method}.json").write_text(json.dumps({"signature": signature or {}, "result": result}))


def test_the_table_gives_mean_sd_learning_accuracy_and_paired_differences(tmp_path, capsys):
    write_record(tmp_path / "000", "online_lora", 0.30, diagonal=(0.2, 0.4))
    write_record(tmp_path / "000", "lora", 0.20)
    write_record(tmp_path / "001", "online_lora", 0.40, diagonal=(0.4, 0.6))
    write_record(tmp_path / "001", "lora", 0.35)
    write_record(tmp_path / "001", "er", 0.60)  # replay: a row, but no comparison
    assert online_lora_table.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # online_lora: avg 35 ± 7.07; learning acc = mean of the diagonals 0.3 and 0.5 -> 40 ± 14.14
    assert lines[4] == ("| Online-LoRA | 2 | 35.00 ± 7.07 | 10.00 ± 0.00 | 40.00 ± 14.14 | 80.00 ± 0.00 | 0.00 ± 0.00 "
                        "| 75.00 ± 0.00 | 2.0 ± 0.0 | 100 ± 0 |")
    assert lines[5].startswith("| LoRA (no regularisation) | 2 | 27.50 ± 10.61 |")
    assert lines[6].startswith("| experience replay | 1 | 60.00 ± 0.00 |")
    # across: (35 - 27.5) / 10.61 = 0.7 sd; within: +10 and +5
    assert lines[-1] == "| LoRA (no regularisation) | +7.50 (+0.7 sd) | +7.50 ± 3.54 | 2/2 | +0.00 ± 0.00 |"
    assert (tmp_path / "online_lora_table.md").read_text().splitlines() == lines
    # a seed's results.json adds the bound of the pre-trained features
    (tmp_path / "000" / "results.json").write_text(json.dumps({"ncm_backbone": 0.8}))
    (tmp_path / "001" / "results.json").write_text(json.dumps({"ncm_backbone": 0.9}))
    online_lora_table.main([str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[-1] == (
        "Nearest-class-mean accuracy of the pre-trained features: 85.00 ± 7.07% over 2 seeds")


def test_a_folder_without_records_fails_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no DIR/\\*/methods/\\*.json"):
        online_lora_table.main([str(tmp_path)])


def test_a_si_blurry_sweep_adds_a_auc_a_last_and_the_lr_each_record_ran_at(tmp_path, capsys):
    for seed, (ours, theirs) in enumerate([(0.5, 0.3), (0.7, 0.4)]):
        folder = tmp_path / f"00{seed}"
        write_record(folder, "online_lora", 0.3, signature={"online_lora": {"lr": 3e-4}}, a_auc=ours, a_last=0.2,
                     forgetting=0.1)
        write_record(folder, "sequential_ft", 0.3, signature={"baselines": {"lr": 1e-4 * (seed + 1)}}, a_auc=theirs,
                     a_last=0.1, forgetting=0.4)
    online_lora_table.main([str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    head = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert head[-5:] == ["A_auc", "A_last", "lr", "plateaus", "train s"]
    assert [c.strip() for c in lines[4].split("|")[1:-1]][-5:-3] == ["60.00 ± 14.14", "20.00 ± 0.00"]
    assert lines[4].split("|")[-4].strip() == "0.0003"
    assert lines[5].split("|")[-4].strip() == "0.0001/0.0002"  # each seed's own choice
    # A_auc: +20 and +30 (across: 25 / 14.14 = 1.8 sd); A_last +10 in both; forgetting 0.1 - 0.4
    assert lines[-1] == ("| sequential fine-tuning | +0.00 | +0.00 ± 0.00 | 0/2 | +25.00 (+1.8 sd) | +25.00 ± 7.07 "
                         "| 2/2 | +10.00 | +10.00 ± 0.00 | 2/2 | -30.00 ± 0.00 |")


def test_versus_compares_the_named_method_with_every_other_method_without_replay(tmp_path, capsys):
    for seed, (official, ours, theirs) in enumerate([(0.5, 0.4, 0.3), (0.6, 0.3, 0.4)]):
        write_record(tmp_path / f"00{seed}", "online_lora_batches", official)
        write_record(tmp_path / f"00{seed}", "online_lora", ours)
        write_record(tmp_path / f"00{seed}", "lora", theirs)
    online_lora_table.main([str(tmp_path), "--versus", "online_lora_batches"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[8].startswith("Online-LoRA, buffer of whole batches minus each method without replay")
    # official - ours: +10 and +30 (mean 20 ± 14.14, across 20 / 7.07 = 2.8 sd); official - lora: +20 and +20
    assert lines[-2] == "| Online-LoRA | +20.00 (+2.8 sd) | +20.00 ± 14.14 | 2/2 | +0.00 ± 0.00 |"
    assert lines[-1] == "| LoRA (no regularisation) | +20.00 (+2.8 sd) | +20.00 ± 0.00 | 2/2 | +0.00 ± 0.00 |"
    with pytest.raises(SystemExit):
        online_lora_table.main([str(tmp_path), "--versus", "er"])  # replay is not a method without replay
    with pytest.raises(SystemExit, match="--versus online_ewc: no .*online_ewc.json"):
        online_lora_table.main([str(tmp_path), "--versus", "online_ewc"])  # no records of it
