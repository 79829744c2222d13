"""Logical axis names of the models' parameters, and the one way to attach them.

A kernel carries logical names (``out_sharding`` metadata) that a mesh maps to its axes later
(``research.core.mesh.state_shardings``). ``logical`` attaches them without sharding the value
when it is created (``eager_sharding=False``), so a model builds outside any mesh and in any
thread, and importing the library changes no global Flax setting.
"""
from __future__ import annotations

from flax import nnx

CONV_SHARDING = (None, None, "conv_in", "conv_out")   # (kh, kw, in, out)
DEPTHWISE_SHARDING = (None, None, None, "conv_out")   # (kh, kw, 1, channels)
HEAD_SHARDING = ("embed", "classes")                  # (features, classes)


def logical(init, names: tuple):
    """``init`` whose Variables carry the logical axis ``names``, placed on a mesh later."""
    return nnx.with_partitioning(init, names, eager_sharding=False)
