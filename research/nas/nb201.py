"""The NAS-Bench-201 cell search space (Dong & Yang, ICLR 2020) and its networks.

A cell is a DAG on 4 nodes; node j = sum over i < j of op_{j<-i}(node i), the output is node 3.
Its 6 edges each carry one of 5 operations, so there are 5^6 = 15,625 cells. Here a cell is a
tuple of 6 indices into ``OPS``, edges in the order of the NB201 string (``EDGES``):

    |op~0|+|op~0|op~1|+|op~0|op~1|op~2|      edges 1<-0 | 2<-0 2<-1 | 3<-0 3<-1 3<-2

NASLib (and the ground-truth file of the correlation experiment) lists the edges in another order
(1<-0, 2<-0, 3<-0, 2<-1, 3<-1, 3<-2) with other op codes (``NASLIB_OPS``); ``from_naslib`` and
``to_naslib`` convert. ``to_index`` numbers cells 0..15624 in NB201's enumeration order (edges in
string order, first edge most significant, ops in ``OPS`` order).

The macro network: 3x3 conv stem (C) + BN; three stages of N cells with C, 2C, 4C channels and a
residual reduction block between stages; BN-ReLU, global average pool, linear classifier.
Operations are ReLU-Conv-BN (bias-free convs, affine BN), skip, zero, and a 3x3 average pool that
does not count padding. Initialisation is PyTorch's default (kaiming-uniform with a = sqrt(5),
BN weight 1 and bias 0), because zero-cost proxies depend on it.

``NB201Network(cell)`` builds one cell; run op by op, each of its operations goes through
``run_compiled`` (one program per operation and shape, shared by all cells).
``NB201Network(None)`` is the masked super-network: every edge holds every operation, and the
per-edge choice is data (``model.ops``, one-hot (6, 5)), so one compiled program scores any cell
and ``vmap`` over ``ops`` scores many. Every candidate operation is built in the same order in
both modes, so a super-network and a cell network made with the same seed hold the same weights
for the cell's operations (``exact_from_masked`` copies them).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.core.mesh import CONV_SHARDING, HEAD_SHARDING, logical
from research.models import taps
from research.models.compiled import run_compiled
from research.models.resnet import BN_EPSILON, BN_MOMENTUM

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NONE, SKIP, CONV1, CONV3, POOL = range(5)
EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))  # (to, from), NB201 string order
NASLIB_EDGES = ((1, 0), (2, 0), (3, 0), (2, 1), (3, 1), (3, 2))
NASLIB_OPS = ("skip_connect", "none", "nor_conv_3x3", "nor_conv_1x1", "avg_pool_3x3")
NUM_CELLS = len(OPS) ** len(EDGES)

Cell = tuple[int, ...]

# --------------------------------------------------------------------------- cell encodings


def check_cell(cell: Sequence[int]) -> Cell:
    cell = tuple(int(o) for o in cell)
    if len(cell) != len(EDGES) or not all(0 <= o < len(OPS) for o in cell):
        raise ValueError(f"a cell is {len(EDGES)} op indices in 0..{len(OPS) - 1}; got {cell}")
    return cell


def to_string(cell: Sequence[int]) -> str:
    cell = check_cell(cell)
    nodes = []
    for node in (1, 2, 3):
        nodes.append("|" + "|".join(f"{OPS[cell[e]]}~{src}" for e, (dst, src) in enumerate(EDGES)
                                    if dst == node) + "|")
    return "+".join(nodes)


def from_string(text: str) -> Cell:
    ops = [token.split("~")[0] for node in text.split("+") for token in node.strip("|").split("|")]
    unknown = sorted(set(ops) - set(OPS))
    if unknown or len(ops) != len(EDGES):
        raise ValueError(f"not an NB201 cell string: {text!r} (ops allowed: {', '.join(OPS)})")
    return tuple(OPS.index(o) for o in ops)


def from_naslib(encoding: Sequence[int]) -> Cell:
    """NASLib's 6-tuple (its edge order and op codes) -> a cell."""
    if len(encoding) != len(NASLIB_EDGES):
        raise ValueError(f"a NASLib NB201 encoding has 6 entries; got {encoding}")
    by_edge = {edge: OPS.index(NASLIB_OPS[code]) for edge, code in zip(NASLIB_EDGES, encoding)}
    return tuple(by_edge[edge] for edge in EDGES)


