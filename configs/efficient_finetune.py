"""Fine-tune the last layers of a pre-trained network with exact backprop, gradient filtering or LBP-WHT.

    python -m experiments.efficient_finetune --config configs/efficient_finetune.py --workdir runs/gf_resnet20
    python -m experiments.efficient_finetune --config configs/efficient_finetune.py:vit --workdir runs/lbp_vit
    python -m experiments.efficient_finetune --config configs/efficient_finetune.py:mobilenet_v2 --workdir runs/gf_mbv2
    python -m experiments.efficient_finetune --config configs/efficient_finetune.py:smoke --workdir /tmp/smoke

The protocol of the gradient-filtering paper at our scale: pre-train on one half of the data
(``data.split=classes``: the first half of the classes, a non-IID split; ``samples``: a random
half), then fine-tune the last ``finetune.last_n`` layers (or blocks) plus a classifier head on
the other half, once per variant, from the same pre-trained weights, with BatchNorm in eval mode.
Variants: ``vanilla`` (exact backprop of the same layers), ``filter_rR`` (gradient filtering with
patch size R on those convolutions), ``lbp_kK`` (LBP-WHT LP_L1-K on those linear layers of a
ViT), ``head_only`` (the classifier alone).
Presets (comma-separated, ``smoke`` shrinks any of them to seconds):
  (none)        ResNet-20 on Fashion-MNIST, classes 0-4 -> 5-9, last 2 conv layers, R = 2 and 4
  mobilenet_v2  MobileNetV2 (width 0.5) on the CIFAR-10 sample, last 2 conv layers, R = 2 and 4 (for a GPU:
                XLA:CPU trains depthwise convolutions at about 17 images/s, so its pre-training takes over an hour)
  vit           ViT-tiny (4 blocks, patch 4) on Fashion-MNIST, last 2 blocks, LBP-WHT k = 2, 4, 6
"""
import ml_collections

from research.backprop.finetune import EfficientFinetune, FinetuneStage, PretrainStage
from research.core import config as config_lib
from research.core.optim import OptimConfig
from research.recipes.classify import ClassifierTrainConfig

PRESETS = ("smoke", "mobilenet_v2", "vit")


def _stage(cls, lr: float, epochs: int, name: str = "sgd", **fields) -> ml_collections.ConfigDict:
    """A training stage's section with its optimiser ``name`` at ``lr`` for ``epochs``."""
    return config_lib.section(cls, optim=OptimConfig(name=name, lr=lr),
                              train=ClassifierTrainConfig(eval_batch_size=500, epochs=epochs), **fields)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_lib.parse_presets(arg, PRESETS, "configs/efficient_finetune.py")
    # The defaults (research/backprop/finetune.py): a ResNet-20 pre-trained on Fashion-MNIST's classes
    # 0-4 (SGD lr 0.1, 3 epochs), its last 2 convolutions fine-tuned on 5-9 (lr 0.05, 2 epochs) with
    # vanilla backprop, gradient filtering at R 2 and 4, and the head alone.
    c = config_lib.section(EfficientFinetune)

    if "mobilenet_v2" in presets:
        c.data.name = "cifar10_sample"
        c.data.crop_padding, c.data.flip = 4, True
        c.model.name = "mobilenet_v2"
        c.model.width_multiplier = 0.5
        c.pretrain.train.epochs = 30
        c.finetune.train.epochs = 10
    if "vit" in presets:
        c.model.name = "vit_tiny"
        c.model.depth = 4
        c.pretrain = _stage(PretrainStage, lr=1e-3, epochs=3, name="adamw")
        c.pretrain.optim.update(weight_decay=0.05, warmup_steps=100, grad_clip_norm=1.0)
        c.finetune = _stage(FinetuneStage, lr=5e-4, epochs=1, name="adamw", unit="blocks", last_n=2,
                            variants=("vanilla", "lbp_k2", "lbp_k4", "lbp_k6", "head_only"))
    if "smoke" in presets:
        c.data.train_limit = 256
        for stage in (c.pretrain, c.finetune):
            stage.train.update(batch_size=32, eval_batch_size=64, epochs=0, steps=4, log_every=2,
                               checkpoint_every=0, progress=False)  # 0: only the final checkpoint
        c.measure.repeats = 1
        c.model.width_multiplier = 0.25 if c.model.name == "mobilenet_v2" else c.model.width_multiplier
        c.model.depth = 2 if c.model.name.startswith("vit") else c.model.depth
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Patch sizes and depths of fine-tuning:

    python -m tools.sweep --experiment efficient_finetune --config configs/efficient_finetune.py --workdir runs/gf_sweep
    """
    return [{"finetune.last_n": n, "finetune.variants": ("vanilla", f"filter_r{r}")} for n in (2, 4) for r in (2, 4)]
