"""Train an image classifier (any model of research.models on any image data set).

    python -m experiments.train_classifier --config configs/train_classifier.py --workdir runs/digits
    python -m experiments.train_classifier --config configs/train_classifier.py:fashion_mnist --workdir runs/fmnist
    python -m experiments.train_classifier --config configs/train_classifier.py:cifar10_sample_vit --workdir runs/vit
    python -m experiments.train_classifier --config configs/train_classifier.py:smoke --workdir /tmp/smoke

ARG is a comma-separated list of presets (`fashion_mnist,smoke`); `smoke` shrinks any preset to a
few seconds. Every field can be overridden: `--config.model.name=mobilenet_v2 --config.optim.lr=0.05`.
Presets:
  (none)              ResNet-20 on scikit-learn's digits (embedded data, about a minute)
  fashion_mnist       ResNet-20 on Fashion-MNIST, 15 epochs
  cifar10_sample      ResNet-20 on the 5,170-image CIFAR-10 training sample, 40 epochs
  cifar10_sample_vit  ViT-tiny (patch 4) on the same sample, AdamW, 20 epochs
"""
import ml_collections

from research.core import config as config_lib
from research.recipes.classify import ClassifierTraining

PRESETS = ("smoke", "fashion_mnist", "cifar10_sample", "cifar10_sample_vit")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/train_classifier.py")
    # The defaults (research/recipes/classify.py): a ResNet-20 on the embedded digits, SGD.
    c = config_lib.section(ClassifierTraining)

    for preset in presets:
        if preset == "fashion_mnist":
            c.data.name = "fashion_mnist"
            c.data.crop_padding = 2
            c.train.epochs = 15
            c.train.log_every = 100
            c.train.checkpoint_every = 1000
        elif preset == "cifar10_sample":
            c.data.name = "cifar10_sample"
            c.data.crop_padding, c.data.flip = 4, True
            c.train.epochs = 40
        elif preset == "cifar10_sample_vit":
            c.data.name = "cifar10_sample"
            c.data.crop_padding, c.data.flip = 4, True
            c.model.name = "vit_tiny"
            c.optim.update(name="adamw", lr=1e-3, weight_decay=0.05, warmup_steps=100, grad_clip_norm=1.0)
            c.train.label_smoothing = 0.1
            c.train.epochs = 20
    if "smoke" in presets:
        c.data.train_limit = 256
        c.train.batch_size = 32
        c.train.eval_batch_size = 64
        c.train.epochs = 0
        c.train.steps = 6
        c.train.log_every = 2
        c.train.checkpoint_every = 3
        c.train.progress = False
        c.model.hidden_sizes = (32,)
        c.model.width_multiplier = 0.25 if c.model.name == "mobilenet_v2" else c.model.width_multiplier
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Learning rate x model (6 points), e.g. `python -m tools.sweep --experiment train_classifier --config configs/train_classifier.py:smoke --workdir runs/sweep`."""
    return [{"optim.lr": lr, "model.name": model} for model in ("resnet20", "mlp") for lr in (0.02, 0.05, 0.1)]
