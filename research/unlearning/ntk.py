"""Empirical neural tangent kernel of a model over any parameter subset, and the ridge solve on it.

For logits f(theta, x) in R^C and samples x_1..x_N, the Jacobian is J in R^{(N C) x P} with row
n C + c equal to d f_c(theta, x_n) / d theta (P = size of the parameter subset; the spec's G is
J^T). The empirical NTK is

    Theta = J J^T in R^{(N C) x (N C)},   Theta[(n, c), (m, d)] = <d f_c(x_n), d f_d(x_m)>.

Two ways to compute it (Novak et al. 2022, "Fast finite width neural tangent kernel"):

  ``mode="jacobian"``         J chunk by chunk (vmap of jacrev over samples), then J_a J_b^T.
                              Memory N C P floats; the fastest when that fits.
  ``mode="vector_products"``  never forms J: Theta_ab e = J_a (J_b^T e) by a VJP on chunk b and a
                              JVP on chunk a, vmapped over the basis vectors e of chunk b's
                              outputs. Memory per chunk pair only; cheap when the forward pass is.

The parameter subset is whatever ``Unlearnable.flat()`` exposes (an NNX filter chose it), so the
same code gives the full NTK and Fast-NTK's kernel over BatchNorm affine parameters or prompts.
Samples are processed in chunks of ``chunk_size`` to bound memory; with a ``mesh``, each chunk
is sharded over the ``data`` axis.

``ridge_solve`` computes J^T (J J^T + lam I)^{-1} r with a Cholesky factorisation in float64, in
sample space, or in parameter space by the push-through identity

    J^T (J J^T + lam I_{NC})^{-1} = (J^T J + lam I_P)^{-1} J^T

when P < N C (a P x P system instead of an NC x NC one).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import tqdm
from threadpoolctl import threadpool_limits
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from research.core.mesh import batch_sharding, replicated, to_host

# fn(theta (P,), images (n, ...)) -> logits (n, C)
FlatFn = Callable[[jax.Array, jax.Array], jax.Array]
NTK_MODES = ("jacobian", "vector_products")


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _place(images: np.ndarray, chunk_size: int, mesh: Mesh | None) -> tuple[jax.Array, int]:
    """One chunk on the device(s), padded to ``chunk_size`` rows so every chunk compiles once."""
    n = len(images)
    if n < chunk_size:
        images = np.concatenate([images, np.repeat(images[:1], chunk_size - n, 0)])
    if mesh is None:
        return jnp.asarray(images), n
    return jax.device_put(images, batch_sharding(mesh)), n


def _per_sample_jacobian(fn: FlatFn) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(theta, images (n, ...)) -> (n, C, P): C VJPs per sample, one sample at a time (vmap), so the
    cost is linear in n (jacrev of the batched function would cost n^2)."""
    one = jax.jacrev(lambda theta, x: fn(theta, x[None])[0])
    return jax.vmap(one, in_axes=(None, 0))


