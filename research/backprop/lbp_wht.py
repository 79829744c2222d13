"""LBP-WHT: low-rank backpropagation through a linear layer via the Walsh-Hadamard transform.

Yang et al., NeurIPS 2023, "Efficient Low-rank Backpropagation for Vision Transformer Adaptation".

A linear layer y = x @ W over tokens that form an h x w grid (prefix tokens such as the class
token first, then the grid in row-major order). The forward pass is exact. The backward pass
projects the output gradient, in each 8x8 block of the grid, onto a low-pass set S of 2-D
Walsh-Hadamard bases B_{r,c} = h_r h_c^T (h_r: row r of the sequency-ordered Hadamard matrix):

    X~_s = sum_block X * B_s                          (saved in the forward instead of X)
    G~_s = 1/64 sum_block G_y * B_s
    grad_X = crop( sum_s (G~_s W^T) outer B_s )
    grad_W = sum_{s, batch, blocks} X~_s^T G~_s

with LP_L1-k selection S = {(r, c): r + c < k}. Equivalently grad_X = P(G) W^T and
grad_W = X^T P(G), with P the orthogonal projection onto span(S) in each block. Prefix tokens
take the exact path. Backward matmuls shrink by about 64/|S| (21 of 64 bases for k = 6), and so
does the saved activation.

Padding: the grid is padded to multiples of the block with ZEROS, for X and for G. The reference
code pads X by reflection, which biases the weight gradient (padded positions get a nonzero
projected gradient and reflected activations, so they add to grad_W); with zeros they add
nothing, and with all 64 bases (k = 15) both gradients are exact.

Use on an nnx.Linear: ``linear.dot_general = LbpWhtDotGeneral(grid=(h, w), num_prefix_tokens=1)``.
The bias is added outside dot_general, so its gradient stays exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def sequency_hadamard(n: int = 8) -> np.ndarray:
    """(n, n) +-1 Hadamard matrix whose row r has exactly r sign changes (Walsh / sequency order).

    Built by Sylvester's construction H_2n = [[H, H], [H, -H]], then rows sorted by sign changes.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = np.ones((1, 1), np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    changes = (np.diff(h, axis=1) != 0).sum(axis=1)  # a permutation of 0..n-1
    return h[np.argsort(changes)].astype(np.float32)


def lowpass_indices(k: int, block: int = 8) -> tuple[tuple[int, int], ...]:
    """LP_L1-k selection S = {(r, c): r + c < k, 0 <= r, c < block}, ordered by (r + c, r).

    |S| = k(k+1)/2 for k <= block; k = 2*block - 1 keeps all block^2 bases.
    """
    if not 1 <= k <= 2 * block - 1:
        raise ValueError(f"k must be in [1, {2 * block - 1}] for block {block}, got {k}")
    pairs = [(r, c) for r in range(block) for c in range(block) if r + c < k]
    return tuple(sorted(pairs, key=lambda rc: (rc[0] + rc[1], rc[0])))


def wht_bases(k: int, block: int = 8) -> np.ndarray:
    """(|S|, block, block) float32 bases B_{r,c} = outer(h_r, h_c) for (r, c) in lowpass_indices."""
    h = sequency_hadamard(block)
    return np.stack([np.outer(h[r], h[c]) for r, c in lowpass_indices(k, block)])


# --- Block helpers. Tokens t: (N, h*w, C); blocks: (N, nbh, block, nbw, block, C). ---

