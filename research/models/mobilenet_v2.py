"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

Layout (ImageNet, width 1.0): 3x3 stem conv (32 ch, stride 2) -> 17 inverted residual blocks
-> 1x1 conv to 1280 -> global average pool -> dropout -> ``head``.
2,236,682 parameters for 10 classes at width 1.0 (same as torchvision's ``mobilenet_v2``).

For CIFAR-sized inputs (``small_inputs=True``, automatic when H <= 64) the stem and the second
stage use stride 1, so a 32x32 image reaches the last block at 4x4 instead of 1x1.
The blocks are the list ``model.blocks`` (input side first); the classifier is ``model.head``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.models import taps
from research.models.resnet import BN_EPSILON, BN_MOMENTUM
from research.core.mesh import CONV_SHARDING, DEPTHWISE_SHARDING, HEAD_SHARDING, logical

# (expand ratio t, output channels c, repeats n, first stride s), Table 2 of the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to the nearest multiple of ``divisor``, never going down by more than 10%.

    The convention of the reference TensorFlow/torchvision code, which the paper's width
    multipliers refer to.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBN(nnx.Module):
    """Bias-free conv + BN (+ ReLU6 unless ``activation=False``); padding and BN constants can be
    overridden (``padding=None``: symmetric ``kernel // 2``).

    (N, H, W, in) -> (N, H/s, W/s, out).

    ``groups == in_ch`` makes it depthwise (kernel shape (k, k, 1, out)). ``kernel_init`` defaults
    to He normal (fan out), as the reference.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, groups: int = 1,
                 activation: bool = True, padding=None, bn_momentum: float = BN_MOMENTUM,
                 bn_epsilon: float = BN_EPSILON, kernel_init=None, dtype, rngs: nnx.Rngs):
        if padding is None:  # symmetric, PyTorch-style (see resnet.conv)
            padding = ((kernel // 2, kernel // 2),) * 2
        sharding = DEPTHWISE_SHARDING if groups > 1 else CONV_SHARDING
        self.conv = nnx.Conv(
            in_ch, out_ch, (kernel, kernel), strides=stride, padding=padding,
            feature_group_count=groups, use_bias=False,
            kernel_init=logical(kernel_init or _conv_init, sharding),
            dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )
        self.bn = nnx.BatchNorm(out_ch, momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype,
                                param_dtype=jnp.float32, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn(self.conv(x))
        return taps.relu6(x) if self.activation else x


class InvertedResidual(nnx.Module):
    """Expand 1x1 (skipped when t == 1) -> depthwise 3x3 (stride s) -> linear 1x1 projection.

    Residual connection when stride is 1 and in == out channels.
    (N, H, W, in) -> (N, H/s, W/s, out).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int, *, dtype,
                 rngs: nnx.Rngs):
        hidden = in_ch * expand_ratio
        expand = None
        if expand_ratio != 1:
            expand = ConvBN(in_ch, hidden, 1, dtype=dtype, rngs=rngs)
        self.expand = expand
        self.depthwise = ConvBN(hidden, hidden, 3, stride, groups=hidden, dtype=dtype, rngs=rngs)
        self.project = ConvBN(hidden, out_ch, 1, activation=False, dtype=dtype, rngs=rngs)
        self.use_residual = stride == 1 and in_ch == out_ch

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.use_residual else y


class MobileNetV2(nnx.Module):
    """MobileNetV2 classifier. Input (N, H, W, C) float, output (N, num_classes) float32 logits."""

    def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs,
                 width_multiplier: float = 1.0, small_inputs: bool = False, dropout: float = 0.0,
                 dtype=jnp.float32):
        self.dtype = dtype
        in_ch = make_divisible(32 * width_multiplier)
        self.stem = ConvBN(in_channels, in_ch, 3, 1 if small_inputs else 2, dtype=dtype, rngs=rngs)
        blocks = []
        for stage, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
            if small_inputs and stage == 1:
                s = 1
            out_ch = make_divisible(c * width_multiplier)
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t,
                                               dtype=dtype, rngs=rngs))
                in_ch = out_ch
        self.blocks = nnx.List(blocks)
        # The paper keeps 1280 for multipliers < 1 (a thinner last layer hurts accuracy).
        last_ch = make_divisible(1280 * max(1.0, width_multiplier))
        self.last_conv = ConvBN(in_ch, last_ch, 1, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        self.head = nnx.Linear(
            last_ch, num_classes,
            kernel_init=logical(nnx.initializers.normal(0.01), HEAD_SHARDING),
            dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )

    def features(self, x: jax.Array) -> jax.Array:
        """Pre-pooling features (N, H', W', last_ch)."""
        x = self.stem(x.astype(self.dtype))
        for block in self.blocks:
            x = block(x)
        return self.last_conv(x)

    def embedding(self, x: jax.Array) -> jax.Array:
        """The head's input (before dropout): pooled features (N, last_ch)."""
        return jnp.mean(self.features(x), axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.dropout(self.embedding(x))).astype(jnp.float32)


def mobilenet_v2(*, num_classes: int, input_shape: tuple[int, int, int], rngs: nnx.Rngs,
                 dtype=jnp.float32, width_multiplier: float = 1.0,
                 small_inputs: bool | None = None, dropout: float = 0.0) -> MobileNetV2:
    """MobileNetV2; ``small_inputs=None`` means CIFAR strides when the image height is <= 64."""
    if small_inputs is None:
        small_inputs = input_shape[0] <= 64
    return MobileNetV2(num_classes=num_classes, in_channels=input_shape[-1], rngs=rngs,
                       width_multiplier=width_multiplier, small_inputs=small_inputs,
                       dropout=dropout, dtype=dtype)
