"""Anytime networks (TIPS): a ResNet supernet of several widths and skippable blocks, trained by the
sandwich rule with uniform or TPS-biased subnetwork sampling, evaluated at FLOPs budgets.

    python -m experiments.anytime --config configs/anytime.py --workdir runs/anytime_cifar10
    python -m experiments.anytime --config configs/anytime.py:fashion_mnist --workdir runs/anytime_fmnist
    python -m experiments.anytime --config configs/anytime.py:smoke --workdir /tmp/smoke
    python -m tools.sweep --experiment anytime --config configs/anytime.py --workdir runs/anytime_seeds

Presets (comma-separated; ``smoke`` shrinks any of them to seconds):
  (none)         ResNet-20 on the CIFAR-10 sample (500 training images held out to choose the
                 subnetwork of each budget), 15 epochs per sampler.
  fashion_mnist  ResNet-20 on 10,000 Fashion-MNIST training images (500 held out), 5 epochs.
Each sampler of ``samplers`` trains its own supernet from the same initialisation (seed ``seed``).
The sweep runs seeds 0-4.
"""
import ml_collections

from research.anytime.benchmark import Anytime
from research.core import config as config_lib

PRESETS = ("smoke", "fashion_mnist")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/anytime.py")
    # The defaults (research/anytime/benchmark.py): a ResNet-20 supernet on the CIFAR-10 sample (500
    # training images pick the subnetworks), SGD for 15 epochs, the uniform and the TPS sampler.
    c = config_lib.section(Anytime)

    for preset in presets:
        if preset == "fashion_mnist":
            c.data.name, c.data.train_limit = "fashion_mnist", 10_500
            c.train.epochs = 5
    if "smoke" in presets:
        c.data.train_limit, c.data.val_size, c.data.eval_limit = 192, 64, 64
        c.train.update(epochs=0, steps=3, batch_size=32, log_every=1, checkpoint_every=0, progress=False)
        c.sandwich.num_sampled = 1
        c.sampler.widths = (0.5, 1.0)  # 6 candidate subnetworks to evaluate instead of 12
        c.eval.update(calibration_batches=2, batch_size=64)
        c.progress = False
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Five seeds (each trains both samplers from its own initialisation)."""
    return [{"seed": s} for s in range(5)]
