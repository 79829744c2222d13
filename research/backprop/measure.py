"""Measured cost of one backward pass: wall time, XLA's FLOP count, saved residuals, peak scratch.

The forward and the backward are compiled separately: ``jax.vjp`` under ``jit`` returns the
pullback as a pytree whose leaves are exactly the residuals the forward saved, so the backward
can be timed alone and its saved activations counted.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def backward_profile(loss_fn: Callable, params, *args, repeats: int = 5) -> dict:
    """Profile the backward of ``loss_fn(params, *args) -> scalar`` with respect to ``params``.

    Returns seconds (median over ``repeats`` after one warm-up call), flops (XLA's cost analysis of
    the compiled backward program), residual_bytes (everything the forward saved for it, including
    frozen weights that an input gradient needs and arrays that one fused program would not keep,
    such as the zeros of ReLU6's gradient), temp_bytes (XLA's scratch for the backward alone) and
    grad_temp_bytes (XLA's scratch for forward + backward compiled as one ``jax.grad`` program:
    the peak memory a training step needs beyond its inputs and outputs).
    """
    forward = jax.jit(lambda p, *a: jax.vjp(lambda q: loss_fn(q, *a), p))
    backward = jax.jit(lambda pullback, cotangent: pullback(cotangent)[0])
    loss, pullback = forward(params, *args)
    cotangent = jnp.ones_like(loss)
    compiled = backward.lower(pullback, cotangent).compile()
    jax.block_until_ready(compiled(pullback, cotangent))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(pullback, cotangent))
        seconds.append(time.perf_counter() - start)
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax returns one dict per program
        cost = cost[0] if cost else {}
    memory = compiled.memory_analysis()
    grad_memory = jax.jit(jax.grad(loss_fn)).lower(params, *args).compile().memory_analysis()
    return {
        "seconds": statistics.median(seconds),
        "flops": float(cost.get("flops", float("nan"))),
        "residual_bytes": int(sum(leaf.nbytes for leaf in jax.tree.leaves(pullback))),
        "temp_bytes": int(memory.temp_size_in_bytes) if memory is not None else -1,
        "grad_temp_bytes": int(grad_memory.temp_size_in_bytes) if grad_memory is not None else -1,
    }
