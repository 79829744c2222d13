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
from research.core.mesh import MeshConfig
from research.unlearning.generative import GenerativeUnlearnConfig

PRESETS = ("smoke", "cifar10")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/generative_unlearning.py")
    c = ml_collections.ConfigDict()
    c.seeds = (0,)                         # the unlearning runs repeat per seed; the generator is shared
    c.forget_classes = (0, 1, 2, 3, 4)
    c.retain_classes = (5, 6, 7, 8, 9)
    c.alphas = (0.05, 0.1, 0.2, 0.5, 1.0)  # ours: the forget term's weight
    c.baselines = ("max_loss", "noisy_label", "retain_label", "random_encoder")  # () = none
    c.target_rows = ("ours", "noisy_label")  # rows without training: each image's output as if that method's
                                           # forget target were reached exactly (its ceiling); () = none
    c.baseline_alphas = ()                 # each baseline also at these alphas ("NAME (alpha A)" rows): the
                                           # baselines' own trade-off, to compare at matched retain FID

    c.generator = train_generator.get_config(",".join(p for p in presets if p in train_generator.PRESETS))
    c.generator.workdir = ""               # "" = WORKDIR/generator (trained there when missing)

    c.unlearn = config_lib.section(GenerativeUnlearnConfig)
    c.proxy = ml_collections.ConfigDict()
    c.proxy.name = "mnist"                 # images used as D_r instead of the retain classes ("" = no such row)
    c.proxy.alpha = 0.2

    c.eval = ml_collections.ConfigDict()
    c.eval.images_per_set = 500            # test images of the retain classes, and of the forget classes
    c.eval.masks = ("center",)             # center | outpaint | center_box (the centre box alone): a block of
                                           # metrics per view
    c.eval.image_size = 64                 # EfficientNet-Lite0's input side for FID / IS / cosine
    c.eval.weights = ""                    # "" = the installed ImageNet weights package, or a converted folder
    c.eval.tsne_points = 200               # per set and row in the 2-D embedding plot (0 = no plot)
    c.progress = True
    c.mesh = config_lib.section(MeshConfig)

    if "cifar10" in presets:
        c.proxy.name = "cifar100_sample"
    if "smoke" in presets:
        c.alphas = (0.2,)
        c.unlearn.update(steps=3, batch_size=8, warmup_steps=1)
        c.eval.update(images_per_set=16, tsne_points=8)
        c.progress = False
    return c
