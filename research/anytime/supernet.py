"""A slimmable, block-skippable supernet over a CIFAR ResNet (``research.models.resnet``), for
anytime networks: every subnetwork shares the ResNet's weights, and none of the model code changes.

A subnetwork is (width, gates):
- ``width`` in (0, 1]: every stage keeps its first ceil(width * C_s) channels (one global width, as
  the TIPS code's single width index; the stem belongs to stage 0);
- ``gates`` (num_blocks,) of 0/1: a gated-off block is skipped (its output is its input). Only
  blocks whose input and output shapes agree (stride 1, same channels) can be skipped; the others
  ("vital" blocks, as the TIPS code calls the stride-2 ones) always run.

Slimming is a channel mask applied after every BatchNorm and residual add, so all subnetworks run
as one compiled program with (width, gates) as data. BatchNorm is per channel, so a masked wide
layer computes exactly what the narrow layer would, except the running statistics, which every
subnetwork shares during training: ``recalibrate`` re-estimates them for one subnetwork (the mean
of its batch statistics over a few training batches) before it is evaluated.

    logits = forward(model, x, width, gates)                     (N, H, W, C) -> (N, classes)
    flops(model, input_hw, width, gates) -> multiply-accumulates of the subnetwork
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models import taps
from research.models.resnet import BN_MOMENTUM, BasicBlock, ResNet


def skippable(model: ResNet) -> np.ndarray:
    """(num_blocks,) bool: the blocks whose shortcut is the identity."""
    return np.array([b.stride == 1 and not b.pad_channels and b.proj_conv is None for b in model.blocks])


def stage_channels(model: ResNet) -> list[int]:
    """Output channels of the stem and of every block, in order (num_blocks + 1,)."""
    return [model.stem_conv.out_features] + [b.conv2.out_features for b in model.blocks]


def _mask(channels: int, width) -> jax.Array:
    return (jnp.arange(channels) < jnp.ceil(width * channels)).astype(jnp.float32)


def check_subnet(model: ResNet, width: float, gates) -> None:
    """Raises ValueError unless 0 < width <= 1 and gates is 0/1 per block, 1 on every vital block."""
    gates = np.asarray(gates)
    if not 0.0 < float(width) <= 1.0:
        raise ValueError(f"width must lie in (0, 1], got {width}")
    if gates.shape != (len(model.blocks),) or not np.isin(gates, (0, 1)).all():
        raise ValueError(f"gates must be {len(model.blocks)} values of 0 or 1, got {gates.tolist()}")
    vital_off = np.flatnonzero((gates == 0) & ~skippable(model))
    if vital_off.size:
        raise ValueError(f"blocks {vital_off.tolist()} change shape and cannot be skipped")


def _block(block: BasicBlock, x: jax.Array, mask: jax.Array) -> jax.Array:
    y = taps.relu(block.bn1(block.conv1(x))) * mask
    y = block.bn2(block.conv2(y)) * mask
    return taps.relu(y + block.shortcut(x)) * mask


def forward(model: ResNet, x: jax.Array, width, gates) -> jax.Array:
    """Logits (N, classes) of subnetwork (width, gates); traceable in both (one compile for all).
    BatchNorm follows the model's train / eval mode."""
    channels, can_skip = stage_channels(model), skippable(model)
    x = taps.relu(model.stem_bn(model.stem_conv(x.astype(model.dtype)))) * _mask(channels[0], width)
    for i, block in enumerate(model.blocks):
        y = _block(block, x, _mask(channels[i + 1], width))
        x = jnp.where(gates[i] > 0, y, x) if can_skip[i] else y
    return model.head(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


def flops(model: ResNet, input_hw: tuple[int, int], width: float, gates) -> int:
    """Multiply-accumulates of the subnetwork's convolutions and head on one input of size input_hw."""
    def active(c):
        return math.ceil(width * c)

    h, w = input_hw
    total = 9 * model.stem_conv.in_features * active(model.stem_conv.out_features) * h * w
    for block, gate in zip(model.blocks, np.asarray(gates)):
        h, w = -(-h // block.stride), -(-w // block.stride)
        if not gate:
            continue
        c_in, c_out = active(block.conv1.in_features), active(block.conv1.out_features)
        total += 9 * h * w * (c_in * c_out + c_out * c_out)
        if block.proj_conv is not None:
            total += h * w * c_in * c_out
    return total + active(model.head.in_features) * model.head.out_features


@functools.partial(jax.jit, static_argnums=0)
def _batch_statistics(graphdef, params, stats, rest, x, width, gates):
    """Each BatchNorm's statistics of one batch under subnetwork (width, gates)."""
    m = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, stats), rest)  # a copy: merge may alias
    m.train()
    forward(m, x, width, gates)
    new = nnx.state(m, nnx.BatchStat)
    # One EMA step new = momentum * old + (1 - momentum) * batch, solved for batch.
    return jax.tree.map(lambda n, o: (n - BN_MOMENTUM * o) / (1.0 - BN_MOMENTUM), new, stats)


def recalibrate(model: ResNet, batches: Iterable[jax.Array], width, gates) -> None:
    """Sets every BatchNorm's running statistics to the mean of subnetwork (width, gates)'s batch
    statistics over ``batches`` (each (N, H, W, C), already preprocessed). Leaves the model in eval
    mode. One compiled program serves every subnetwork of models of the same structure."""
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    total, count = None, 0
    for x in batches:
        s = _batch_statistics(graphdef, params, stats, rest, x, jnp.float32(width), jnp.asarray(gates, jnp.int32))
        total = s if total is None else jax.tree.map(jnp.add, total, s)
        count += 1
    if not count:
        raise ValueError("recalibrate needs at least one batch")
    nnx.update(model, jax.tree.map(lambda t: t / count, total))
    model.eval()