def _to_blocks(t: jax.Array, grid: tuple[int, int], block: int) -> jax.Array:
    """Zero-pad the h x w grid to multiples of ``block`` and split it into blocks."""
    n, _, c = t.shape
    h, w = grid
    t = jnp.pad(t.reshape(n, h, w, c), ((0, 0), (0, -h % block), (0, -w % block), (0, 0)))
    return t.reshape(n, t.shape[1] // block, block, t.shape[2] // block, block, c)


def _from_blocks(t: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Inverse of _to_blocks: merge the blocks and crop the padding."""
    n, nbh, b, nbw, _, c = t.shape
    h, w = grid
    return t.reshape(n, nbh * b, nbw * b, c)[:, :h, :w].reshape(n, h * w, c)


# The custom VJP works in a "position-major" layout (block*block, M, C), M = N * n_blocks: row p
# holds pixel p of every block. Analysis and synthesis are then one GEMM each with the (|S|, 64)
# basis matrix, and the kernel matmuls one GEMM over (|S| M) rows, with no per-block batching.

def _to_position_major(t: jax.Array, grid: tuple[int, int], block: int) -> jax.Array:
    """(N, h*w, C) -> (block*block, N * n_blocks, C), zero-padded."""
    blocks = _to_blocks(t, grid, block)  # (N, nbh, i, nbw, j, C)
    n, nbh, _, nbw, _, c = blocks.shape
    return blocks.transpose(2, 4, 0, 1, 3, 5).reshape(block * block, n * nbh * nbw, c)


def _from_position_major(t: jax.Array, n: int, grid: tuple[int, int], block: int) -> jax.Array:
    """Inverse of _to_position_major: (block*block, N * n_blocks, C) -> (N, h*w, C), cropped."""
    nbh, nbw = -(-grid[0] // block), -(-grid[1] // block)
    c = t.shape[-1]
    blocks = t.reshape(block, block, n, nbh, nbw, c).transpose(2, 3, 0, 4, 1, 5)
    return _from_blocks(blocks, grid)


def _basis_matrix(k: int, block: int, dtype) -> jax.Array:
    """(|S|, block*block): row s is vec(B_s)."""
    return jnp.asarray(wht_bases(k, block).reshape(-1, block * block), dtype)


def _analysis(t: jax.Array, basis: jax.Array) -> jax.Array:
    """<T, B_s> per block: (64, M, C) -> (|S|, M, C), accumulated in float32."""
    p, m, c = t.shape
    return jnp.dot(basis, t.reshape(p, m * c), preferred_element_type=jnp.float32).reshape(-1, m, c)


def _synthesis(coeffs: jax.Array, basis: jax.Array) -> jax.Array:
    """sum_s coeffs_s B_s per block: (|S|, M, C) -> (64, M, C), accumulated in float32."""
    s, m, c = coeffs.shape
    return jnp.dot(basis.T, coeffs.reshape(s, m * c), preferred_element_type=jnp.float32).reshape(-1, m, c)


# --- The custom VJP on (N, T, C_in) x (C_in, C_out). ---

@dataclasses.dataclass(frozen=True)
class _Config:
    grid: tuple[int, int]
    num_prefix_tokens: int
    k: int
    block: int
    precision: Any = None
    preferred_element_type: Any = None


def _matmul(a: jax.Array, b: jax.Array, cfg: _Config, preferred=None) -> jax.Array:
    """a (..., C_in) @ b (C_in, C_out), the contraction nnx.Linear asks dot_general for."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), precision=cfg.precision,
                               preferred_element_type=preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lbp_wht(x: jax.Array, kernel: jax.Array, cfg: _Config) -> jax.Array:
    return _matmul(x, kernel, cfg, cfg.preferred_element_type)


def _lbp_wht_fwd(x, kernel, cfg: _Config):
    """Exact y; residuals (prefix (N, P, C_in), X~ (|S|, N * n_blocks, C_in), kernel). Not x."""
    p = cfg.num_prefix_tokens
    basis = _basis_matrix(cfg.k, cfg.block, x.dtype)
    # Stored in x's dtype, as exact backprop would store x, so memory shrinks by |S|/64.
    x_t = _analysis(_to_position_major(x[:, p:], cfg.grid, cfg.block), basis).astype(x.dtype)
    return _lbp_wht(x, kernel, cfg), (x[:, :p], x_t, kernel)


def _lbp_wht_bwd(cfg: _Config, residuals, g):
    prefix, x_t, kernel = residuals
    p, n = cfg.num_prefix_tokens, g.shape[0]
    dtype = jnp.result_type(x_t.dtype, kernel.dtype)  # matmul operands; accumulate in float32
    f32 = jnp.float32
    basis = _basis_matrix(cfg.k, cfg.block, dtype)
    g_prefix, g_grid = g[:, :p].astype(dtype), g[:, p:].astype(dtype)
    g_t = (_analysis(_to_position_major(g_grid, cfg.grid, cfg.block), basis) / cfg.block**2).astype(dtype)
    s, m, c_out = g_t.shape
    # grad_x: the kernel matmul on the |S| coefficients first (64/|S| cheaper), then synthesis.
    gx_t = jnp.dot(g_t.reshape(s * m, c_out), kernel.T, precision=cfg.precision, preferred_element_type=f32)
    gx_grid = _from_position_major(_synthesis(gx_t.astype(dtype).reshape(s, m, -1), basis), n, cfg.grid, cfg.block)
    gx_prefix = jnp.einsum("npo,io->npi", g_prefix, kernel, precision=cfg.precision, preferred_element_type=f32)
    grad_x = jnp.concatenate([gx_prefix, gx_grid], axis=1).astype(prefix.dtype)
    grad_kernel = (
        jnp.dot(x_t.reshape(s * m, -1).T, g_t.reshape(s * m, c_out), precision=cfg.precision,
                preferred_element_type=f32)
        + jnp.einsum("npi,npo->io", prefix, g_prefix, precision=cfg.precision, preferred_element_type=f32)
    )
    return grad_x, grad_kernel.astype(kernel.dtype)


_lbp_wht.defvjp(_lbp_wht_fwd, _lbp_wht_bwd)


def _check(x: jax.Array, kernel: jax.Array, grid, num_prefix_tokens: int, k: int, block: int):
    lowpass_indices(k, block)  # validates k and the block size
    if kernel.ndim != 2 or x.ndim < 2 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"expected x (..., T, C_in) and kernel (C_in, C_out), got {x.shape} and {kernel.shape}")
    h, w = grid
    if x.shape[-2] != num_prefix_tokens + h * w:
        raise ValueError(f"x has {x.shape[-2]} tokens, but num_prefix_tokens + h*w = "
                         f"{num_prefix_tokens} + {h}*{w} = {num_prefix_tokens + h * w}")


def lbp_wht_matmul(x: jax.Array, kernel: jax.Array, *, grid: tuple[int, int], num_prefix_tokens: int = 0,
                   k: int = 6, block: int = 8, precision=None, preferred_element_type=None) -> jax.Array:
    """y = x @ kernel exactly, with the LBP-WHT backward (see the module docstring).

    Args:
      x: (..., T, C_in), T = num_prefix_tokens + h*w: prefix tokens, then the grid row-major.
      kernel: (C_in, C_out).
      grid: (h, w) of the token grid.
      num_prefix_tokens: tokens before the grid (class token ...); their gradients are exact.
      k: LP_L1-k selection, 1 <= k <= 2*block - 1; keeps k(k+1)/2 bases for k <= block.
      block: block side, a power of two (8 in the paper).
      precision, preferred_element_type: as in jax.lax.dot_general.

    Returns:
      y: (..., T, C_out).
    """
    _check(x, kernel, grid, num_prefix_tokens, k, block)
    cfg = _Config(tuple(grid), num_prefix_tokens, k, block, precision, preferred_element_type)
    y = _lbp_wht(x.reshape(-1, *x.shape[-2:]), kernel, cfg)  # leading batch dims flattened
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _project_tokens(t: jax.Array, grid: tuple[int, int], k: int, block: int) -> jax.Array:
    """P(t) = crop(Pi(zero_pad(t))) on (N, h*w, C); Pi projects each block onto span(S)."""
    bases = wht_bases(k, block).reshape(-1, block * block)
    pi = jnp.asarray(bases.T @ bases / block**2)  # (64, 64) = 1/64 sum_s vec(B_s) vec(B_s)^T
    blocks = _to_blocks(t, grid, block)
    n, nbh, _, nbw, _, c = blocks.shape
    flat = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(n, nbh, nbw, block * block, c)
    flat = jnp.einsum("ij,nhwjc->nhwic", pi.astype(t.dtype), flat)
    blocks = flat.reshape(n, nbh, nbw, block, block, c).transpose(0, 1, 3, 2, 4, 5)
    return _from_blocks(blocks, grid)


def lbp_wht_matmul_reference(x: jax.Array, kernel: jax.Array, *, grid: tuple[int, int],
                             num_prefix_tokens: int = 0, k: int = 6, block: int = 8) -> jax.Array:
    """Plain-autodiff version of lbp_wht_matmul (no custom_vjp; stores full x; for tests).

    With z = x @ kernel on the grid tokens and P as in _project_tokens:

        y = stop_gradient(z) + (P(z) - stop_gradient(P(z)))

    The value is z exactly (p - p = 0), and the gradient reaches z only through P, so the
    cotangent of z is P^T(G). P = C Pi E (zero-pad E, per-block orthogonal projection Pi, crop
    C = E^T) is symmetric, so P^T(G) = P(G); the matmul then gives grad_x = P(G) kernel^T and
    grad_kernel = x^T P(G). Expanding Pi(G) = sum_s G~_s B_s with G~_s = 1/64 <G, B_s> gives the
    paper's grad_x = sum_s (G~_s kernel^T) outer B_s (cropped), and grad_kernel = sum_s X~_s^T G~_s
    with X~_s = <E(x), B_s>. Prefix tokens use plain x @ kernel, so their path is exact.
    """
    _check(x, kernel, grid, num_prefix_tokens, k, block)
    lead, (t, _) = x.shape[:-2], x.shape[-2:]
    z = (x.reshape(-1, *x.shape[-2:]) @ kernel)
    z_prefix, z_grid = z[:, :num_prefix_tokens], z[:, num_prefix_tokens:]
    p_grid = _project_tokens(z_grid, tuple(grid), k, block)
    z_grid = jax.lax.stop_gradient(z_grid) + (p_grid - jax.lax.stop_gradient(p_grid))
    return jnp.concatenate([z_prefix, z_grid], axis=1).reshape(*lead, t, -1)


@dataclasses.dataclass(frozen=True)
class LbpWhtDotGeneral:
    """Drop-in ``dot_general`` for nnx.Linear that gives the layer the LBP-WHT backward.

    ``linear.dot_general = LbpWhtDotGeneral(grid=(h, w), num_prefix_tokens=1)`` on a layer fed
    (N, T, C_in) tokens. Frozen and hashable, so it is static in nnx.split / jax.jit.
    """

    grid: tuple[int, int]
    num_prefix_tokens: int = 0
    k: int = 6
    block: int = 8

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(self.grid))  # a list would not hash
        lowpass_indices(self.k, self.block)

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 out_sharding=None):
        (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
        if (tuple(lhs_c), tuple(rhs_c), tuple(lhs_b), tuple(rhs_b)) != ((lhs.ndim - 1,), (0,), (), ()) or rhs.ndim != 2:
            raise ValueError("LbpWhtDotGeneral only supports nnx.Linear's contraction of the last axis of lhs "
                             f"with axis 0 of a 2-D rhs, got {dimension_numbers} for {lhs.shape} x {rhs.shape}")
        if out_sharding is not None:
            raise NotImplementedError("LbpWhtDotGeneral does not support out_sharding")
        return lbp_wht_matmul(lhs, rhs, grid=self.grid, num_prefix_tokens=self.num_prefix_tokens, k=self.k,
                              block=self.block, precision=precision, preferred_element_type=preferred_element_type)


def lbp_wht_cost(tokens_hw: tuple[int, int], num_prefix_tokens: int, c_in: int, c_out: int, k: int,
                 block: int = 8, batch: int = 1) -> dict:
    """Analytic backward cost of one linear layer: exact backprop vs LBP-WHT.

    FLOPs count a multiply-add as 2. With T = P + h*w tokens, n_b zero-padded blocks, |S| bases:
      exact_flops      = 2 * 2 * batch * T * C_in * C_out               (grad_x and grad_W matmuls)
      lbp_matmul_flops = 2 * 2 * batch * (P + n_b |S|) * C_in * C_out   (prefix exact + transform domain)
      lbp_transform_flops = batch * n_b * 64 * |S| * (2 C_in + C_out)   (one add per +-1 entry:
                         X~ in the forward, G~ and the synthesis of grad_x in the backward)
      lbp_flops        = lbp_matmul_flops + lbp_transform_flops
    Activation bytes (float32) saved for the backward (the kernel is a parameter, not counted):
      exact: batch * T * C_in * 4;  LBP-WHT: batch * (P + n_b |S|) * C_in * 4.
    The bias gradient (a sum over tokens) is the same in both and not counted.
    """
    h, w = tokens_hw
    n_s = len(lowpass_indices(k, block))
    n_blocks = -(-h // block) * -(-w // block)
    tokens = num_prefix_tokens + h * w
    rows = num_prefix_tokens + n_blocks * n_s  # rows of the backward matmuls under LBP-WHT
    exact = 4 * batch * tokens * c_in * c_out
    matmul = 4 * batch * rows * c_in * c_out
    transform = batch * n_blocks * block**2 * n_s * (2 * c_in + c_out)
    return {
        "num_bases": n_s,
        "num_blocks": n_blocks,
        "exact_flops": exact,
        "lbp_matmul_flops": matmul,
        "lbp_transform_flops": transform,
        "lbp_flops": matmul + transform,
        "flops_ratio": exact / (matmul + transform),
        "exact_activation_bytes": 4 * batch * tokens * c_in,
        "lbp_activation_bytes": 4 * batch * rows * c_in,
    }
