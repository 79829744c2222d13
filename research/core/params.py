"""NNX state utilities: parameter paths as strings, a module without running its initialisers, and
a checked write of one parameter (which splits flattened attention heads)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HEAD_AXES = ("q_heads", "kv_heads")  # logical names of a head axis; "head_dim" follows it


def path_str(path) -> str:
    """'blocks/0/conv' for a pytree key path (DictKey, GetAttrKey, SequenceKey entries) or an NNX
    graph path (str / int entries). Variables wrap their array in a "value" node; it is dropped so
    that a tree of Variables and a tree of arrays name the same array alike."""
    parts = []
    for entry in path:
        attr = next((a for a in ("name", "key", "idx") if hasattr(entry, a)), None)
        parts.append(str(getattr(entry, attr) if attr else entry))
    return "/".join(p for p in parts if p not in ("value", "raw_value"))


def zeros_module(make: Callable[[], nnx.Module]) -> nnx.Module:
    """The module ``make()`` builds, with every array zero, without running its initialisers."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))


def flat_heads_shape(names: Sequence | None, shape: Sequence[int]) -> tuple[int, ...] | None:
    """The shape with its (heads, head_dim) axes merged, e.g. (L, D, H, Dh) -> (L, D, H*Dh): how
    Hugging Face, GGUF and earlier checkpoints store a head-shaped kernel. None when the logical
    axis ``names`` have no head axis followed by "head_dim"."""
    names, shape = tuple(names or ()), tuple(shape)
    for i in range(len(names) - 1):
        if names[i] in HEAD_AXES and names[i + 1] == "head_dim":
            return shape[:i] + (shape[i] * shape[i + 1],) + shape[i + 2:]
    return None


def set_param(state: nnx.State, path: Sequence, value) -> None:
    """Sets the array at ``path`` of an NNX state to a float32 copy of ``value``. A head-shaped kernel
    also takes its flattened form (``flat_heads_shape``), split row-major into heads; any other shape
    that differs from the model's fails naming the path and both shapes. (A copy: a student built
    from a teacher must not share its buffers, or donating one's train state frees the other's arrays.)"""
    node = state
    for key in path[:-1]:
        node = node[key]
    variable = node[path[-1]]
    expected = tuple(variable.get_value().shape)
    found = tuple(np.shape(value))
    if found != expected and found == flat_heads_shape(variable.get_metadata().get("out_sharding"), expected):
        value = np.reshape(value, expected)
    elif found != expected:
        raise ValueError(f"parameter {'/'.join(map(str, path))}: checkpoint shape {found}, model expects {expected}")
    variable.set_value(jnp.array(value, jnp.float32, copy=True))
