"""Predictive multiplicity: the Rashomon set of a trained classifier explored by inference-time
dropout, against re-training with other seeds and adversarial weight perturbation (AWP).

    python -m experiments.rashomon --config configs/rashomon.py --workdir runs/rashomon_tabular
    python -m experiments.rashomon --config configs/rashomon.py:fashion_mnist --workdir runs/rashomon_fmnist
    python -m experiments.rashomon --config configs/rashomon.py:cifar10 --workdir runs/rashomon_cifar10
    python -m experiments.rashomon --config configs/rashomon.py:smoke --workdir /tmp/smoke

Presets (comma-separated; ``smoke`` shrinks any of them to seconds):
  (none)         tabular: an MLP (64, 64) on scikit-learn's breast-cancer data (455 train / 114 test
                 rows); dropout grid 20 rates in (0, 0.2] x 100 masks, eps in linspace(0, 0.04, 11) (the paper's
                 tabular grid), 10 re-training seeds, AWP on every test point.
  fashion_mnist  an MLP (256, 128) on 10,000 Fashion-MNIST training images, evaluated on 1,000 test
                 images; 5 rates in (0, 0.1] x 50 masks, 10 re-training seeds, AWP on 20 test points.
  cifar10        ResNet-20 on the CIFAR-10 training sample, evaluated on 500 test images; 5 rates in
                 (0, 0.05] x 50 masks, eps in linspace(0, 0.05, 6) (the paper's CIFAR grid), 5 re-training seeds,
                 AWP on 5 test points.
The Rashomon set is measured on the evaluation (test) points: R(eps) = models whose mean
cross-entropy there is within eps of the reference model's.
"""
import ml_collections

from research.core import config as config_lib
from research.core.optim import OptimConfig
from research.models import ModelConfig
from research.multiplicity.benchmark import Multiplicity, eps_grid

PRESETS = ("smoke", "fashion_mnist", "cifar10")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/rashomon.py")
    # The defaults (research/multiplicity/benchmark.py): an MLP (64, 64) on breast cancer, Adam;
    # 20 dropout rates up to 0.2 x 100 models, 10 re-trained models, AWP on every point.
    c = config_lib.section(Multiplicity)

    for preset in presets:
        if preset == "fashion_mnist":
            c.data.name, c.data.train_limit, c.data.eval_limit = "fashion_mnist", 10_000, 1_000
            c.model.hidden_sizes = (256, 128)
            c.train.update(batch_size=128, epochs=5)
            c.rashomon.update(max_rate=0.1, num_rates=5, models_per_rate=50,
                              epsilons=eps_grid(0.05, 6))
            c.awp.points = 20
        elif preset == "cifar10":
            c.data.name, c.data.eval_limit = "cifar10_sample", 500
            c.model = config_lib.section(ModelConfig, name="resnet20")
            c.optim = config_lib.section(OptimConfig, name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
            c.train.update(batch_size=128, epochs=8)
            c.retrain_seeds = (1, 2, 3, 4, 5)
            c.rashomon.update(max_rate=0.05, num_rates=5, models_per_rate=50,
                              epsilons=eps_grid(0.05, 6), models_per_chunk=10, batch_size=250)
            c.awp.update(points=5, steps=10, step_size=1e-4, targets_per_chunk=2)  # 1e-3 left every set at step 1
    if "smoke" in presets:
        c.data.train_limit = min(c.data.train_limit or 256, 256)
        c.data.eval_limit = min(c.data.eval_limit or 64, 64)
        c.train.update(epochs=0, steps=6, batch_size=32, eval_batch_size=64, progress=False)
        c.model.hidden_sizes = (16,)
        c.retrain_seeds = (1, 2)
        c.rashomon.update(num_rates=3, models_per_rate=4, models_per_chunk=4, batch_size=64)
        c.awp.update(points=2, steps=2)
        c.progress = False
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Five reference seeds, each with its own re-training seeds, for the spread of every figure:

    python -m tools.sweep --experiment rashomon --config configs/rashomon.py[:PRESET] --workdir runs/rashomon_seeds
    python -m tools.sweep_stats runs/rashomon_seeds 'methods.*.by_eps.-1.ambiguity' 'speedup_per_model.*'
    """
    n = len(get_config(arg).retrain_seeds)
    return [{"seed": s, "retrain_seeds": tuple(100 * (s + 1) + i for i in range(n))} for s in range(5)]
