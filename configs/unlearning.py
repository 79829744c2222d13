"""Unlearning: NTK scrubbing and Fast-NTK against retraining and the standard baselines, forgetting a
whole class and a random 10% of the training set.

    python -m experiments.unlearning --config configs/unlearning.py --workdir runs/unlearning_ntk
    python -m experiments.unlearning --config configs/unlearning.py:fast_ntk --workdir runs/unlearning_fast_ntk
    python -m experiments.unlearning --config configs/unlearning.py:vit_prompts --workdir runs/unlearning_vpt
    python -m experiments.unlearning --config configs/unlearning.py:smoke --workdir /tmp/smoke

Presets (comma-separated; ``smoke`` shrinks any of them to seconds):
  (none)       the original NTK setting (Golatkar et al. 2020): D = 5 CIFAR-10 classes x 100 images;
               a ResNet-20 pre-trained on the other 5 classes (all their sample images), then trained
               on D in all its parameters; the kernel is over every parameter.
  fast_ntk     Fast-NTK on a CNN: the same ResNet-20 architecture pre-trained on the CIFAR-100
               sample (20 coarse classes), then only its BatchNorm affine parameters and a fresh
               10-class head (``unlearn.subset``) trained on 5,000 CIFAR-10 images; the kernel is
               over those parameters alone.
  fast_ntk_effnet  Fast-NTK on an ImageNet-pretrained CNN: EfficientNet-Lite0 with the ImageNet weights
               of DATA.md (``backbone.source=imagenet``; no pre-training stage), its BatchNorm affine
               parameters and a fresh head trained on 2,000 CIFAR-10 images at 32 px. The kernel is over
               54,826 parameters, so it is solved in sample space (N C x N C); 2,000 images keep that
               within a 2-core, 24 GiB machine. ``--config.data.train_total=5000`` is the paper's scale
               (a 50,000 x 50,000 kernel: an accelerator's job).
  vit_prompts  Fast-NTK on a ViT: a ViT pre-trained on MNIST, then visual prompts (+ head) tuned
               on 5,000 Fashion-MNIST images; the kernel is over prompts and head.
Scenarios (``scenarios``): ``class`` forgets every training image of class ``forget_class``;
``random`` forgets a seeded ``forget_fraction`` of the training images.
"""
import ml_collections

from research.core import config as config_lib
from research.core.classify import ClassifierTrainConfig
from research.core.mesh import MeshConfig
from research.core.optim import OptimConfig
from research.models import ModelConfig
from research.unlearning import baselines
from research.unlearning.ntk_scrub import NTKScrubConfig
from research.unlearning.train import TrainRecipe

PRESETS = ("smoke", "fast_ntk", "fast_ntk_effnet", "vit_prompts")
METHODS = ("retrain", "ntk", *[m for m in baselines.BASELINES if m != "retrain"])
SCENARIOS = ("class", "random")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/unlearning.py")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.methods = METHODS               # "ntk" is Fast-NTK when unlearn.subset is not "all"
    c.scenarios = SCENARIOS
    c.forget_class = 0                # index among the classes of D
    c.forget_fraction = 0.1

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10_sample"
    c.data.source = "auto"            # auto | offline | hub
    c.data.data_dir = ""              # folder with cifar/*.npz ("" = $RESEARCH_DATA_DIR)
    c.data.classes = (0, 1, 2, 3, 4)  # classes of D (() = all)
    c.data.train_per_class = 100      # images per class in D (0 = all)
    c.data.train_total = 0            # > 0: cap D at this many images (seeded), after train_per_class
    c.data.image_size = 0             # backbone.source=imagenet: resize to this side on the device (0 = as stored)

    c.backbone = ml_collections.ConfigDict()
    c.backbone.source = "pretrain"    # pretrain: the stage below; imagenet: EfficientNet-Lite0's ImageNet weights
    c.backbone.weights = ""           # imagenet: "" = the installed weights package, or a converted orbax folder

    c.model = config_lib.section(ModelConfig)

    # Pre-training of the backbone on data disjoint from D.
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.data = "cifar10_sample"
    c.pretrain.classes = (5, 6, 7, 8, 9)  # () = all classes of pretrain.data
    c.pretrain.label = "label"        # label column (cifar100_sample also has "coarse_label")
    c.pretrain.workdir = ""           # "" = WORKDIR/pretrain; another run's folder reuses its checkpoint
    c.pretrain.crop_padding = 4
    c.pretrain.flip = True
    c.pretrain.optim = config_lib.section(OptimConfig, lr=0.1, warmup_steps=50)
    c.pretrain.train = config_lib.section(ClassifierTrainConfig, eval_batch_size=500, eval_every_epochs=10)

    # Training on D (the model to unlearn) and the retrain baseline on D_r: the same recipe.
    c.unlearn = config_lib.section(TrainRecipe, epochs=30)
    c.ntk = config_lib.section(NTKScrubConfig)  # weight_decay None: the ridge uses unlearn.weight_decay

    # Every baseline's hyperparameters (defaults and their sources: research/unlearning/baselines.py).
    # Their learning rates are for a model trained at unlearn.lr = 0.01; the experiment multiplies them by
    # unlearn.lr / 0.01, so they follow the training lr.
    c.baselines = ml_collections.ConfigDict({name: baselines.hyperparameters(name)
                                             for name in baselines.BASELINES if name != "retrain"})

    c.eval_batch_size = 500
    c.progress = True
    c.mesh = config_lib.section(MeshConfig)

    if "fast_ntk" in presets or "fast_ntk_effnet" in presets:  # D: a seeded draw from all of CIFAR-10
        c.data.update(classes=(), train_per_class=0, train_total=5000)
        c.unlearn.subset = "bn_and_head"
    if "fast_ntk" in presets:
        c.pretrain.update(data="cifar100_sample", classes=(), label="coarse_label")
        c.pretrain.train.update(epochs=60, eval_every_epochs=20)
    if "fast_ntk_effnet" in presets:
        c.data.train_total = 2000
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
    if any(p in presets for p in ("fast_ntk", "fast_ntk_effnet", "vit_prompts")):
        # A few thousand parameters from a fresh head: a larger lr, fewer epochs, larger batches.
        c.unlearn.update(lr=0.05, epochs=10, batch_size=128)
    if "smoke" in presets:
        c.data.update(train_per_class=8, train_total=0)
        c.pretrain.train.update(batch_size=32, eval_batch_size=64, epochs=0, steps=3, log_every=1,
                                checkpoint_every=3, progress=False)
        c.unlearn.update(epochs=2, batch_size=16)
        c.ntk.chunk_size = 8
        c.eval_batch_size = 64
        c.progress = False
        if c.model.name.startswith("vit"):
            c.model.depth = 1
    return c
