"""Gradient filtering for convolutions (Yang, Li, Marculescu, CVPR 2023, "Efficient On-device
Training via Gradient Filtering").

The forward convolution is exact. The backward pass assumes the output gradient g_y is constant
over R x R blocks of the output grid, which turns the convolution's backward into 1x1 matmuls on a
grid R^2 times smaller:

    g~[n, p, co]   = mean of g_y over block p                       (padding not counted)
    x~[n, p, ci]   = sum of x over the (R s) x (R s) input window of block p
    W~[co, ci]     = sum_{i,j} W[i, j, ci, co]
    grad_x         = upsample_{R s}( sum_co W~[co, ci] g~[n, p, co] )   (nearest, then cropped)
    grad_W[i, j]   = sum_{n, p} g~[n, p, co] x~[n, p, ci]              for every tap (i, j)

Only x~ and W~ are saved for the backward pass, so activation memory drops by about 1 - 1/R^2 and
backward FLOPs by about R^2 k^2. Grouped and depthwise convolutions use the same formulas within
each group. R = 1 (one-pixel blocks) keeps the exact backward. For a 1x1 stride-1 convolution whose
output gradient is already constant over the blocks, the rule is exact for any R. The bias gradient (outside this op, in
``nnx.Conv``) is exact.

Dilation d >= R: the taps of the kernel fall into different patches, so instead of summing the
kernel, the backward is that of the same convolution on the patch grid with dilation d / R
(d must be a multiple of R; stride 1, as in dilated segmentation backbones).

Block layout: the output grid (Ho, Wo) is covered by P = ceil(Ho / R) blocks, the Ho padding split
symmetrically (``(P R - Ho) // 2`` before). Input window p covers input rows
[s (p R - before), s ((p + 1) R - before)) (zero outside the image), so that for the usual
"same" convolutions (H = s Ho) the input is zero-padded symmetrically to P R s rows.

Use it in a model by replacing the conv function of an ``nnx.Conv``:
``conv.conv_general_dilated = FilteredConv(patch_size=4)`` (see ``research.backprop.apply``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Static description of one 2-D NHWC/HWIO convolution and its filter patch size."""
    patch_size: int
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    groups: int
    input_hw: tuple[int, int]
    kernel_hw: tuple[int, int]

    @property
    def dilated_rule(self) -> bool:
        """True when the taps land in different patches (dilation >= R)."""
        return self.patch_size > 1 and self.dilation[0] >= self.patch_size


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """How one spatial axis of length ``out_len`` (input ``in_len``) is cut into blocks."""
    num: int          # P = ceil(out_len / R)
    out_before: int   # zero rows added before the output axis
    in_before: int    # zero rows added before the input axis (negative: rows cropped)
    in_after: int

    @classmethod
    def make(cls, in_len: int, out_len: int, patch: int, stride: int) -> _Blocks:
        num = -(-out_len // patch)
        out_before = (num * patch - out_len) // 2
        in_before = stride * out_before
        return cls(num, out_before, in_before, num * patch * stride - in_len - in_before)


def _pad_spatial(x: jax.Array, rows: tuple[int, int], cols: tuple[int, int]) -> jax.Array:
    """Zero-pads (negative: crops) axes 1 and 2 of an NHWC array."""
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*rows, 0), (*cols, 0), (0, 0, 0)))


def sum_pool_input(x: jax.Array, blocks: tuple[_Blocks, _Blocks], window: tuple[int, int]) -> jax.Array:
    """x~: (N, H, W, C) -> (N, Ph, Pw, C), sums over the (R s) x (R s) input window of each block."""
    bh, bw = blocks
    x = _pad_spatial(x, (bh.in_before, bh.in_after), (bw.in_before, bw.in_after))
    n, _, _, c = x.shape
    x = x.reshape(n, bh.num, window[0], bw.num, window[1], c)
    return x.sum(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)


def _valid_counts(length: int, b: _Blocks, patch: int) -> np.ndarray:
    """Number of real (unpadded) output rows in each of the ``b.num`` blocks of one axis."""
    starts = np.arange(b.num) * patch - b.out_before
    return np.minimum(starts + patch, length) - np.maximum(starts, 0)


def mean_pool_output_grad(g: jax.Array, blocks: tuple[_Blocks, _Blocks], patch: int) -> jax.Array:
    """g~: (N, Ho, Wo, C) -> (N, Ph, Pw, C), the mean of g_y over each R x R block (padding not counted)."""
    bh, bw = blocks
    n, ho, wo, c = g.shape
    padded = _pad_spatial(g, (bh.out_before, bh.num * patch - ho - bh.out_before),
                          (bw.out_before, bw.num * patch - wo - bw.out_before))
    sums = padded.reshape(n, bh.num, patch, bw.num, patch, c).sum(axis=(2, 4), dtype=jnp.float32)
    counts = np.outer(_valid_counts(ho, bh, patch), _valid_counts(wo, bw, patch))
    return (sums / counts[None, :, :, None].astype(np.float32)).astype(g.dtype)


