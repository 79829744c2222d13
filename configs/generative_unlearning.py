"""Unlearning for an image-to-image generator: forget classes 0-4, keep 5-9, by training the
encoder alone (research/unlearning/generative.py), against four baselines.

    python -m experiments.generative_unlearning --config configs/generative_unlearning.py --workdir runs/gen_unlearn_fmnist
    python -m experiments.generative_unlearning --config configs/generative_unlearning.py:cifar10 --workdir runs/gen_unlearn_cifar10
    python -m experiments.generative_unlearning --config configs/generative_unlearning.py:smoke --workdir /tmp/smoke

Presets (comma-separated; ``smoke`` shrinks any of them to seconds):
  (none)   Fashion-MNIST (padded to 32 x 32); the proxy retain set is MNIST.
  cifar10  the CIFAR-10 sample; the proxy retain set is the CIFAR-100 sample.
The generator is ``generator`` (configs/train_generator.py's config, same presets): trained in
WORKDIR/generator unless ``generator.workdir`` names a finished run of experiments/train_generator.
Rows: the original generator; ours at every ``alphas``; ours with the proxy retain set (at
``proxy.alpha``); each of ``baselines`` (at ``unlearn.alpha``, or at every ``baseline_alphas``); and
for each of ``target_rows``, no training but every image's output as if that method's forget target
were reached exactly (the objective's ceiling). Metrics on ``eval.images_per_set`` test images of
the retain and of the forget classes, centre 25% inpainting (``eval.masks``).
"""
import ml_collections

from configs import train_generator
from research.core import config as config_lib
from research.unlearning.generative_benchmark import GenerativeUnlearning

PRESETS = ("smoke", "cifar10")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/generative_unlearning.py")
    # The defaults (research/unlearning/generative_benchmark.py): forget Fashion-MNIST's classes 0-4,
    # keep 5-9; ours at five alphas, four baselines, two target rows, MNIST as the proxy retain set;
    # 500 test images per set under the centre mask.
    c = config_lib.section(GenerativeUnlearning)
    train_generator.apply_presets(c.generator, [p for p in presets if p in train_generator.PRESETS])
    if "cifar10" in presets:
        c.proxy.name = "cifar100_sample"
    if "smoke" in presets:
        c.alphas = (0.2,)
        c.unlearn.update(steps=3, batch_size=8, warmup_steps=1)
        c.eval.update(images_per_set=16, tsne_points=8)
        c.progress = False
    return c
