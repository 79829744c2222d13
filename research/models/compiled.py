"""Run a submodule as a program compiled once per structure, for networks that are built and run
many times with different architectures (zero-cost NAS scores thousands of them).

Compiling a whole network per architecture costs more than running it once, and running it
primitive by primitive pays a dispatch per primitive. ``run_compiled(module, x)`` sits between:
one program per (module structure, input shape), shared by every module of that structure in
every network, so an NB201 cell network or a MobileNet candidate runs as a few dozen cached
programs. Weights are arguments, not constants, so two modules with equal structure and
different weights share the program.
"""
from __future__ import annotations

import functools

import jax
from flax import nnx

from research.models import taps


@functools.partial(jax.jit, static_argnums=0)
def _compiled_call(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array):
    module = nnx.merge(graphdef, state, copy=True)
    return module(x), nnx.state(module, nnx.BatchStat)


def _updates_statistics(module: nnx.Module) -> bool:
    return any(isinstance(m, nnx.BatchNorm) and not m.use_running_average
               for _, m in nnx.iter_modules(module))


def run_compiled(module: nnx.Module, x: jax.Array) -> jax.Array:
    """``module(x)`` through the program cached for its structure and ``x``'s shape. In training
    mode its BatchNorm statistics are written back as a plain call would. While activations are
    being recorded (``taps.recording``, which records at trace time) the module runs inline.
    Works under ``jax.grad`` (the program is differentiated once and reused) and inside ``jit``."""
    if taps.is_recording():
        return module(x)
    graphdef, state = nnx.split(module)
    y, statistics = _compiled_call(graphdef, state, x)
    if _updates_statistics(module):
        nnx.update(module, statistics)
    return y