def _sharded_per_sample_jacobian(fn: FlatFn, mesh: Mesh) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The same with each device taking its slice of the samples (shard_map over ``data``).

    Not ``jax.jit`` with a batch sharding: XLA's SPMD partitioner (jax 0.10.2, CPU) returns wrong
    per-sample gradients of convolutions (the batch-grouped convolutions vmap produces) when the
    batch is sharded. Inside shard_map, theta is made device-varying so that its gradient stays
    per device instead of being summed over the mesh.
    """
    per_sample = _per_sample_jacobian(fn)

    def local(theta, images):
        return per_sample(jax.lax.pcast(theta, ("data",), to="varying"), images)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))


@functools.lru_cache(maxsize=4)  # a Gauss-Newton fit takes the Jacobian of one fn at every iteration
def _compiled_jacobian(fn: FlatFn, mesh: Mesh | None):
    return jax.jit(_per_sample_jacobian(fn) if mesh is None else _sharded_per_sample_jacobian(fn, mesh))


def jacobian(fn: FlatFn, theta: jax.Array, images: np.ndarray, *, chunk_size: int = 64,
             mesh: Mesh | None = None, progress: bool = False) -> jax.Array:
    """J: (N, C, P) float32, d logits[n, c] / d theta, computed ``chunk_size`` samples at a time
    (sharded over the mesh's ``data`` axis when a mesh is given; a progress bar over the chunks
    with ``progress``)."""
    if mesh is not None:
        if chunk_size % mesh.shape["data"]:
            raise ValueError(f"chunk_size {chunk_size} must be a multiple of the mesh's data axis "
                             f"({mesh.shape['data']})")
        theta = jax.device_put(theta, replicated(mesh))
    jac = _compiled_jacobian(fn, mesh)
    out = None  # filled in place: a list of chunks then a concatenation would hold J twice
    for start, stop in tqdm.tqdm(_chunks(len(images), chunk_size), desc="NTK Jacobian", unit="chunk",
                                 disable=not progress, leave=False):
        chunk, n = _place(images[start:stop], chunk_size, mesh)
        part = to_host(jac(theta, chunk))[:n]  # every process gets the whole chunk
        if out is None:
            out = np.empty((len(images), *part.shape[1:]), part.dtype)
        out[start:stop] = part
    return jnp.asarray(out)


def flat_rows(jac: jax.Array) -> jax.Array:
    """(N, C, P) -> (N C, P), row n C + c."""
    return jac.reshape(-1, jac.shape[-1])


@jax.jit
def gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """a b^T at full float32 precision: (M, K) x (N, K) -> (M, N)."""
    return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def ntk_from_jacobians(jac_a: jax.Array, jac_b: jax.Array | None = None) -> jax.Array:
    """Theta_ab = J_a J_b^T: (N_a C, N_b C) from (N_a, C, P) and (N_b, C, P)."""
    a = flat_rows(jac_a)
    return gram(a, a if jac_b is None else flat_rows(jac_b))


def _ntk_block_by_products(fn: FlatFn) -> Callable:
    """(theta, images_a (na, ...), images_b (nb, ...)) -> Theta_ab (na C, nb C) without forming J."""
    def block(theta, xa, xb):
        out_b, vjp_b = jax.vjp(lambda t: fn(t, xb), theta)
        nb, c = out_b.shape
        basis = jnp.eye(nb * c, dtype=out_b.dtype).reshape(nb * c, nb, c)

        def column(e):  # Theta_ab e = J_a (J_b^T e)
            (u,) = vjp_b(e)
            return jax.jvp(lambda t: fn(t, xa), (theta,), (u,))[1].reshape(-1)
        return jax.vmap(column)(basis).T
    return block


def empirical_ntk(fn: FlatFn, theta: jax.Array, images_a: np.ndarray, images_b: np.ndarray | None = None, *,
                  mode: str = "jacobian", chunk_size: int = 64, mesh: Mesh | None = None) -> jax.Array:
    """Theta between two sets of samples: (N_a C, N_b C) float32, rows n C + c (``images_b`` None: a = b)."""
    if mode not in NTK_MODES:
        raise ValueError(f"unknown NTK mode {mode!r}; choose one of: {', '.join(NTK_MODES)}")
    same = images_b is None
    images_b = images_a if same else images_b
    if mode == "jacobian":
        jac_a = jacobian(fn, theta, images_a, chunk_size=chunk_size, mesh=mesh)
        jac_b = jac_a if same else jacobian(fn, theta, images_b, chunk_size=chunk_size, mesh=mesh)
        return ntk_from_jacobians(jac_a, jac_b)
    block = jax.jit(_ntk_block_by_products(fn))
    rows = []
    for sa, ea in _chunks(len(images_a), chunk_size):
        xa, na = _place(images_a[sa:ea], chunk_size, mesh)
        cols = []
        for sb, eb in _chunks(len(images_b), chunk_size):
            xb, nb = _place(images_b[sb:eb], chunk_size, mesh)
            k = to_host(block(theta, xa, xb))
            c = k.shape[0] // chunk_size
            cols.append(k[:na * c, :nb * c])
        rows.append(np.concatenate(cols, axis=1))
    return jnp.asarray(np.concatenate(rows, axis=0))


def transpose_product(fn: FlatFn, theta: jax.Array, images: np.ndarray, v: np.ndarray, *,
                      chunk_size: int = 64) -> jax.Array:
    """J^T v for v (N, C): one VJP per chunk (the last padded with zero cotangents), summed. (P,)."""
    vjp = jax.jit(lambda t, x, cot: jax.vjp(lambda t_: fn(t_, x), t)[1](cot)[0])
    v = np.asarray(v)
    u = jnp.zeros_like(theta)
    for start, stop in _chunks(len(images), chunk_size):
        x, n = _place(images[start:stop], chunk_size, None)
        cot = np.zeros((chunk_size,) + v.shape[1:], v.dtype)
        cot[:n] = v[start:stop]
        u = u + vjp(theta, x, jnp.asarray(cot))
    return u


def ntk_vector_product(fn: FlatFn, theta: jax.Array, images: np.ndarray, v: jax.Array, *,
                       chunk_size: int = 64) -> jax.Array:
    """Theta v = J (J^T v) for v (N, C), returning (N, C), without forming J or Theta."""
    u = transpose_product(fn, theta, images, v, chunk_size=chunk_size)
    jvp = jax.jit(lambda t, x, u: jax.jvp(lambda t_: fn(t_, x), (t,), (u,))[1])
    out = [np.asarray(jvp(theta, _place(images[s:e], chunk_size, None)[0], u))[:e - s]
           for s, e in _chunks(len(images), chunk_size)]
    return jnp.asarray(np.concatenate(out))


# OpenBLAS's multi-threaded Cholesky (dpotrf) segfaults on large matrices: reproduced with the
# scipy-openblas 0.3.31 wheels (scipy and numpy alike) at n = 16,384 and 20,000 on 2 threads, while
# n = 12,000 and a single thread at 20,000 were fine. Above this size the factorisation runs on one
# BLAS thread (20,000: 54 s on this 2-core machine).
THREADED_CHOLESKY_MAX_N = 8192


def cholesky_solve(matrix: np.ndarray, rhs: np.ndarray, ridge: float) -> np.ndarray:
    """(A + ridge I)^{-1} rhs in float64 by Cholesky (A symmetric positive semi-definite; not modified)."""
    a = np.array(matrix, np.float64)  # a copy, factorised in place
    a[np.diag_indices_from(a)] += ridge
    single_thread = len(a) > THREADED_CHOLESKY_MAX_N
    with threadpool_limits(1, user_api="blas") if single_thread else contextlib.nullcontext():
        factor = scipy.linalg.cho_factor(a, lower=True, overwrite_a=True)
    return scipy.linalg.cho_solve(factor, np.asarray(rhs, np.float64))


def solve_space(num_outputs: int, num_params: int) -> str:
    """Where the ridge system is smaller: "parameters" (P x P) or "samples" (NC x NC)."""
    return "parameters" if num_params < num_outputs else "samples"


def ridge_solve(jac: jax.Array, residual: jax.Array, ridge: float, *, space: str = "auto") -> jax.Array:
    """J^T (J J^T + ridge I)^{-1} r: (P,) from J (M, P) (or (N, C, P)) and r (M,) (or (N, C)).

    ``space="samples"`` factors the M x M kernel; ``"parameters"`` the P x P matrix J^T J (the
    push-through identity); ``"auto"`` the smaller one. Both equal mathematically; float64 Cholesky.
    """
    j = flat_rows(jac) if jac.ndim == 3 else jac
    r = np.asarray(residual, np.float64).reshape(-1)
    m, p = j.shape
    if space == "auto":
        space = solve_space(m, p)
    if space == "samples":
        alpha = cholesky_solve(np.asarray(gram(j, j)), r, ridge)
        return jnp.matmul(j.T, jnp.asarray(alpha, j.dtype), precision=jax.lax.Precision.HIGHEST)
    if space == "parameters":
        jt_r = np.asarray(jnp.matmul(j.T, jnp.asarray(r, j.dtype), precision=jax.lax.Precision.HIGHEST))
        return jnp.asarray(cholesky_solve(np.asarray(gram(j.T, j.T)), jt_r, ridge), j.dtype)
    raise ValueError(f"unknown solve space {space!r}; choose one of: auto, samples, parameters")


def nested_ridge_solves(jac: jax.Array, residual: jax.Array, n_first: int, ridge_all: float, ridge_first: float,
                        *, space: str = "auto") -> tuple[jax.Array, jax.Array]:
    """``ridge_solve`` over all N samples and over the first ``n_first`` of them, sharing one Gram
    matrix: ((P,), (P,)) from J (N, C, P) and r (N, C).

    The two systems are nested (NTK scrubbing solves on D and on its first rows, D_r), so their
    matrices need not be built twice: in sample space K_rr is the leading block of K = J J^T; in
    parameter space J^T J = J_r^T J_r + J_f^T J_f, and the forget part is the smaller product.
    Equal to two ``ridge_solve`` calls up to float rounding, at about half the matmul cost.
    """
    if jac.ndim != 3:
        raise ValueError(f"jac must be (N, C, P), got shape {jac.shape}")
    if not 0 < n_first <= jac.shape[0]:
        raise ValueError(f"n_first must be in 1..{jac.shape[0]}, got {n_first}")
    j = flat_rows(jac)
    r = np.asarray(residual, np.float64).reshape(-1)
    m, p = j.shape
    m_first = n_first * jac.shape[1]
    if space == "auto":
        space = solve_space(m, p)
    if space == "samples":
        kernel = np.asarray(gram(j, j))
        alpha_all = cholesky_solve(kernel, r, ridge_all)
        alpha_first = cholesky_solve(kernel[:m_first, :m_first], r[:m_first], ridge_first)
        del kernel
        return (jnp.matmul(j.T, jnp.asarray(alpha_all, j.dtype), precision=jax.lax.Precision.HIGHEST),
                jnp.matmul(j[:m_first].T, jnp.asarray(alpha_first, j.dtype), precision=jax.lax.Precision.HIGHEST))
    if space == "parameters":
        first, rest = j[:m_first], j[m_first:]
        gram_first = np.asarray(gram(first.T, first.T), np.float64)
        gram_all = gram_first + np.asarray(gram(rest.T, rest.T), np.float64)
        jt_r_first = np.asarray(jnp.matmul(first.T, jnp.asarray(r[:m_first], j.dtype),
                                           precision=jax.lax.Precision.HIGHEST), np.float64)
        jt_r_all = jt_r_first + np.asarray(jnp.matmul(rest.T, jnp.asarray(r[m_first:], j.dtype),
                                                      precision=jax.lax.Precision.HIGHEST), np.float64)
        return (jnp.asarray(cholesky_solve(gram_all, jt_r_all, ridge_all), j.dtype),
                jnp.asarray(cholesky_solve(gram_first, jt_r_first, ridge_first), j.dtype))
    raise ValueError(f"unknown solve space {space!r}; choose one of: auto, samples, parameters")
