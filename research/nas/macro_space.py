"""A MobileNetV2-style macro search space for CIFAR-sized inputs (32x32).

The network: 3x3 stem conv (stride 1) + BN + ReLU6 -> stages of inverted-residual blocks -> 1x1
conv to ``last`` channels + BN + ReLU6 (``features``) -> global average pool -> linear ``head``.
A candidate chooses, per stage, ``(depth, width, expand, kernel)``: ``depth`` blocks with
``width`` output channels, expansion ratio ``expand`` and a ``kernel`` x ``kernel`` depthwise
conv (3, 5 or 7, padding kernel // 2); the first block of a stage has the stage's fixed stride.
The stages are MobileNetV2's (Table 2 of Sandler et al. 2018) with its CIFAR strides (stem and
second stage at stride 1, so 32x32 ends at 4x4); widths are multiples of 8 around MobileNetV2's
(x 0.5 .. 1.5), depths 1 .. n + 1 for MobileNetV2's n. MobileNetV2 itself is ``reference()``.

Block (in -> out, stride s, expansion t, kernel k), hidden h = t * in:

    1x1 conv in -> h + BN + ReLU6 (none when t = 1) -> k x k depthwise conv (stride s) + BN +
    ReLU6 -> 1x1 conv h -> out + BN (linear bottleneck), + input when s = 1 and in = out.

Analytic costs, per image. A conv with k x k kernel, ``groups``, in -> out channels and an r x r
output (r = ceil(side / stride)) has fan-in f = k^2 in / groups, and

    multiply-adds = r^2 out f,      parameters = out f + 2 out  (bias-free; BN scale and bias);

the classifier adds last * classes multiply-adds and last * classes + classes parameters.
``count_flops`` is the multiply-adds of convs and classifier (BN, activations and pooling not
counted), ``count_params`` the trainable parameters of the built network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models.compiled import run_compiled
from research.models.mobilenet_v2 import INVERTED_RESIDUAL_SETTING, ConvBN, make_divisible
from research.core.mesh import HEAD_SHARDING, logical
from research.nas.search import COST_KINDS, LatencyCost

Stage = tuple[int, int, int, int]  # (depth, width, expand, kernel)
Candidate = tuple[Stage, ...]
FIELDS = ("depth", "width", "expand", "kernel")
WIDTH_MULTIPLIERS = (0.5, 0.75, 1.0, 1.25, 1.5)
EXPAND_CHOICES = (1, 3, 6)
KERNEL_CHOICES = (3, 5, 7)


@dataclasses.dataclass(frozen=True)
class StageChoices:
    """What one stage may be: its fixed stride and the values of each field."""

    stride: int
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    expands: tuple[int, ...] = EXPAND_CHOICES
    kernels: tuple[int, ...] = KERNEL_CHOICES

    def options(self) -> tuple[tuple[int, ...], ...]:
        return self.depths, self.widths, self.expands, self.kernels


def cifar_stages(width_multiplier: float = 1.0) -> tuple[StageChoices, ...]:
    """MobileNetV2's seven stages with CIFAR strides; ``width_multiplier`` scales every width."""
    stages = []
    for i, (_, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
        widths = sorted({make_divisible(c * m * width_multiplier) for m in WIDTH_MULTIPLIERS})
        stages.append(StageChoices(stride=1 if i == 1 else s, depths=tuple(range(1, n + 2)),
                                   widths=tuple(widths)))
    return tuple(stages)


def layers(candidate: Candidate, strides: Sequence[int], stem: int, last: int,
           image_size: int = 32, in_channels: int = 3) -> Iterator[tuple[int, int, int, int, int]]:
    """Every conv of the network in order, as (in, out, kernel, groups, output side)."""
    side = image_size
    yield in_channels, stem, 3, 1, side
    cin = stem
    for (depth, width, expand, kernel), stride in zip(candidate, strides):
        for b in range(depth):
            hidden = cin * expand
            if expand != 1:
                yield cin, hidden, 1, 1, side
            side = -(-side // (stride if b == 0 else 1))  # padding k // 2: ceil(side / stride)
            yield hidden, hidden, kernel, hidden, side
            yield hidden, width, 1, 1, side
            cin = width
    yield cin, last, 1, 1, side


def count_flops(candidate: Candidate, strides: Sequence[int], stem: int, last: int,
                num_classes: int = 10, image_size: int = 32) -> int:
    """Multiply-adds of one forward pass of one image (convs and classifier)."""
    convs = sum(r * r * cout * k * k * cin // g
                for cin, cout, k, g, r in layers(candidate, strides, stem, last, image_size))
    return convs + last * num_classes


def count_params(candidate: Candidate, strides: Sequence[int], stem: int, last: int,
                 num_classes: int = 10) -> int:
    """Trainable parameters: conv kernels, BN scales and biases, classifier weight and bias."""
    convs = sum(cout * k * k * cin // g + 2 * cout
                for cin, cout, k, g, _ in layers(candidate, strides, stem, last))
    return convs + last * num_classes + num_classes


class Block(nnx.Module):
    """Inverted residual with a k x k depthwise conv. (N, H, W, in) -> (N, H/s, W/s, out)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, kernel: int, *,
                 rngs: nnx.Rngs):
        hidden = cin * expand
        self.expand = (ConvBN(cin, hidden, 1, dtype=jnp.float32, rngs=rngs) if expand != 1
                       else None)
        self.depthwise = ConvBN(hidden, hidden, kernel, stride, groups=hidden, dtype=jnp.float32,
                                rngs=rngs)
        self.project = ConvBN(hidden, cout, 1, activation=False, dtype=jnp.float32, rngs=rngs)
        self.use_residual = stride == 1 and cin == cout

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.use_residual else y


class MacroNet(nnx.Module):
    """The network of one candidate. Input (N, H, W, 3) normalised images, output
    (N, num_classes) logits; ``features`` are the pre-pool (N, H / prod(strides), ..., last)
    activations (4x4 for 32x32 images and the CIFAR stages)."""

    def __init__(self, candidate: Candidate, strides: Sequence[int], *, stem: int, last: int,
                 num_classes: int = 10, in_channels: int = 3, rngs: nnx.Rngs):
        self.candidate, self.strides = candidate, tuple(strides)
        self.stem_channels, self.last_channels, self.num_classes = stem, last, num_classes
        self.stem = ConvBN(in_channels, stem, 3, 1, dtype=jnp.float32, rngs=rngs)
        blocks, cin = [], stem
        for (depth, width, expand, kernel), stride in zip(candidate, strides):
            for b in range(depth):
                blocks.append(Block(cin, width, stride if b == 0 else 1, expand, kernel,
                                    rngs=rngs))
                cin = width
        self.blocks = nnx.List(blocks)
        self.last_conv = ConvBN(cin, last, 1, dtype=jnp.float32, rngs=rngs)
        self.head = nnx.Linear(  # MobileNetV2's head initialisation
            last, num_classes, rngs=rngs,
            kernel_init=logical(nnx.initializers.normal(0.01), HEAD_SHARDING))

    def features(self, x: jax.Array) -> jax.Array:
        x = self.stem(x)
        for block in self.blocks:  # one cached program per block structure, for every candidate
            x = run_compiled(block, x)
        return self.last_conv(x)  # ConvBN ends in taps.relu6, which proxies observe

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jnp.mean(self.features(x), axis=(1, 2)))

    def flops(self) -> int:
        """``count_flops`` for 32x32 inputs (what the ``flops`` proxy reads)."""
        return count_flops(self.candidate, self.strides, self.stem_channels, self.last_channels,
                           self.num_classes)


class MobileNetSpace:
    """The search space over ``stages`` (default ``cifar_stages(width_multiplier)``); stem and
    last conv widths are MobileNetV2's (32, 1280) times ``width_multiplier``, made divisible by 8
    (unlike MobileNetV2, the last conv shrinks too, so a thin space stays cheap).

    sample: every field of every stage uniform over its values.
    mutate: one stage, one field with more than one value, changed to another value, uniformly.
    cost: flops = ``count_flops`` / 1e6 (multiply-adds), params = ``count_params`` / 1e6,
        latency = ``LatencyCost`` (ms).
    """

    def __init__(self, *, stages: Sequence[StageChoices] | None = None,
                 width_multiplier: float = 1.0, num_classes: int = 10, image_size: int = 32,
                 latency_batch: int = 1, latency_runs: int = 5):
        self.stages = tuple(stages) if stages is not None else cifar_stages(width_multiplier)
        self.strides = tuple(s.stride for s in self.stages)
        self.width_multiplier = width_multiplier
        self.stem = make_divisible(32 * width_multiplier)
        self.last = make_divisible(1280 * width_multiplier)
        self.num_classes, self.image_size = num_classes, image_size
        self.latency = LatencyCost(lambda c: self.build(c, num_classes, 0),
                                   (image_size, image_size, 3), latency_batch, latency_runs)

    def sample(self, rng: np.random.Generator) -> Candidate:
        return tuple(tuple(int(values[rng.integers(len(values))]) for values in s.options())
                     for s in self.stages)

    def mutate(self, candidate: Candidate, rng: np.random.Generator) -> Candidate:
        stage = int(rng.integers(len(self.stages)))
        options = self.stages[stage].options()
        free = [f for f, values in enumerate(options) if len(values) > 1]
        if not free:
            return candidate
        field = free[rng.integers(len(free))]
        others = [v for v in options[field] if v != candidate[stage][field]]
        changed = list(candidate[stage])
        changed[field] = int(others[rng.integers(len(others))])
        return candidate[:stage] + (tuple(changed),) + candidate[stage + 1:]

    def cost(self, candidate: Candidate, kind: str) -> float:
        if kind == "flops":
            return count_flops(candidate, self.strides, self.stem, self.last, self.num_classes,
                               self.image_size) / 1e6
        if kind == "params":
            return count_params(candidate, self.strides, self.stem, self.last,
                                self.num_classes) / 1e6
        if kind == "latency":
            return self.latency(candidate)
        raise ValueError(f"cost kind {kind!r}; choose from: {', '.join(COST_KINDS)}")

    def build(self, candidate: Candidate, num_classes: int, seed: int) -> MacroNet:
        return MacroNet(candidate, self.strides, stem=self.stem, last=self.last,
                        num_classes=num_classes, rngs=nnx.Rngs(seed))

    def describe(self, candidate: Candidate) -> str:
        """One token per stage: t<expand>k<kernel>c<width>n<depth> (MobileNetV2's t, c, n)."""
        return "-".join(f"t{t}k{k}c{c}n{n}" for n, c, t, k in candidate)

    def reference(self) -> Candidate:
        """MobileNetV2 (3x3 kernels), each field at the nearest value the space allows."""
        def nearest(values, target):
            return min(values, key=lambda v: (abs(v - target), v))
        return tuple((nearest(s.depths, n),
                      nearest(s.widths, make_divisible(c * self.width_multiplier)),
                      nearest(s.expands, t), nearest(s.kernels, 3))
                     for s, (t, c, n, _) in zip(self.stages, INVERTED_RESIDUAL_SETTING))
