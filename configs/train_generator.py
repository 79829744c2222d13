"""A masked-autoencoder generator (research/models/mae.py) trained for inpainting and outpainting.

    python -m experiments.train_generator --config configs/train_generator.py --workdir runs/generator_fmnist
    python -m experiments.train_generator --config configs/train_generator.py:cifar10 --workdir runs/generator_cifar10
    python -m experiments.train_generator --config configs/train_generator.py:smoke --workdir /tmp/smoke

Presets (comma-separated; ``smoke`` shrinks any of them to seconds):
  (none)   Fashion-MNIST, all 60,000 training images padded to 32 x 32 (an 8 x 8 grid of 4 x 4
           patches), 2 epochs.
  cifar10  the CIFAR-10 sample (5,170 training images), horizontal flips, 30 epochs.
Masks: per image a centre 25% box, a 2-token border (outpainting) or a random 25-75% of the
tokens. The generator is the starting point of experiments/generative_unlearning.py.
"""
import ml_collections

from research.core import config as config_lib
from research.recipes.mae_train import GeneratorTraining

PRESETS = ("smoke", "cifar10")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/train_generator.py")
    # The defaults (research/recipes/mae_train.py): Fashion-MNIST padded to 32 x 32, the MAE, AdamW
    # lr 1e-3 for 2 epochs in batches of 128.
    c = config_lib.section(GeneratorTraining)
    return apply_presets(c, presets)


def apply_presets(c: ml_collections.ConfigDict, presets: list[str]) -> ml_collections.ConfigDict:
    """The presets of this file on a generator's settings ``c`` (here, or another experiment's stage)."""
    if "cifar10" in presets:
        c.data.update(name="cifar10_sample", flip=True)
        c.train.update(epochs=30, eval_every_epochs=10)
    if "smoke" in presets:
        c.data.update(train_limit=64, test_limit=64)
        c.model.update(dim=32, depth=1, mlp_dim=64, decoder_dim=32, decoder_depth=1)
        c.optim.warmup_steps = 1
        c.train.update(batch_size=16, eval_batch_size=64, epochs=0, steps=3, log_every=1, checkpoint_every=3,
                       progress=False)
    return c
