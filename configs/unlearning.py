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
from research.core import optim
from research.unlearning import baselines

PRESETS = ("smoke", "fast_ntk", "fast_ntk_effnet", "vit_prompts")
METHODS = ("retrain", "ntk", "finetune", "gradient_ascent", "random_labels", "fisher_forgetting",
           "l1_sparse", "salun", "scrub")
SCENARIOS = ("class", "random")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/unlearning.py")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.methods = ",".join(METHODS)     # "ntk" is Fast-NTK when unlearn.subset is not "all"
    c.scenarios = ",".join(SCENARIOS)
    c.forget_class = 0                # index among the classes of D
    c.forget_fraction = 0.1

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10_sample"
    c.data.source = "auto"            # auto | offline | hub
    c.data.data_dir = ""              # folder with cifar/*.npz ("" = $RESEARCH_DATA_DIR)
    c.data.classes = "0,1,2,3,4"      # classes of D ("" = all)
    c.data.train_per_class = 100      # images per class in D (0 = all)
    c.data.train_total = 0            # > 0: cap D at this many images (seeded), after train_per_class
    c.data.image_size = 0             # backbone.source=imagenet: resize to this side on the device (0 = as stored)

    c.backbone = ml_collections.ConfigDict()
    c.backbone.source = "pretrain"    # pretrain: the stage below; imagenet: EfficientNet-Lite0's ImageNet weights
    c.backbone.weights = ""           # imagenet: "" = the installed weights package, or a converted orbax folder

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet20"
    c.model.dtype = "float32"
    c.model.depth = 0                 # vit_*: 0 = the model's default
    c.model.patch_size = 0            # vit_*: 0 = automatic
    c.model.dropout = 0.0
    c.model.hidden_sizes = (512, 256)  # mlp

    # Pre-training of the backbone on data disjoint from D (configs/train_classifier.py fields).
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.data = "cifar10_sample"
    c.pretrain.classes = "5,6,7,8,9"  # "" = all classes of pretrain.data
    c.pretrain.label = "label"        # label column (cifar100_sample also has "coarse_label")
    c.pretrain.workdir = ""           # "" = WORKDIR/pretrain; another run's folder reuses its checkpoint
    c.pretrain.crop_padding = 4
    c.pretrain.flip = True
    c.pretrain.optim = optim.default_config()
    c.pretrain.optim.update(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_steps=50)
    c.pretrain.train = ml_collections.ConfigDict(dict(
        batch_size=128, eval_batch_size=500, epochs=30, steps=0, grad_accum_steps=1, label_smoothing=0.0,
        log_every=50, eval_every_epochs=10, checkpoint_every=500, progress=True))

    # Training on D (the model to unlearn) and the retrain baseline on D_r: the same recipe.
    c.unlearn = ml_collections.ConfigDict()
    c.unlearn.subset = "all"          # all | bn_and_head | bn | head | prompts_and_head | prompts
    c.unlearn.num_prompts = 10        # vit + prompts*: prompt tokens
    c.unlearn.deep_prompts = False
    c.unlearn.lr = 0.01
    c.unlearn.momentum = 0.9
    c.unlearn.weight_decay = 5e-4
    c.unlearn.epochs = 30
    c.unlearn.batch_size = 64

    c.ntk = ml_collections.ConfigDict()
    c.ntk.loss = "ce"                 # ce | mse
    c.ntk.scale = "trapezium"         # trapezium | none
    c.ntk.fisher_alpha = 0.0          # 1e-9 adds the paper's Fisher noise
    c.ntk.mode = "jacobian"           # jacobian | vector_products
    c.ntk.space = "auto"              # auto | samples | parameters
    c.ntk.linearize_at = "init"       # init (the paper) | trained: Jacobian and residual at w(D)
    c.ntk.chunk_size = 64
    c.ntk.scale_sweep = ""            # e.g. "0,1,2,4,8": also measure w(D) + s dw at each s (a diagnostic)

    # Every baseline's hyperparameters (defaults and their sources: research/unlearning/baselines.py).
    # Their learning rates are for a model trained at unlearn.lr = 0.01; the experiment multiplies them by
    # unlearn.lr / 0.01, so they follow the training lr.
    c.baselines = ml_collections.ConfigDict({name: baselines.hyperparameters(name)
                                             for name in baselines.BASELINES if name != "retrain"})

    c.eval_batch_size = 500
    c.progress = True
    c.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})

    if "fast_ntk" in presets or "fast_ntk_effnet" in presets:  # D: a seeded draw from all of CIFAR-10
        c.data.update(classes="", train_per_class=0, train_total=5000)
        c.unlearn.subset = "bn_and_head"
    if "fast_ntk" in presets:
        c.pretrain.update(data="cifar100_sample", classes="", label="coarse_label")
        c.pretrain.train.update(epochs=60, eval_every_epochs=20)
    if "fast_ntk_effnet" in presets:
        c.data.train_total = 2000
        c.backbone.source = "imagenet"
        c.model.name = "efficientnet_lite0"
        c.ntk.chunk_size = 32
    if "vit_prompts" in presets:
        c.data.name = "fashion_mnist"
        c.data.classes = ""
        c.data.train_per_class = 500
        c.model.name = "vit_tiny"
        c.model.depth = 4
        c.model.patch_size = 7
        c.pretrain.data = "mnist"
        c.pretrain.classes = ""
        c.pretrain.crop_padding = 0
        c.pretrain.flip = False
        c.pretrain.optim.update(name="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_steps=100,
                                grad_clip_norm=1.0)
        c.pretrain.train.update(epochs=2, eval_every_epochs=1)
        c.unlearn.subset = "prompts_and_head"
    if any(p in presets for p in ("fast_ntk", "fast_ntk_effnet", "vit_prompts")):
        # A few thousand parameters from a fresh head: a larger lr, fewer epochs, larger batches.
        c.unlearn.update(lr=0.05, epochs=10, batch_size=128)
    if "smoke" in presets:
        c.data.train_per_class = 8
        c.data.train_total = 0
        c.pretrain.train.update(batch_size=32, eval_batch_size=64, epochs=0, steps=3, log_every=1,
                                checkpoint_every=3, progress=False)
        c.unlearn.epochs = 2
        c.unlearn.batch_size = 16
        c.ntk.chunk_size = 8
        c.eval_batch_size = 64
        c.progress = False
        if c.model.name.startswith("vit"):
            c.model.depth = 1
    return c