def to_naslib(cell: Sequence[int]) -> tuple[int, ...]:
    cell = check_cell(cell)
    by_edge = dict(zip(EDGES, cell))
    return tuple(NASLIB_OPS.index(OPS[by_edge[edge]]) for edge in NASLIB_EDGES)


def to_index(cell: Sequence[int]) -> int:
    index = 0
    for op in check_cell(cell):
        index = index * len(OPS) + op
    return index


def from_index(index: int) -> Cell:
    if not 0 <= index < NUM_CELLS:
        raise ValueError(f"cell index {index} outside 0..{NUM_CELLS - 1}")
    ops = []
    for _ in EDGES:
        index, op = divmod(index, len(OPS))
        ops.append(op)
    return tuple(reversed(ops))


def all_cells() -> np.ndarray:
    """(15625, 6) int array, row i = ``from_index(i)``."""
    return np.array(list(itertools.product(range(len(OPS)), repeat=len(EDGES))), np.int32)


def one_hot(cells) -> np.ndarray:
    """(..., 6) op indices -> (..., 6, 5) float32 one-hot choices."""
    return np.eye(len(OPS), dtype=np.float32)[np.asarray(cells)]


# --------------------------------------------------------------------------- costs
# Per-op counts for one cell position, summed over a stage's cells; ``count_*`` adds the fixed part.


