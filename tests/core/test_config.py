"""Config loading, validated overrides, choices and sweeps."""
import pathlib

import pytest

from research.core.config import (ConfigError, apply_overrides, check, check_choice, load_config, load_sweep,
                                  split_override_args)

CONFIG = "configs/train_classifier.py"
WITH_PRESETS = sorted(str(p) for p in pathlib.Path("configs").glob("*.py") if "PRESETS" in p.read_text())


def test_presets_and_overrides_apply():
    c = load_config(f"{CONFIG}:fashion_mnist,smoke", {"optim.lr": 0.05, "model.name": "mlp"})
    assert (c.data.name, c.train.steps, c.optim.lr, c.model.name) == ("fashion_mnist", 6, 0.05, "mlp")


@pytest.mark.parametrize("config_file", WITH_PRESETS)
def test_unknown_preset_names_the_file_and_the_allowed_ones(config_file):
    with pytest.raises(ConfigError, match=rf"unknown preset\(s\) \['smok'\] for {config_file}; choose from: .*smoke"):
        load_config(f"{config_file}:smok")


def test_command_line_strings_are_parsed_by_the_type_of_the_field():
    c = apply_overrides(load_config(CONFIG), {"optim.lr": "1", "train.progress": "false",
                                              "model.hidden_sizes": "(8, 4)", "model.name": "vit_tiny",
                                              "optim.decay_boundaries": "0.3"}, from_strings=True)
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.train.progress is False
    assert c.model.hidden_sizes == (8, 4)
    assert c.optim.decay_boundaries == (0.3,)
    # A string field keeps the text, even when it reads as a literal.
    c = apply_overrides(load_config(CONFIG), {"data.data_dir": "0,1", "model.name": "2024"}, from_strings=True)
    assert (c.data.data_dir, c.model.name) == ("0,1", "2024")


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\); keys at 'optim': .*lr"):
        apply_overrides(load_config(CONFIG), {"optim.lrr": 0.1})


def test_wrong_type_names_the_key_and_the_expected_type():
    with pytest.raises(ConfigError, match=r"config key 'train.batch_size' expects int, got 'big' \(str\)"):
        apply_overrides(load_config(CONFIG), {"train.batch_size": "big"}, from_strings=True)
    with pytest.raises(ConfigError, match=r"expects int, got 1.5"):
        apply_overrides(load_config(CONFIG), {"train.batch_size": 1.5})


def test_choice_and_predicate_checks():
    c = apply_overrides(load_config(CONFIG), {"model.name": "resnet99"})
    with pytest.raises(ConfigError, match=r"'model.name' = 'resnet99' is not allowed; choose one of: a, b"):
        check_choice(c, "model.name", ["a", "b"])
    with pytest.raises(ConfigError, match=r"'train.batch_size' = 128 is not allowed; expected odd"):
        check(c, "train.batch_size", lambda v: v % 2 == 1, "odd")


def test_split_override_args():
    rest, overrides = split_override_args(["prog", "--config", "c.py", "--config.a.b=1", "--config.c", "x", "--workdir=w"])
    assert rest == ["prog", "--config", "c.py", "--workdir=w"]
    assert overrides == {"a.b": "1", "c": "x"}


def test_sweep_points_are_valid_overrides():
    points = load_sweep(f"{CONFIG}:smoke")
    assert len(points) == 4
    for point in points:
        apply_overrides(load_config(f"{CONFIG}:smoke"), point)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'configs/nope.py' does not exist"):
        load_config("configs/nope.py")
