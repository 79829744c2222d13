"""Switch efficient backprop on for chosen layers of any NNX model, without editing model code.

``nnx.Conv`` calls its attribute ``conv_general_dilated`` and ``nnx.Linear`` its attribute
``dot_general``; replacing them with ``FilteredConv`` / ``LbpWhtDotGeneral`` (frozen, hashable
callables) changes only the backward pass of those layers.

Layers are found by tracing one forward pass (``trace_layers``), which records every conv and
linear call in execution order with its shapes, so "the last N convolutions" means the last N
that run, whatever the attribute order of the model. Typical use::

    calls = trace_layers(model, (224, 224, 3))
    chosen = select_layers(calls, "conv", last_n=2)           # or pattern=r"blocks/1[56]/"
    enable_gradient_filter(model, chosen, patch_size=4)
    trainable = layer_params_filter(chosen, include_head=True)  # nnx filter for the train state
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from research.backprop.gradient_filter import FilteredConv, make_geometry
from research.backprop.lbp_wht import LbpWhtDotGeneral
from research.core.params import path_str
from research.models.filters import conv_and_linear_layers

LAYER_KINDS = ("conv", "linear")
_ATTRIBUTE = {"conv": "conv_general_dilated", "linear": "dot_general"}


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of a conv or linear layer: its path in the model and its shapes (batch 1)."""
    path: str                 # e.g. "blocks/16/project/conv"
    kind: str                 # "conv" | "linear"
    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    conv_args: tuple = ()     # (strides, padding, dilation, groups) of a conv

    def geometry(self, patch_size: int):
        """The gradient-filter geometry of this conv for patch size R."""
        strides, padding, dilation, groups = self.conv_args
        return make_geometry(patch_size, self.input_shape, self.kernel_shape, strides, padding, dilation, groups)


def _layers(model: nnx.Module):
    for path, kind, node in conv_and_linear_layers(model):
        yield path_str(path), kind, node


def trace_layers(model: nnx.Module, input_shape: Sequence[int]) -> list[LayerCall]:
    """Every conv / linear call of ``model`` on one (1, *input_shape) input, in execution order.

    Runs under ``jax.eval_shape`` on a copy in eval mode: no FLOPs, and ``model`` is untouched.
    """
    graphdef, state = nnx.split(model)
    calls: list[LayerCall] = []

    def recorder(path, kind, original):
        def call(lhs, rhs, *args, **kwargs):
            out = original(lhs, rhs, *args, **kwargs)
            conv_args = ()
            if kind == "conv":
                names = ("window_strides", "padding")[:len(args)]
                given = dict(zip(names, args[:len(names)], strict=True)) | kwargs
                conv_args = (given["window_strides"], given["padding"], given.get("rhs_dilation"),
                             given.get("feature_group_count", 1))
            calls.append(LayerCall(path, kind, tuple(lhs.shape), tuple(rhs.shape), tuple(out.shape), conv_args))
            return out
        return call

    def forward(state, x):
        copy = nnx.merge(graphdef, state)
        copy.eval()
        for path, kind, layer in _layers(copy):
            setattr(layer, _ATTRIBUTE[kind], recorder(path, kind, getattr(layer, _ATTRIBUTE[kind])))
        return copy(x)

    jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return calls


def select_layers(calls: Sequence[LayerCall], kind: str, *, last_n: int = 0, pattern: str = "") -> list[LayerCall]:
    """The calls of ``kind`` whose path matches ``pattern`` (regex search; "" = all), then the last ``last_n``.

    A layer called twice is kept once, at its last call. Raises ValueError when nothing matches.
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; choose one of: {', '.join(LAYER_KINDS)}")
    regex = re.compile(pattern)
    # dict order is first insertion; popping first keeps each path at its last call
    latest: dict[str, LayerCall] = {}
    for c in calls:
        if c.kind == kind and regex.search(c.path):
            latest.pop(c.path, None)
            latest[c.path] = c
    chosen = list(latest.values())
    if last_n:
        chosen = chosen[-last_n:]
    if not chosen:
        paths = ", ".join(sorted({c.path for c in calls if c.kind == kind})) or "none"
        raise ValueError(f"no {kind} layer matches pattern {pattern!r}; the model's {kind} layers: {paths}")
    return chosen


def _layer_at(model: nnx.Module, path: str):
    node = model
    for part in path.split("/"):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def enable_gradient_filter(model: nnx.Module, layers: Sequence[LayerCall], patch_size: int) -> None:
    """Gives each chosen conv layer the filtered backward with R = ``patch_size`` (in place)."""
    for call in layers:
        if call.kind != "conv":
            raise ValueError(f"gradient filtering applies to conv layers; {call.path} is {call.kind}")
        call.geometry(patch_size)  # fail now, with the layer's name, if the conv is not supported
        _layer_at(model, call.path).conv_general_dilated = FilteredConv(patch_size)


def token_grid(num_tokens: int, num_prefix_tokens: int) -> tuple[int, int]:
    """The square h x w grid of ``num_tokens - num_prefix_tokens`` patch tokens."""
    side = math.isqrt(num_tokens - num_prefix_tokens)
    if side * side != num_tokens - num_prefix_tokens:
        raise ValueError(f"{num_tokens} tokens minus {num_prefix_tokens} prefix tokens is not a square grid")
    return side, side


def enable_lbp_wht(model: nnx.Module, layers: Sequence[LayerCall], k: int, num_prefix_tokens: int = 1,
                   grid: tuple[int, int] | None = None) -> None:
    """Gives each chosen linear layer over tokens (N, T, C) the LBP-WHT backward with LP_L1-``k`` (in place).

    ``grid``: the token grid (h, w); by default a square grid of the T - ``num_prefix_tokens`` tokens.
    """
    for call in layers:
        if call.kind != "linear" or len(call.input_shape) != 3:
            raise ValueError(f"LBP-WHT applies to linear layers over tokens (N, T, C); {call.path} takes "
                             f"{call.input_shape}")
        hw = grid or token_grid(call.input_shape[1], num_prefix_tokens)
        _layer_at(model, call.path).dot_general = LbpWhtDotGeneral(grid=tuple(hw), num_prefix_tokens=num_prefix_tokens,
                                                                   k=k)


def layer_params_filter(layers: Sequence[LayerCall], include_head: bool = True):
    """An NNX filter for the Params of the chosen layers (and of the classifier ``head``)."""
    prefixes = [tuple(c.path.split("/")) for c in layers]

    def chosen(path, value) -> bool:
        parts = tuple(str(p) for p in path)
        return any(parts[:len(p)] == p for p in prefixes) or (include_head and "head" in parts)
    return nnx.All(nnx.Param, chosen)
