"""The held-out selection's settings and its choice of learning rate."""
import numpy as np
import pytest

from research.adapters.selection import SelectionConfig, best_lr
from research.core.config import ConfigError, FieldError, build, section


def test_the_best_held_out_score_wins_and_a_tie_goes_to_the_smaller_lr_in_any_order():
    assert best_lr({1e-4: 0.30, 2e-4: 0.35, 3e-4: 0.31}) == 2e-4
    assert best_lr({3e-4: 0.35, 1e-4: 0.35, 2e-4: 0.20}) == 1e-4
    assert best_lr({1e-4: 0.35, 3e-4: 0.35}) == 1e-4
    with pytest.raises(ValueError, match="no selection pass"):
        best_lr({})


def test_every_class_must_keep_training_images_outside_the_held_out_slice():
    labels = np.repeat(np.arange(3), [10, 6, 10])
    SelectionConfig(lrs=(1e-4,), holdout_per_class=5).check_holdout(labels, 3)
    with pytest.raises(FieldError, match=r"holdout_per_class .*smallest class's 6 training images"):
        SelectionConfig(lrs=(1e-4,), holdout_per_class=6).check_holdout(labels, 3)
    with pytest.raises(FieldError, match="smallest class's 0"):  # a class with no images at all
        SelectionConfig(lrs=(1e-4,), holdout_per_class=1).check_holdout(labels, 4)
    SelectionConfig(holdout_per_class=60).check_holdout(labels, 3)  # no lrs: nothing is held out


@pytest.mark.parametrize("values, key", [({"lrs": (1e-4, 0.0)}, "select.lrs"),
                                         ({"holdout_per_class": 0}, "select.holdout_per_class"),
                                         ({"calibrate": True}, "select.calibrate")])
def test_a_bad_select_value_is_one_config_error_naming_its_key(values, key):
    node = {**section(SelectionConfig).to_dict(), **values}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(SelectionConfig, {"select": node}, "select")
