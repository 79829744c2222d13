"""CIFAR-style ResNets with BatchNorm (He et al. 2016, "Deep Residual Learning").

Both models take NHWC images of any size (global average pooling at the end) and use a 3x3
stride-1 stem, as in the paper's CIFAR-10 experiments:

- ``resnet20``: 3 stages x 3 BasicBlocks, widths 16/32/64, option-A (parameter-free) shortcuts.
  269,722 parameters for 10 classes (the paper's "0.27M"; the 272,474 sometimes quoted is with
  1x1-conv+BN projections on the two downsampling blocks, 2,752 parameters more).
- ``resnet18``: the common CIFAR variant of the ImageNet ResNet-18 (no stem max-pool),
  BasicBlocks [2, 2, 2, 2], widths 64/128/256/512, 1x1-conv+BN projection shortcuts.
  11,173,962 parameters for 10 classes.

The residual blocks are kept in one flat list ``model.blocks`` (input side first), so later
code can pick "the last N blocks"; the classifier is ``model.head``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from research.models import taps
from research.core.mesh import CONV_SHARDING, HEAD_SHARDING, logical

# Kaiming-normal with fan_out, as torchvision / the reference CIFAR code; "normal" (not the
# truncated he_normal of JAX) so that the weight distribution matches torch.nn.init.kaiming_normal_.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch-equivalent BatchNorm: flax momentum 0.9 == torch momentum 0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv(in_ch: int, out_ch: int, kernel: int, stride: int, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """Bias-free conv with PyTorch-style symmetric padding ``kernel // 2``.

    Explicit padding rather than "SAME": for stride 2 on an even input, "SAME" pads (0, 1) while
    PyTorch pads (1, 1), which shifts the sampling grid and breaks equivalence with torch.
    """
    pad = kernel // 2
    return nnx.Conv(
        in_ch, out_ch, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
        use_bias=False, kernel_init=logical(_conv_init, CONV_SHARDING),
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
    )


def batch_norm(channels: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
        param_dtype=jnp.float32, rngs=rngs,
    )


class BasicBlock(nnx.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU. (N, H, W, in) -> (N, H/s, W/s, out).

    ``shortcut="A"``: identity, or stride-2 subsampling + zero-padding of the new channels (half
    on each side, as the widely used reference implementation) when the shape changes.
    ``shortcut="B"``: identity, or 1x1 conv (stride s) + BN projection when the shape changes.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: str, *, dtype,
                 rngs: nnx.Rngs):
        self.conv1 = conv(in_ch, out_ch, 3, stride, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(out_ch, dtype=dtype, rngs=rngs)
        self.conv2 = conv(out_ch, out_ch, 3, 1, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(out_ch, dtype=dtype, rngs=rngs)
        self.stride = stride
        reshape = stride != 1 or in_ch != out_ch
        self.pad_channels = out_ch - in_ch if (reshape and shortcut == "A") else 0
        # Assigned once: NNX fixes an attribute as static (None) or data (Module) on first set.
        proj_conv = proj_bn = None
        if reshape and shortcut == "B":
            proj_conv = conv(in_ch, out_ch, 1, stride, dtype=dtype, rngs=rngs)
            proj_bn = batch_norm(out_ch, dtype=dtype, rngs=rngs)
        self.proj_conv, self.proj_bn = proj_conv, proj_bn

    def shortcut(self, x: jax.Array) -> jax.Array:
        if self.proj_conv is not None:
            return self.proj_bn(self.proj_conv(x))
        if self.stride != 1:
            x = x[:, :: self.stride, :: self.stride, :]
        if self.pad_channels:
            lo = self.pad_channels // 2
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, self.pad_channels - lo)))
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        y = taps.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return taps.relu(y + self.shortcut(x))


class ResNet(nnx.Module):
    """Stem (3x3 conv stride 1 + BN + ReLU) -> BasicBlock stages -> global avg pool -> ``head``.

    Input (N, H, W, C) float, output (N, num_classes) float32 logits.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        widths: Sequence[int],
        blocks_per_stage: Sequence[int],
        shortcut: str,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        self.dtype = dtype
        self.stem_conv = conv(in_channels, widths[0], 3, 1, dtype=dtype, rngs=rngs)
        self.stem_bn = batch_norm(widths[0], dtype=dtype, rngs=rngs)
        blocks = []
        in_ch = widths[0]
        for stage, (width, n) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_ch, width, stride, shortcut, dtype=dtype, rngs=rngs))
                in_ch = width
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(
            in_ch, num_classes, kernel_init=logical(
                nnx.initializers.lecun_normal(), HEAD_SHARDING),
            dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )

    def features(self, x: jax.Array) -> jax.Array:
        """Pre-pooling features (N, H', W', C_last)."""
        x = taps.relu(self.stem_bn(self.stem_conv(x.astype(self.dtype))))
        for block in self.blocks:
            x = block(x)
        return x

    def embedding(self, x: jax.Array) -> jax.Array:
        """The head's input: pooled features (N, C_last)."""
        return jnp.mean(self.features(x), axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.embedding(x)).astype(jnp.float32)


def resnet20(*, num_classes: int, input_shape: tuple[int, int, int], rngs: nnx.Rngs,
             dtype=jnp.float32) -> ResNet:
    """ResNet-20 for CIFAR (option-A shortcuts); 269,722 parameters for 10 classes."""
    return ResNet(num_classes=num_classes, in_channels=input_shape[-1], widths=(16, 32, 64),
                  blocks_per_stage=(3, 3, 3), shortcut="A", rngs=rngs, dtype=dtype)


def resnet18(*, num_classes: int, input_shape: tuple[int, int, int], rngs: nnx.Rngs,
             dtype=jnp.float32) -> ResNet:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool); 11,173,962 parameters for 10 classes."""
    return ResNet(num_classes=num_classes, in_channels=input_shape[-1], widths=(64, 128, 256, 512),
                  blocks_per_stage=(2, 2, 2, 2), shortcut="B", rngs=rngs, dtype=dtype)
