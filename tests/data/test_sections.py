"""Each experiment's ``data`` section is a library dataclass: the config files make their sections
from it, a bad value is one line naming the key before any data is read, and it loads what
`sources.load` loads."""
import dataclasses
import glob
import os

import numpy as np
import pytest

from research.core import config as config_lib
from research.data import pipeline, sources
from research.adapters.online_stream import StreamData
from research.anytime.train import AnytimeData
from research.multiplicity.benchmark import RashomonData
from research.recipes.classify import ClassifierData, FinetuneData
from research.recipes.mae_train import GeneratorData
from research.unlearning.benchmark import UnlearningData

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTION_OF = {"train_classifier": ClassifierData, "efficient_finetune": FinetuneData,
              "anytime": AnytimeData, "rashomon": RashomonData, "online_lora": StreamData,
              "unlearning": UnlearningData, "train_generator": GeneratorData}


@pytest.mark.parametrize("name, cls", SECTION_OF.items())
def test_every_preset_of_a_config_builds_its_data_section(name, cls):
    path = os.path.join(REPO, "configs", f"{name}.py")
    for arg in (None, *config_lib.load_module(path).PRESETS):
        config = config_lib.load_config(path + (f":{arg}" if arg else ""))
        section = config_lib.build(cls, config, "data")
        assert dataclasses.asdict(section) == config.data.to_dict()


@pytest.mark.parametrize("cls, values, message", [
    (ClassifierData, {"name": "imagenet"}, "config key 'data.name' = 'imagenet' is not allowed; choose one of: digits"),
    (ClassifierData, {"source": "web"}, "config key 'data.source' = 'web' is not allowed; choose one of: auto, offline, hub"),
    (ClassifierData, {"crop_padding": -1}, "config key 'data.crop_padding' = -1 is not allowed; expected an int >= 0"),
    (StreamData, {"image_size": -32}, "config key 'data.image_size' = -32 is not allowed"),
    (UnlearningData, {"classes": "0,1"}, "config key 'data.classes' = '0,1' is not allowed; expected a tuple"),
    (AnytimeData, {"val_size": 0}, "config key 'data.val_size' = 0 is not allowed; expected an int >= 1"),
    (GeneratorData, {"flips": True}, "unknown config key 'data.flips' (did you mean 'data.flip'?)"),
    (FinetuneData, {"split": "random"}, "config key 'data.split' = 'random' is not allowed; choose one of: classes, samples"),
])
def test_a_bad_value_is_one_line_naming_the_key(cls, values, message):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.build(cls, {"data": values}, "data")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_only_the_rashomon_section_takes_a_tabular_data_set():
    assert config_lib.build(RashomonData, {"data": {"name": "breast_cancer"}}, "data").name == "breast_cancer"
    with pytest.raises(config_lib.ConfigError, match="'data.name' = 'breast_cancer'"):
        config_lib.build(ClassifierData, {"data": {"name": "breast_cancer"}}, "data")


def test_splits_are_the_sources_arrays_and_first_keeps_a_prefix():
    train, test = ClassifierData(name="digits").splits()
    ds = sources.load("digits")
    expected = pipeline.to_arrays(ds["train"])
    np.testing.assert_array_equal(train.images, expected.images)
    np.testing.assert_array_equal(test.labels, pipeline.to_arrays(ds["test"]).labels)
    assert train.first(0) is train and len(train.first(10)) == 10
    np.testing.assert_array_equal(train.first(10).labels, expected.labels[:10])


def test_a_data_dir_that_does_not_exist_is_named(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(config_lib.PathNotFoundError, match="data.data_dir .*nope' does not exist"):
        AnytimeData(data_dir=missing).splits()


def test_every_experiment_data_section_is_listed():
    """A config file whose data section is a plain ConfigDict again would go unchecked."""
    plain = [p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
             if "c.data = ml_collections.ConfigDict()" in open(p).read()]
    assert {os.path.basename(p) for p in plain} <= {"nas_correlation.py", "zero_shot_search.py"}
