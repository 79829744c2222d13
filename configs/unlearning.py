"""Unlearning: NTK scrubbing and Fast-NTK against retraining and the standard baselines, forgetting a
whole class and a random 10% of the training set.

    python -m experiments.unlearning --config configs/unlearning.py --workdir runs/unlearning_ntk
    python -m experiments.unlearning --config configs/unlearning.py:fast_ntk --workdir runs/unlearning_fast_ntk
    python -m experiments.unlearning --config configs/unlearning.py:vit_prompts --workdir runs/unlearning_vpt
    python -m experiments.unlearning --config configs/unlearning.py:fast_ntk_effnet,five_classes \
        --config.seeds=0,1,2 --workdir runs/unlearning_effnet
    python -m experiments.unlearning --config configs/unlearning.py:smoke --workdir /tmp/smoke

Every setting trains w(D) and the retrain baseline with the reference recipe (recipe.py): mean CE +
(0.1/2)|w - w_init|^2, SGD lr 0.01, momentum 0.9, constant, batches of 128, 25 epochs, BatchNorm in
eval mode; 0.1 is also the scrub's ridge (N * 0.1). ``seeds`` repeats a run per seed and reports
mean and standard deviation.

Presets (comma-separated; ``smoke`` shrinks any of them to seconds):
  (none)       the original NTK setting (Golatkar et al. 2020): D = 5 CIFAR-10 classes x 100 images;
               a ResNet-20 pre-trained on the other 5 classes (all their sample images), then trained
               on D in all its parameters; the kernel is over every parameter.
  fast_ntk     Fast-NTK on a CNN: the same ResNet-20 architecture pre-trained on the CIFAR-100
               sample (20 coarse classes), then only its BatchNorm affine parameters and a fresh
               10-class head (``unlearn.subset``) trained on 5,000 CIFAR-10 images; the kernel is
               over those parameters alone.
  fast_ntk_effnet  Fast-NTK on an ImageNet-pretrained CNN: EfficientNet-Lite0 with the ImageNet weights
               of research/data/README.md (``backbone.source=imagenet``; no pre-training stage), its BatchNorm affine
               parameters and a fresh head trained on 5,000 CIFAR-10 images at 32 px (the paper's
               scale). The kernel is over 54,826 parameters and 50,000 outputs: the Jacobian alone is
               11 GB in float32, so on a small machine use ``five_classes``.
  vit_prompts  Fast-NTK on a ViT: a ViT pre-trained on MNIST, then visual prompts (+ head) tuned
               on 5,000 Fashion-MNIST images; the kernel is over prompts and head.
  five_classes D = classes 0-4 x 100 images (of CIFAR-10, or Fashion-MNIST for vit_prompts): the
               original setting's size, for any of the above.
  exact_theory the setting in which the linear theory is exact for a linear model: MSE to one-hot
               targets + the proximal L2, trained toward its minimum (full-batch Gauss-Newton, at
               most 50 iterations; seed_N/results.json records the gradient norm reached), scrubbed
               with s = 1 (``ntk.scale=none``) linearised at w_init.
Scenarios (``scenarios``): ``class`` forgets every training image of class ``forget_class``;
``random`` forgets a seeded ``forget_fraction`` of the training images.
"""
import ml_collections

from research.core import config as config_lib
from research.unlearning.benchmark import Unlearning

PRESETS = ("smoke", "fast_ntk", "fast_ntk_effnet", "vit_prompts", "five_classes", "exact_theory")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/unlearning.py")
    # The defaults (research/unlearning/benchmark.py) are the original NTK setting: D = 100 images of
    # each of CIFAR-10's classes 0-4, a ResNet-20 pre-trained on the other five, the reference recipe,
    # every method and both scenarios. Baseline lrs are for a model trained at unlearn.lr = 0.01; the
    # experiment multiplies them by unlearn.lr / 0.01, so they follow the training lr.
    c = config_lib.section(Unlearning)
    if "fast_ntk" in presets or "fast_ntk_effnet" in presets:  # D: a seeded draw from all of CIFAR-10
        c.data.update(classes=(), train_per_class=0, train_total=5000)
        c.unlearn.subset = "bn_and_head"
    if "fast_ntk" in presets:
        c.pretrain.update(data="cifar100_sample", classes=(), label="coarse_label")
        c.pretrain.train.update(epochs=60, eval_every_epochs=20)
    if "fast_ntk_effnet" in presets:
        c.backbone.source = "imagenet"
        c.model.name = "efficientnet_lite0"
        c.ntk.chunk_size = 32
    if "vit_prompts" in presets:
        c.data.update(name="fashion_mnist", classes=(), train_per_class=500)
        c.model.update(name="vit_tiny", depth=4, patch_size=7)
        c.pretrain.update(data="mnist", classes=(), crop_padding=0, flip=False)
        c.pretrain.optim.update(name="adamw", lr=1e-3, weight_decay=0.05, warmup_steps=100, grad_clip_norm=1.0)
        c.pretrain.train.update(epochs=2, eval_every_epochs=1)
        c.unlearn.subset = "prompts_and_head"
    if "five_classes" in presets:
        c.data.update(classes=(0, 1, 2, 3, 4), train_per_class=100, train_total=0)
    if "exact_theory" in presets:
        c.unlearn.update(loss="mse", optimizer="gauss_newton", epochs=50)
        c.ntk.update(scale="none", linearize_at="init")
    if "smoke" in presets:
        c.data.update(train_per_class=8, train_total=0)
        c.pretrain.train.update(batch_size=32, eval_batch_size=64, epochs=0, steps=3, log_every=1,
                                checkpoint_every=3, progress=False)
        c.unlearn.update(epochs=2 if c.unlearn.optimizer == "sgd" else 20, batch_size=16)
        c.ntk.chunk_size = 8
        c.eval_batch_size = 64
        c.progress = False
        if c.model.name.startswith("vit"):
            c.model.depth = 1
    return c
