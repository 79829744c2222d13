"""Config loading, validated overrides, choices, sweeps, and sections made from dataclasses."""
import dataclasses
import pathlib
from typing import Literal

import ml_collections
import pytest

from research.core.config import (ConfigError, FieldError, apply_overrides, build, check_fields,
                                  choices, get, load_config, load_sweep, override, require, section,
                                  split_override_args)
from research.unlearning.ntk_scrub import NTKScrubConfig

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
    # From Python, text for a tuple of numbers is not split: it is an error, not ("0,1",).
    with pytest.raises(ConfigError, match=r"config key 'optim.decay_boundaries' expects tuple, got '0.3'"):
        apply_overrides(load_config(CONFIG), {"optim.decay_boundaries": "0.3"})


def test_split_override_args():
    rest, overrides = split_override_args(["prog", "--config", "c.py", "--config.a.b=1", "--config.c", "x", "--workdir=w"])
    assert rest == ["prog", "--config", "c.py", "--workdir=w"]
    assert overrides == {"a.b": "1", "c": "x"}


def test_sweep_points_are_valid_overrides():
    points = load_sweep(f"{CONFIG}:smoke")
    assert len(points) == 6
    for point in points:
        apply_overrides(load_config(f"{CONFIG}:smoke"), point)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'configs/nope.py' does not exist"):
        load_config("configs/nope.py")


# ------------------------------------------------------------------ section(cls) / build(cls, config, key)

@dataclasses.dataclass(frozen=True)
class Recipe:
    """A schema as the library writes them: types, choices, defaults, checks."""
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    steps: int = 10
    sweep: tuple[float, ...] = ()
    layers: tuple[int, ...] = (0, 1)
    limit: int | None = None

    def __post_init__(self):
        check_fields(self)
        require(self, "lr", self.lr > 0, "a positive float")


def recipe_config(**values) -> ml_collections.ConfigDict:
    root = ml_collections.ConfigDict({"recipe": section(Recipe, **values)})
    root.lock()
    return root


def test_section_holds_the_defaults_and_build_gives_them_back():
    root = recipe_config(lr=0.5)
    assert root.recipe.to_dict() == {"name": "sgd", "lr": 0.5, "steps": 10, "sweep": (), "layers": (0, 1), "limit": None}
    assert build(Recipe, root, "recipe") == Recipe(lr=0.5)


def test_section_rejects_a_bad_default_when_the_config_file_loads():
    with pytest.raises(FieldError, match=r"Recipe.name = 'rmsprop' is not allowed; choose one of: sgd, adam"):
        section(Recipe, name="rmsprop")


def test_an_unknown_key_in_a_section_is_one_line_naming_it():
    root = ml_collections.ConfigDict({"recipe": section(Recipe)})
    root.recipe.stpes = 3  # a typo in a config file, before the config is locked
    with pytest.raises(ConfigError) as e:
        build(Recipe, root, "recipe")
    assert str(e.value) == ("unknown config key 'recipe.stpes' (did you mean 'recipe.steps'?); "
                            "Recipe has: name, lr, steps, sweep, layers, limit")


@pytest.mark.parametrize("key, text, message", [
    ("recipe.steps", "many", "config key 'recipe.steps' expects int, got 'many' (str)"),
    ("recipe.name", "rmsprop", "config key 'recipe.name' = 'rmsprop' is not allowed; choose one of: sgd, adam"),
    ("recipe.lr", "-1", "config key 'recipe.lr' = -1.0 is not allowed; expected a positive float"),
    ("recipe.sweep", "1,two", "config key 'recipe.sweep' = (1.0, 'two') is not allowed; expected a tuple of (a float)"),
    ("recipe.limit", "ten", "config key 'recipe.limit' = 'ten' is not allowed; expected an int or None"),
])
def test_a_wrong_type_or_a_bad_choice_is_one_line_naming_the_key(key, text, message):
    with pytest.raises(ConfigError) as e:
        build(Recipe, apply_overrides(recipe_config(), {key: text}, from_strings=True), "recipe")
    assert str(e.value) == message and "\n" not in str(e.value)


def test_tuple_overrides_parse_as_the_field_type():
    def built(text):
        return build(Recipe, apply_overrides(recipe_config(), {"recipe.sweep": text, "recipe.layers": text},
                                             from_strings=True), "recipe")
    assert built("0,1,2") == Recipe(sweep=(0.0, 1.0, 2.0), layers=(0, 1, 2))
    assert built("(3, 4)") == Recipe(sweep=(3.0, 4.0), layers=(3, 4))
    assert built("5") == Recipe(sweep=(5.0,), layers=(5,))
    assert built("") == Recipe(sweep=(), layers=())
    assert isinstance(built("0,1").sweep[0], float)
    # A tuple of names, and the real sections of the library.
    unlearning = load_config("configs/unlearning.py:smoke")
    c = apply_overrides(unlearning, {"methods": "retrain,ntk", "ntk.scale_sweep": "0,1,2"}, from_strings=True)
    assert c.methods == ("retrain", "ntk")
    assert build(NTKScrubConfig, c, "ntk").scale_sweep == (0.0, 1.0, 2.0)


def test_choices_read_the_literal_of_a_field():
    assert choices(Recipe, "name") == ("sgd", "adam")
    assert choices(NTKScrubConfig, "space") == ("auto", "samples", "parameters")


def test_every_config_section_made_from_a_dataclass_builds_back():
    from research.recipes.classify import ClassifierTrainConfig
    from research.core.optim import OptimConfig
    from research.models import ModelConfig
    from research.unlearning.recipe import TrainRecipe
    for spec, sections in [("configs/train_classifier.py", {"model": ModelConfig, "optim": OptimConfig,
                                                            "train": ClassifierTrainConfig}),
                           ("configs/unlearning.py:vit_prompts", {"ntk": NTKScrubConfig, "unlearn": TrainRecipe,
                                                                  "pretrain.optim": OptimConfig})]:
        config = load_config(spec)
        for key, cls in sections.items():
            assert dataclasses.asdict(build(cls, config, key)) == get(config, key).to_dict()


def test_override_replaces_dotted_fields_of_a_built_schema_with_the_same_checks():
    from research.unlearning.benchmark import Unlearning

    exp = Unlearning()
    changed = override(exp, {"unlearn.lr": 1, "seeds": [1, 2]})
    assert changed.unlearn.lr == 1.0 and isinstance(changed.unlearn.lr, float) and changed.seeds == (1, 2)
    assert exp.unlearn.lr == 0.01  # the original is unchanged
    with pytest.raises(ConfigError, match="unknown config key 'unlearn.lrr'"):
        override(exp, {"unlearn.lrr": 1})
    with pytest.raises(ConfigError, match="config key 'forget_fraction' = 2.0 is not allowed"):
        override(exp, {"forget_fraction": 2.0})
