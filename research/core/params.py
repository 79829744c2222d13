"""NNX state utilities for loaders and converters: a module without running its initialisers, and
a checked write of one parameter."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def zeros_module(make: Callable[[], nnx.Module]) -> nnx.Module:
    """The module ``make()`` builds, with every array zero, without running its initialisers."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))


def set_param(state: nnx.State, path: Sequence, value) -> None:
    """Sets the array at ``path`` of an NNX state to a float32 copy of ``value``; a shape that
    differs from the model's fails naming the path and both shapes. (A copy: a student built from a
    teacher must not share its buffers, or donating one's train state frees the other's arrays.)"""
    node = state
    for key in path[:-1]:
        node = node[key]
    variable = node[path[-1]]
    expected = tuple(variable.get_value().shape)
    if tuple(np.shape(value)) != expected:
        raise ValueError(f"parameter {'/'.join(map(str, path))}: checkpoint shape {tuple(np.shape(value))}, "
                         f"model expects {expected}")
    variable.set_value(jnp.array(value, jnp.float32, copy=True))