def _stage_shapes(C: int, image_size: int) -> list[tuple[int, int]]:
    """(channels, spatial side) of the three stages."""
    return [(C, image_size), (2 * C, -(-image_size // 2)), (4 * C, -(-image_size // 4))]


def count_params(cell: Sequence[int], num_classes: int = 10, C: int = 16, N: int = 5,
                 in_channels: int = 3) -> int:
    """Trainable parameters (conv kernels, BN affine, classifier weight and bias) of the network;
    equals NB201's ``params`` (x 1e6) for the same cell."""
    cell = check_cell(cell)
    per_op = {CONV1: lambda c: c * c + 2 * c, CONV3: lambda c: 9 * c * c + 2 * c}
    total = 9 * in_channels * C + 2 * C  # stem
    for stage, (c, _) in enumerate(_stage_shapes(C, 32)):
        total += N * sum(per_op[op](c) for op in cell if op in per_op)
        if stage < 2:  # reduction c -> 2c: conv_a, conv_b (with BN), 1x1 shortcut conv
            total += (9 * c * 2 * c + 4 * c) + (9 * 4 * c * c + 4 * c) + c * 2 * c
    return total + 2 * 4 * C + 4 * C * num_classes + num_classes


def count_flops(cell: Sequence[int], num_classes: int = 10, image_size: int = 32, C: int = 16,
                N: int = 5, in_channels: int = 3) -> int:
    """Operations of one forward pass of one image. Convention: a conv or linear layer counts its
    multiply-adds (out elements x fan-in), BN 2 and ReLU 1 per element, a k x k average pool k^2
    per output element, global pooling 1 per input element. Within 0.02% of NB201's ``flops``
    (x 1e6) on every cell of the ground-truth file."""
    cell = check_cell(cell)
    stages = _stage_shapes(C, image_size)
    total = image_size**2 * C * (9 * in_channels + 2)  # stem conv + BN
    for stage, (c, side) in enumerate(stages):
        hw = side * side
        per_op = {CONV1: hw * c * (c + 3), CONV3: hw * c * (9 * c + 3), POOL: hw * c * 9}
        total += N * sum(per_op.get(op, 0) for op in cell)
        if stage < 2:
            c2, side2 = stages[stage + 1]
            hw2 = side2 * side2
            total += hw * c + hw2 * c2 * (9 * c + 2)  # conv_a: ReLU on input, stride-2 conv, BN
            total += hw2 * c2 * (9 * c2 + 3)  # conv_b
            total += hw2 * c * 4 + hw2 * c * c2  # shortcut: 2x2 avg pool, 1x1 conv
    c, side = stages[-1]
    return total + 3 * side * side * c + side * side * c + c * num_classes


# --------------------------------------------------------------------------- network

# PyTorch's default init for conv and linear weights: kaiming-uniform with a = sqrt(5), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _conv(cin: int, cout: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    pad = kernel // 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                    use_bias=False, rngs=rngs,
                    kernel_init=logical(_torch_kernel_init, CONV_SHARDING))


def _bn(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, padding 1, padded positions not counted. (N,H,W,C) -> same."""
    window, pad = (1, 3, 3, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, 1, 1, 1), pad)
    return total * _inverse_window_counts(x.shape[1], x.shape[2]).astype(x.dtype)


def _inverse_window_counts(height: int, width: int) -> np.ndarray:
    """(1, H, W, 1): 1 / (number of in-image positions of each 3x3 window). A numpy constant:
    computing it in the graph makes XLA constant-fold it, slowly, at every pool."""
    def side(n):
        return np.minimum(np.arange(n) + 1, n - 1) - np.maximum(np.arange(n) - 1, 0) + 1
    # float64 (avg_pool_3x3 casts it): a float32 constant would round a float64 pool's divisor.
    return (1.0 / np.outer(side(height), side(width)))[None, :, :, None]


_avg_pool_3x3_compiled = jax.jit(avg_pool_3x3)  # exact cells: see run_compiled


class ReLUConvBN(nnx.Module):
    """ReLU -> conv (no bias) -> BN. (N, H, W, cin) -> (N, H/stride, W/stride, cout)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = _conv(cin, cout, kernel, stride, rngs)
        self.bn = _bn(cout, rngs)

    def __call__(self, x: jax.Array, active=None) -> jax.Array:
        return self.bn(self.conv(taps.relu(x, active)))


class Edge(nnx.Module):
    """One edge: either the operation ``op`` alone, or (``op=None``) all five, mixed by weights."""

    def __init__(self, channels: int, op: int | None, *, rngs: nnx.Rngs):
        # Both convs are always built so that the random stream is the same for every cell.
        conv_1x1 = ReLUConvBN(channels, channels, 1, 1, rngs=rngs)
        conv_3x3 = ReLUConvBN(channels, channels, 3, 1, rngs=rngs)
        self.op = op
        self.conv_1x1 = conv_1x1 if op in (None, CONV1) else None
        self.conv_3x3 = conv_3x3 if op in (None, CONV3) else None

    def __call__(self, x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
        if self.op is not None:
            return {NONE: lambda: jnp.zeros_like(x), SKIP: lambda: x,
                    CONV1: lambda: run_compiled(self.conv_1x1, x),
                    CONV3: lambda: run_compiled(self.conv_3x3, x),
                    POOL: lambda: _avg_pool_3x3_compiled(x)}[self.op]()
        # A switched-off op's weight is exactly 0, so its parameters get exactly zero gradient.
        return (weights[SKIP] * x + weights[CONV1] * self.conv_1x1(x, weights[CONV1])
                + weights[CONV3] * self.conv_3x3(x, weights[CONV3])
                + weights[POOL] * avg_pool_3x3(x))


class CellBlock(nnx.Module):
    """One NB201 cell on ``channels`` channels. (N, H, W, C) -> (N, H, W, C)."""

    def __init__(self, channels: int, cell: Cell | None, *, rngs: nnx.Rngs):
        self.edges = nnx.List([Edge(channels, None if cell is None else cell[e], rngs=rngs)
                               for e in range(len(EDGES))])

    def __call__(self, x: jax.Array, ops: jax.Array | None = None) -> jax.Array:
        nodes = [x]
        for node in (1, 2, 3):
            nodes.append(sum(self.edges[e](nodes[src], None if ops is None else ops[e])
                             for e, (dst, src) in enumerate(EDGES) if dst == node))
        return nodes[3]


class ReductionBlock(nnx.Module):
    """NB201's residual block between stages: (N, H, W, C) -> (N, H/2, W/2, 2C)."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.conv_a = ReLUConvBN(cin, cout, 3, 2, rngs=rngs)
        self.conv_b = ReLUConvBN(cout, cout, 3, 1, rngs=rngs)
        self.shortcut = _conv(cin, cout, 1, 1, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
        return self.conv_b(self.conv_a(x)) + self.shortcut(pooled)


class OpChoice(nnx.Variable):
    """The masked super-network's per-edge op choice, (6, 5) one-hot; data, not a parameter."""


class NB201Network(nnx.Module):
    """NB201 macro network. Input (N, H, W, 3) normalised images, output (N, num_classes) logits.

    ``cell`` = a cell (tuple of 6 op indices) builds that cell only; ``cell=None`` builds the
    masked super-network whose choice is ``model.ops`` (set with ``set_cell``).
    """

    def __init__(self, cell: Sequence[int] | None = None, *, num_classes: int = 10, C: int = 16,
                 N: int = 5, in_channels: int = 3, rngs: nnx.Rngs):
        cell = None if cell is None else check_cell(cell)
        self.cell, self.num_classes, self.C, self.N = cell, num_classes, C, N
        self.stem_conv = _conv(in_channels, C, 3, 1, rngs)
        self.stem_bn = _bn(C, rngs)
        blocks = []
        for stage in range(3):
            if stage:
                blocks.append(ReductionBlock(C << (stage - 1), C << stage, rngs=rngs))
            blocks += [CellBlock(C << stage, cell, rngs=rngs) for _ in range(N)]
        self.blocks = nnx.List(blocks)
        self.last_bn = _bn(4 * C, rngs)
        self.head = nnx.Linear(4 * C, num_classes, rngs=rngs,
                               kernel_init=logical(_torch_kernel_init, HEAD_SHARDING),
                               bias_init=_torch_bias_init(4 * C))
        self.ops = OpChoice(jnp.asarray(one_hot(cell or (CONV3,) * len(EDGES))))

    def set_cell(self, cell: Sequence[int]) -> None:
        if self.cell is not None:
            raise ValueError(f"this network is built for cell {to_string(self.cell)}; "
                             "only the masked network (cell=None) can switch cells")
        self.ops[...] = jnp.asarray(one_hot(check_cell(cell)))

    def features(self, x: jax.Array) -> jax.Array:
        """Pre-pooling features (N, H/4, W/4, 4C)."""
        ops = None if self.cell is not None else self.ops[...]
        x = self.stem_bn(self.stem_conv(x))
        for block in self.blocks:
            if isinstance(block, CellBlock):
                x = block(x, ops)
            else:
                x = block(x) if ops is not None else run_compiled(block, x)
        return taps.relu(self.last_bn(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jnp.mean(self.features(x), axis=(1, 2)))

    def active_weight(self, path: tuple) -> jax.Array | float:
        """1.0 for a parameter or BN layer at ``path`` that the chosen cell uses, 0.0 for one it
        switches off (masked network); what proxies weight parameter and layer counts by."""
        if self.cell is not None or "edges" not in path:
            return 1.0
        i = path.index("edges")
        edge, op = int(path[i + 1]), path[i + 2]
        return self.ops[...][edge, {"conv_1x1": CONV1, "conv_3x3": CONV3}[op]]

    def flops(self) -> jax.Array | int:
        """``count_flops`` for 32x32 inputs; for the masked network, of the chosen cell (traced)."""
        if self.cell is not None:
            return count_flops(self.cell, self.num_classes, 32, self.C, self.N)
        per_op = np.array([[count_flops(tuple(op if e == f else NONE for f in range(6)),
                                        self.num_classes, 32, self.C, self.N)
                            for op in range(len(OPS))] for e in range(len(EDGES))], np.float64)
        base = count_flops((NONE,) * 6, self.num_classes, 32, self.C, self.N)
        return base + jnp.sum(self.ops[...] * (per_op - base))


def exact_from_masked(masked: NB201Network, cell: Sequence[int]) -> NB201Network:
    """The cell network holding ``masked``'s weights for the cell's operations."""
    cell = check_cell(cell)
    exact = NB201Network(cell, num_classes=masked.num_classes, C=masked.C, N=masked.N,
                         rngs=nnx.Rngs(0))
    source = dict(nnx.to_flat_state(nnx.state(masked)))
    target = nnx.state(exact)
    flat = [(path, source[path] if path in source else v) for path, v in nnx.to_flat_state(target)]
    nnx.update(exact, nnx.from_flat_state(flat))
    return exact
