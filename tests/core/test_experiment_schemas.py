"""Every experiment has one typed schema, and every preset of its config file builds it back to the
same settings: the dict a run signs its records with is unchanged, so workdirs written before the
schemas still resume."""
import dataclasses
import glob
import json
import os

import pytest

from research.adapters.online_stream import OnlineLearning
from research.anytime.benchmark import Anytime
from research.backprop.finetune import EfficientFinetune
from research.core import config as config_lib
from research.multiplicity.benchmark import Multiplicity
from research.nas.benchmark import NASCorrelation, ZeroShotSearch
from research.recipes.classify import ClassifierTraining
from research.recipes.mae_train import GeneratorTraining
from research.unlearning.benchmark import Unlearning
from research.unlearning.generative_benchmark import GenerativeUnlearning
from research.upcycling.xecomla import XEcoMLA

# Presets that need a path the user gives (here any that exists).
NEEDS = {("x_ecomla", "gpu"): {"model.path": os.path.dirname(os.path.abspath(__file__))}}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMA_OF = {"unlearning": Unlearning, "online_lora": OnlineLearning, "generative_unlearning": GenerativeUnlearning,
             "train_generator": GeneratorTraining, "train_classifier": ClassifierTraining, "rashomon": Multiplicity,
             "anytime": Anytime, "nas_correlation": NASCorrelation, "zero_shot_search": ZeroShotSearch,
             "efficient_finetune": EfficientFinetune, "x_ecomla": XEcoMLA}


def test_every_config_file_has_a_schema():
    names = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))} - {"__init__"}
    assert names == set(SCHEMA_OF)


@pytest.mark.parametrize("name, cls", SCHEMA_OF.items())
def test_every_preset_builds_the_schema_back_to_the_same_settings(name, cls):
    path = os.path.join(REPO, "configs", f"{name}.py")
    for arg in (None, *config_lib.load_module(path).PRESETS):
        config = config_lib.load_config(path + (f":{arg}" if arg else ""), NEEDS.get((name, arg)))
        built = config_lib.build(cls, config)
        assert json.dumps(dataclasses.asdict(built), sort_keys=True) == json.dumps(config.to_dict(), sort_keys=True)
        assert config_lib.build(cls, config_lib.section(cls)) == cls()  # the config file starts from the defaults
