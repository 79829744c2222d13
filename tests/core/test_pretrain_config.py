"""The ``pretrain`` section (`PretrainConfig`) nests the classifier's optim and train sections: a bad
value anywhere in it, or a class its data set does not have, is one line naming the full key."""
import pytest

from research.core import config as config_lib
from research.recipes.classify import PretrainConfig
from research.core.optim import OptimConfig
from research.unlearning.benchmark import UnlearningData


def test_the_section_builds_back_with_its_nested_optim_and_train():
    section = config_lib.section(PretrainConfig, data="cifar10_sample", classes=(5, 6), optim=dict(lr=0.1),
                                 train=dict(epochs=3))
    built = config_lib.build(PretrainConfig, {"pretrain": section}, "pretrain")
    assert built.optim == OptimConfig(lr=0.1) and built.train.epochs == 3 and built.classes == (5, 6)


@pytest.mark.parametrize("values, message", [
    ({"data": "imagenet"}, "config key 'pretrain.data' = 'imagenet' is not allowed; choose one of: digits"),
    ({"crop_padding": -4}, "config key 'pretrain.crop_padding' = -4 is not allowed; expected an int >= 0"),
    ({"optim": {"name": "lion"}}, "config key 'pretrain.optim.name' = 'lion' is not allowed"),
    ({"train": {"batch_sise": 8}}, "unknown config key 'pretrain.train.batch_sise' (did you mean 'pretrain.train.batch_size'?)"),
])
def test_a_bad_value_names_its_full_key(values, message):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.build(PretrainConfig, {"pretrain": values}, "pretrain")
    assert str(e.value).startswith(message)


def test_a_class_the_data_set_lacks_names_the_key():
    with pytest.raises(config_lib.ConfigError, match=r"config key 'pretrain.classes': classes \[12\] do not exist "
                                                     r"in digits \(10 classes\)"):
        UnlearningData(name="digits").splits("digits", classes=(3, 12), key="pretrain.classes")
    train, test = UnlearningData(name="digits").splits(classes=(7, 3))
    assert train.label_names == ("7", "3") and set(train.labels) == {0, 1} and set(test.labels) == {0, 1}
