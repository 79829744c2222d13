"""Full training runs to a target accuracy (marked slow: `make test-all` or `pytest -m slow`)."""
import os

import pytest

from experiments import train_classifier
from research.core.config import load_config
from research.data import sources


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_resnet20_reaches_92_percent_on_fashion_mnist(tmp_path):
    config = load_config("configs/train_classifier.py:fashion_mnist", {"train.progress": False})
    results = train_classifier.main(config, str(tmp_path))
    assert results["test_accuracy"] >= 0.92


@pytest.mark.slow
def test_resnet20_on_digits_default_run():
    config = load_config("configs/train_classifier.py", {"train.progress": False})
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        results = train_classifier.main(config, workdir)
    assert results["test_accuracy"] >= 0.98
