"""PyTorch ResNet-20 (CIFAR, option-A shortcuts) with the same structure as research.models.resnet.

Used as a reference: ``tests/models/test_resnet_torch.py`` checks logit equivalence and
``tools/bench/train_step.py`` compares training-step speed.

    model = torch_resnet20(10)
    load_from_nnx(model, nnx_resnet20)   # copy our weights and BN statistics in
    logits = model(images_nchw)

Inputs are NCHW here (PyTorch convention); the NNX model takes NHWC.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + option-A shortcut (subsample + zero-pad channels), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.stride = stride
        self.pad_channels = out_ch - in_ch

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels:
            lo = self.pad_channels // 2
            # The pad tuple runs from the last dim backwards: (W, W, H, H, C, C) of (N, C, H, W).
            x = F.pad(x, (0, 0, 0, 0, lo, self.pad_channels - lo))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet20(nn.Module):
    """(N, 3, H, W) -> (N, num_classes). Attribute names mirror the NNX model's."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.stem_conv = nn.Conv2d(in_channels, 16, 3, 1, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        blocks, in_ch = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(3):
                blocks.append(BasicBlock(in_ch, width, 2 if (stage > 0 and i == 0) else 1))
                in_ch = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def torch_resnet20(num_classes: int, in_channels: int = 3) -> ResNet20:
    return ResNet20(num_classes, in_channels)


def _tensor(value) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value, dtype=np.float32).copy())


def _copy_conv(dst: nn.Conv2d, src) -> None:
    # NNX kernel (kh, kw, in, out) -> torch weight (out, in, kh, kw).
    dst.weight.copy_(_tensor(src.kernel[...]).permute(3, 2, 0, 1))


def _copy_bn(dst: nn.BatchNorm2d, src) -> None:
    dst.weight.copy_(_tensor(src.scale[...]))
    dst.bias.copy_(_tensor(src.bias[...]))
    dst.running_mean.copy_(_tensor(src.mean[...]))
    dst.running_var.copy_(_tensor(src.var[...]))


@torch.no_grad()
def load_from_nnx(torch_model: ResNet20, nnx_model) -> ResNet20:
    """Copy the parameters and BN running statistics of an NNX ``resnet20`` into ``torch_model``."""
    _copy_conv(torch_model.stem_conv, nnx_model.stem_conv)
    _copy_bn(torch_model.stem_bn, nnx_model.stem_bn)
    for dst, src in zip(torch_model.blocks, nnx_model.blocks, strict=True):
        _copy_conv(dst.conv1, src.conv1)
        _copy_bn(dst.bn1, src.bn1)
        _copy_conv(dst.conv2, src.conv2)
        _copy_bn(dst.bn2, src.bn2)
    # NNX Linear kernel (in, out) -> torch weight (out, in).
    torch_model.head.weight.copy_(_tensor(nnx_model.head.kernel[...]).T)
    torch_model.head.bias.copy_(_tensor(nnx_model.head.bias[...]))
    return torch_model