def upsample_input_grad(gx: jax.Array, blocks: tuple[_Blocks, _Blocks], window: tuple[int, int]) -> jax.Array:
    """(N, Ph, Pw, C) -> (N, H, W, C): nearest-neighbour upsampling by R s, then the input crop."""
    bh, bw = blocks
    gx = jnp.repeat(jnp.repeat(gx, window[0], axis=1), window[1], axis=2)
    return _pad_spatial(gx, (-bh.in_before, -bh.in_after), (-bw.in_before, -bw.in_after))


def _grouped_matmul_input(g: jax.Array, w_sum: jax.Array, groups: int) -> jax.Array:
    """sum_co W~[ci, co] g~[..., co] within each group: (N, P, Q, Co) x (Ci/G, Co) -> (N, P, Q, Ci)."""
    ci_g, co = w_sum.shape
    n, p, q, _ = g.shape
    g = g.reshape(n, p, q, groups, co // groups)
    w = w_sum.reshape(ci_g, groups, co // groups)
    return jnp.einsum("npqgo,igo->npqgi", g, w).reshape(n, p, q, groups * ci_g)


def _grouped_matmul_weight(x_sum: jax.Array, g: jax.Array, groups: int) -> jax.Array:
    """sum_{n,p} x~[.., ci] g~[.., co] within each group: -> (Ci/G, Co), the layout of a HWIO kernel's IO."""
    n, p, q, ci = x_sum.shape
    co = g.shape[-1]
    x = x_sum.reshape(n, p, q, groups, ci // groups)
    g = g.reshape(n, p, q, groups, co // groups)
    return jnp.einsum("npqgi,npqgo->igo", x, g, preferred_element_type=jnp.float32).reshape(ci // groups, co)


def _coarse_conv(geometry: ConvGeometry):
    """The convolution on the patch grid used by the dilated rule (stride 1, dilation d / R)."""
    r = geometry.patch_size
    coarse_dilation = tuple(d // r for d in geometry.dilation)
    spans = [(k - 1) * d for k, d in zip(geometry.kernel_hw, coarse_dilation, strict=True)]
    pads = tuple((span // 2, span - span // 2) for span in spans)

    def conv(x_sum, kernel):
        return lax.conv_general_dilated(x_sum, kernel, (1, 1), pads, rhs_dilation=coarse_dilation,
                                        dimension_numbers=_DIMENSION_NUMBERS, feature_group_count=geometry.groups)
    return conv


def _forward(x, kernel, geometry: ConvGeometry):
    return lax.conv_general_dilated(x, kernel, geometry.strides, geometry.padding, rhs_dilation=geometry.dilation,
                                    dimension_numbers=_DIMENSION_NUMBERS, feature_group_count=geometry.groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def filtered_conv(x: jax.Array, kernel: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """Exact convolution (N, H, W, Ci) * (kh, kw, Ci/G, Co) -> (N, Ho, Wo, Co) with the filtered backward."""
    return _forward(x, kernel, geometry)


def block_layout(geometry: ConvGeometry, output_hw: tuple[int, int]):
    """The blocks of both spatial axes and the input window (R s_h, R s_w)."""
    r = geometry.patch_size
    axes = zip(geometry.input_hw, output_hw, geometry.strides, strict=True)
    blocks = tuple(_Blocks.make(i, o, r, s) for i, o, s in axes)
    return blocks, tuple(r * s for s in geometry.strides)


def _filtered_conv_fwd(x, kernel, geometry: ConvGeometry):
    if geometry.patch_size == 1:  # blocks of one pixel: nothing to filter, keep the exact backward
        y, pullback = jax.vjp(functools.partial(_forward, geometry=geometry), x, kernel)
        return y, pullback
    y = _forward(x, kernel, geometry)
    blocks, window = block_layout(geometry, y.shape[1:3])
    x_sum = sum_pool_input(x, blocks, window)
    # The dilated rule needs every tap; otherwise only the kernel summed over its window is kept.
    kernel_saved = kernel if geometry.dilated_rule else kernel.sum(axis=(0, 1))
    return y, (x_sum, kernel_saved)


def _filtered_conv_bwd(geometry: ConvGeometry, residuals, g):
    if geometry.patch_size == 1:
        return residuals(g)
    x_sum, kernel_saved = residuals
    blocks, window = block_layout(geometry, g.shape[1:3])
    g_mean = mean_pool_output_grad(g, blocks, geometry.patch_size)
    if geometry.dilated_rule:
        _, pullback = jax.vjp(_coarse_conv(geometry), x_sum, kernel_saved)
        gx_coarse, grad_kernel = pullback(g_mean)
    else:
        gx_coarse = _grouped_matmul_input(g_mean, kernel_saved, geometry.groups)
        grad_io = _grouped_matmul_weight(x_sum, g_mean, geometry.groups)
        grad_kernel = jnp.broadcast_to(grad_io, geometry.kernel_hw + grad_io.shape)
    grad_x = upsample_input_grad(gx_coarse, blocks, window)
    return grad_x.astype(g.dtype), grad_kernel.astype(kernel_saved.dtype)


filtered_conv.defvjp(_filtered_conv_fwd, _filtered_conv_bwd)


def _pair(value, name: str) -> tuple[int, int]:
    if value is None:
        return (1, 1)
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"gradient filtering supports 2-D convolutions only; got {name}={value}")
    return value


def make_geometry(patch_size: int, x_shape, kernel_shape, strides, padding, dilation, groups: int) -> ConvGeometry:
    """Validates a convolution for gradient filtering and returns its static geometry."""
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
    if len(x_shape) != 4:
        raise ValueError(f"gradient filtering supports NHWC inputs (N, H, W, C); got shape {tuple(x_shape)}")
    strides, dilation = _pair(strides, "strides"), _pair(dilation, "dilation")
    if isinstance(padding, str):
        spans = [(k - 1) * d + 1 for k, d in zip(kernel_shape[:2], dilation, strict=True)]
        padding = lax.padtype_to_pads(x_shape[1:3], spans, strides, padding)
    padding = tuple(tuple(int(v) for v in pair) for pair in padding)
    geometry = ConvGeometry(patch_size, strides, padding, dilation, int(groups), tuple(x_shape[1:3]),
                            tuple(kernel_shape[:2]))
    if geometry.dilated_rule and (dilation[0] != dilation[1] or dilation[0] % patch_size or strides != (1, 1)):
        raise ValueError(f"dilation {dilation} >= patch size {patch_size} needs equal dilations that are "
                             f"multiples of the patch size and stride 1; got strides {strides}")
    return geometry


@dataclasses.dataclass(frozen=True)
class FilteredConv:
    """Drop-in for ``lax.conv_general_dilated`` as ``nnx.Conv`` calls it, with the filtered backward.

    Frozen (hashable), so it is static in an NNX graph definition and survives split/merge/jit.
    """
    patch_size: int = 2

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                 precision=None, preferred_element_type=None, out_sharding=None):
        expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS)
        if dimension_numbers is not None and lax.conv_dimension_numbers(
                lhs.shape, rhs.shape, dimension_numbers) != expected:
            raise ValueError(f"gradient filtering supports NHWC/HWIO convolutions; got {dimension_numbers}")
        if any(d != 1 for d in _pair(lhs_dilation, "lhs_dilation")) or batch_group_count != 1:
            raise ValueError("gradient filtering does not support transposed (input-dilated) or batch-grouped "
                             "convolutions")
        geometry = make_geometry(self.patch_size, lhs.shape, rhs.shape, window_strides, padding, rhs_dilation,
                                 feature_group_count)
        return filtered_conv(lhs, rhs, geometry)


def backward_cost(x_shape, kernel_shape, y_shape, geometry: ConvGeometry | None, input_grad: bool = True) -> dict:
    """Analytic backward FLOPs (2 per multiply-add) and saved activation elements of one conv layer.

    ``geometry=None`` is exact backprop: weight gradient and input gradient each cost as many MACs
    as the forward (N Ho Wo k^2 Ci/G Co). Filtered: the same matmuls on the P x P patch grid with a
    1x1 kernel, plus one add per element of g_y for the pooling. ``input_grad=False`` for the first
    trained layer, whose input gradient nobody needs.
    """
    n, _, _, ci = x_shape
    kh, kw, ci_g, co = kernel_shape
    _, ho, wo, _ = y_shape
    if geometry is None:
        macs = n * ho * wo * kh * kw * ci_g * co
        return {"flops": 2 * macs * (2 if input_grad else 1), "activation_elements": math.prod(x_shape)}
    r = geometry.patch_size
    patches = n * (-(-ho // r)) * (-(-wo // r))
    macs = patches * ci_g * co
    pooling = math.prod(y_shape)
    return {"flops": 2 * macs * (2 if input_grad else 1) + pooling,
            "activation_elements": patches * ci}
