"""LoRA for any NNX model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen layer with kernel W gets a trainable low-rank update (paper eq. 3, with the scaling of
section 4.1):

    y = W x + (alpha / r) B A x,        A: in -> r (random init),  B: r -> out (zero init),

so a fresh adapter changes nothing. ``add_lora`` wraps every ``nnx.Linear``, ``nnx.Conv`` and
``nnx.Einsum`` whose path (e.g. ``"blocks/3/attn/q"``) matches a regex in a ``LoraLayer`` placed
where the layer was. The original layer lives on as ``.../q/base`` (its params keep their names
under ``.../q/base/kernel``) and each named adapter as ``.../q/lora/NAME/{a,b}``, ``nnx.LoRAParam``
variables, so ``lora_filter`` / ``trainable_filter`` select them for ``create_train_state``.

The feature set follows HF PEFT: several named adapters, ``modules_to_save`` (the head),
``merge`` / ``unmerge`` / ``merge_and_unload``, and adapters-only checkpoints.

Shapes. A kernel's axes split into input axes (contracted with x) and output axes:
  Linear (in, out):            A (in, r),           B (r, out)
  Conv (kh, kw, in, out):      A (kh, kw, in, r),   B (r, out)    A is a conv with the base's
                                                                  strides/padding/dilation; B is
                                                                  the 1x1 conv r -> out (a matmul
                                                                  over channels)
  Einsum (kernel_shape):       A (*in_dims, r),     B (r, *out_dims)   in the einsum string's order;
                                                                  B A x is two einsums (the dense
                                                                  delta only when a kernel axis is
                                                                  batched with the input)
In every case the dense update is ``delta = (alpha / r) * tensordot(A, B, 1)``, transposed back to
the kernel's axis order; ``merge`` adds exactly this delta to W and ``unmerge`` subtracts it.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax import lax

from research.core.checkpoint import CheckpointMismatchError
from research.core.params import path_str

ADAPTABLE = (nnx.Linear, nnx.Conv, nnx.Einsum)
CHECKPOINT_FORMAT = "research.adapters.lora/1"

__all__ = ["LoraAdapter", "LoraLayer", "LoraSpec", "adapter_names", "add_lora", "delete_adapter", "load_adapters",
           "lora_filter", "lora_layers", "merge", "merge_and_unload", "read_adapter_config", "save_adapters",
           "set_active",
           "trainable_filter", "unmerge"]


@dataclass(frozen=True)
class LoraSpec:
    """Which layers to adapt and how: ``pattern`` is a regex searched in the layer path
    ("blocks/3/attn/q"); ``alpha / rank`` scales the update; ``dropout`` applies to the adapter input."""
    pattern: str
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"LoRA pattern {self.pattern!r} is not a valid regex: {e}") from None


class LoraAdapter(nnx.Module):
    """One named update of one layer: the factors ``a`` (*in_dims, r) and ``b`` (r, *out_dims).

    ``active`` and ``merged`` are static flags: changing them changes the graph definition, so
    build train states after ``set_active`` / ``merge``.
    """

    def __init__(self, a_shape, b_shape, names_a, names_b, spec: LoraSpec, name: str, dtype,
                 *, rngs: nnx.Rngs, lead: int = 0):
        self.rank = spec.rank
        self.alpha = float(spec.alpha)
        # PEFT's kaiming_uniform(a=sqrt(5)) on A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) over all input
        # axes; the ``lead`` stacked-layer axes are independent layers.
        a_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                                   in_axis=tuple(range(lead, len(a_shape) - 1)), out_axis=-1,
                                                   batch_axis=tuple(range(lead)))
        self.a = nnx.LoRAParam(a_init(rngs.params(), a_shape, dtype), adapter=name, **_sharding(names_a))
        self.b = nnx.LoRAParam(jnp.zeros(b_shape, dtype), adapter=name, **_sharding(names_b))
        # Own "dropout" stream forked from rngs; no RNG state at all when dropout is off.
        self.dropout = nnx.Dropout(spec.dropout, rngs=rngs if spec.dropout > 0 else None)
        if spec.dropout > 0 and lead:  # stacked layers: one key per layer, so lax.scan can slice them
            stream, layers = self.dropout.rngs, tuple(a_shape[:lead])
            stream.key.set_value(jax.random.split(stream.key[...], layers))
            stream.count.set_value(jnp.zeros(layers, stream.count[...].dtype))
        self.active = True
        self.merged = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _sharding(names) -> dict:
    # Metadata only (as research.core.mesh.logical): the mesh maps the names to devices later.
    return {"out_sharding": tuple(names), "eager_sharding": False} if names is not None else {}


class LoraLayer(nnx.Module):
    """``base(x) + sum over active, unmerged adapters of (alpha/r) B A dropout(x)``.

    ``base`` is the original Linear / Conv / Einsum, unchanged; ``lora`` maps adapter names to
    ``LoraAdapter``. ``in_axes`` / ``out_axes`` are the kernel axes contracted with the input and
    the kernel axes that reach the output.

    Layers stacked for ``lax.scan`` (research.models.llama) have ``lead`` extra leading kernel axes,
    one entry per layer; their adapters get the same leading axes, so the scan hands every layer
    its own factors, and ``delta`` / ``merge`` work layer by layer.
    """

    def __init__(self, base: nnx.Module):
        if isinstance(base, nnx.Conv):
            if base.feature_group_count != 1:
                raise ValueError("LoRA on grouped conv not supported (feature_group_count="
                                 f"{base.feature_group_count})")
            if base.mask is not None:
                raise ValueError("LoRA on masked conv not supported")
            _lax_padding(base.padding, len(base.kernel_size))  # fail now, not at the first call
            ndim = base.kernel[...].ndim
            in_axes, out_axes = tuple(range(ndim - 1)), (ndim - 1,)
        elif isinstance(base, nnx.Einsum):
            in_axes, out_axes = _einsum_axes(base.einsum_str, len(base.kernel_shape))
        elif isinstance(base, nnx.Linear):
            in_axes, out_axes = (0,), (1,)
        else:
            raise TypeError(f"LoRA adapts nnx.Linear, nnx.Conv and nnx.Einsum, not {type(base).__name__}")
        natural = len(in_axes) + len(out_axes)
        self.lead = base.kernel[...].ndim - natural if isinstance(base, (nnx.Linear, nnx.Einsum)) else 0
        self.base = base
        self.in_axes, self.out_axes = in_axes, out_axes
        self.factored = _factored_einsums(base.einsum_str, in_axes, out_axes) if isinstance(base, nnx.Einsum) else None
        self.lora = nnx.Dict()

    def add(self, name: str, spec: LoraSpec, rngs: nnx.Rngs) -> None:
        kernel = self.base.kernel
        shape = kernel[...].shape
        names = kernel.get_metadata().get("out_sharding")
        lead = self.lead
        a_shape = shape[:lead] + tuple(shape[lead + i] for i in self.in_axes) + (spec.rank,)
        b_shape = shape[:lead] + (spec.rank,) + tuple(shape[lead + i] for i in self.out_axes)
        # A keeps the kernel's input-axis names and B its output-axis names, so both shard like W.
        names_a = names_b = None
        if names is not None:
            names_a = tuple(names[:lead]) + tuple(names[lead + i] for i in self.in_axes) + (None,)
            names_b = tuple(names[:lead]) + (None,) + tuple(names[lead + i] for i in self.out_axes)
        self.lora[name] = LoraAdapter(a_shape, b_shape, names_a, names_b, spec, name, kernel[...].dtype,
                                      rngs=rngs, lead=lead)

    def delta(self, name: str, dtype=jnp.float32) -> jax.Array:
        """The dense update (alpha/r) * A B of adapter ``name`` in the kernel's shape and axis order."""
        adapter = self.lora[name]
        # tensordot gives (*in_dims, *out_dims); put the axes back in the kernel's order.
        order = np.argsort(self.in_axes + self.out_axes)

        def one_layer(a, b):
            return jnp.transpose(jnp.tensordot(a, b, axes=1, precision=lax.Precision.HIGHEST), order)

        for _ in range(self.lead):
            one_layer = jax.vmap(one_layer)
        return adapter.scale * one_layer(adapter.a[...].astype(dtype), adapter.b[...].astype(dtype))

    def merge(self, name: str) -> None:
        """W <- W + delta (computed in float32, identically in ``unmerge``)."""
        self._add_to_kernel(name, +1.0)
        self.lora[name].merged = True

    def unmerge(self, name: str) -> None:
        """W <- W - delta: undoes ``merge`` up to float rounding."""
        self._add_to_kernel(name, -1.0)
        self.lora[name].merged = False

    def _add_to_kernel(self, name: str, sign: float) -> None:
        kernel = self.base.kernel
        w = kernel.get_value()
        kernel.set_value((w.astype(jnp.float32) + sign * self.delta(name)).astype(w.dtype))

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        y = self.base(x, *args, **kwargs)
        for name, adapter in self.lora.items():
            if adapter.active and not adapter.merged:
                y = y + self._update(name, adapter.dropout(x)).astype(y.dtype)
        return y

    def _update(self, name: str, x: jax.Array) -> jax.Array:
        """(alpha/r) B A x for adapter ``name``, in the base layer's computation dtype."""
        base, adapter = self.base, self.lora[name]
        x, a, b = base.promote_dtype((x, adapter.a[...], adapter.b[...]), dtype=base.dtype)
        if isinstance(base, nnx.Einsum) and self.factored is not None:
            # x -> A x (..., r) -> B (A x): two einsums, as for Linear; never the dense delta.
            to_rank, from_rank = self.factored
            h = base.einsum_op(to_rank, x, a, precision=base.precision)
            return base.einsum_op(from_rank, h * jnp.asarray(adapter.scale, h.dtype), b, precision=base.precision)
        if isinstance(base, nnx.Einsum):
            # A kernel axis batched with the input has no factorised form: the dense delta per call.
            delta = self.delta(name, x.dtype)
            return base.einsum_op(base.einsum_str, x, delta, precision=base.precision)
        # A x: a conv with the base's geometry (..., H', W', r) or a matmul (..., r).
        h = _conv_like(base, x, a) if isinstance(base, nnx.Conv) else jnp.matmul(x, a, precision=base.precision)
        # Scale the rank-r activations rather than the output: r << out values to multiply.
        return jnp.matmul(h * jnp.asarray(adapter.scale, h.dtype), b, precision=base.precision)


def _einsum_axes(einsum_str: str | None, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Kernel axes shared with the input (contracted or batched) and kernel axes only in the output,
    from an einsum string like "btd,dhk->bthk" (kernel "dhk": in (0,), out (1, 2))."""
    error = f"cannot infer the LoRA structure of nnx.Einsum with einsum_str {einsum_str!r}: "
    if not einsum_str or "->" not in einsum_str or einsum_str.count(",") != 1:
        raise ValueError(error + "need an explicit 'lhs,kernel->out' string set on the layer")
    operands, out = einsum_str.replace(" ", "").split("->")
    lhs, rhs = operands.split(",")
    if "." in rhs or len(rhs) != ndim or len(set(rhs)) != len(rhs):
        raise ValueError(error + f"the kernel subscripts {rhs!r} must name each of its {ndim} axes once")
    in_axes = tuple(i for i, c in enumerate(rhs) if c in lhs)
    out_axes = tuple(i for i, c in enumerate(rhs) if c not in lhs and c in out)
    if len(in_axes) + len(out_axes) != ndim:
        raise ValueError(error + "a kernel axis appears in neither the input nor the output")
    if not in_axes or not out_axes:
        raise ValueError(error + "the kernel needs at least one input axis and one output-only axis")
    return in_axes, out_axes


def _factored_einsums(einsum_str: str, in_axes, out_axes) -> tuple[str, str] | None:
    """The two einsums of B (A x) for an nnx.Einsum: "btd,dhk->bthk" gives ("btd,dZ->btZ",
    "btZ,Zhk->bthk") with A (d, r) and B (r, h, k). None when an input axis of the kernel is also
    an output axis (batched, not contracted): then the update needs the dense delta."""
    operands, out = einsum_str.replace(" ", "").split("->")
    lhs, rhs = operands.split(",")
    ins, outs = "".join(rhs[i] for i in in_axes), "".join(rhs[i] for i in out_axes)
    if any(c in out for c in ins):
        return None
    rank = next(c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in einsum_str)
    mid = "".join(c for c in lhs if c not in ins) + rank
    return f"{lhs},{ins}{rank}->{mid}", f"{mid},{rank}{outs}->{out}"


def _lax_padding(padding, n: int):
    """nnx.Conv's padding argument in lax form; the padding modes nnx.Conv emulates are refused."""
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID", "SAME_LOWER"):
            return padding.upper()
        raise ValueError(f"LoRA on conv with padding {padding!r} not supported")
    if isinstance(padding, int):
        return ((padding, padding),) * n
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pads) != n or any(len(p) != 2 for p in pads):
        raise ValueError(f"invalid conv padding {padding!r} for {n} spatial dims")
    return pads


def _conv_like(base: nnx.Conv, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``base``'s convolution (NHWC, strides, padding, dilations) with another HWIO ``kernel``."""
    n = len(base.kernel_size)
    batch_shape = x.shape[: x.ndim - n - 1]  # nnx.Conv flattens any number of batch dims
    x = x.reshape((-1,) + x.shape[x.ndim - n - 1:])

    def per_dim(v):
        return (1,) * n if v is None else (v,) * n if isinstance(v, int) else tuple(v)

    ndim = n + 2
    lhs = (0, ndim - 1) + tuple(range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
    y = base.conv_general_dilated(
        x, kernel, per_dim(base.strides), _lax_padding(base.padding, n),
        lhs_dilation=per_dim(base.input_dilation), rhs_dilation=per_dim(base.kernel_dilation),
        dimension_numbers=lax.ConvDimensionNumbers(lhs, rhs, lhs), feature_group_count=1,
        precision=base.precision)
    return y.reshape(batch_shape + y.shape[1:])


# ---------------------------------------------------------------------------------------------
# Finding and replacing layers by path.

def _child(node, key):
    # List indices and plain-dict keys are items; everything else (nnx.Dict included) an attribute.
    if isinstance(key, int) or (isinstance(node, Mapping) and not isinstance(node, nnx.Module)):
        return node[key]
    return getattr(node, key)


def _set_child(model: nnx.Module, path: tuple, new) -> None:
    if not path:
        raise ValueError("cannot replace the model's root in place; wrap it in a parent module")
    parent = model
    for key in path[:-1]:
        parent = _child(parent, key)
    if isinstance(parent, (MutableSequence, MutableMapping)):  # nnx.List, nnx.Dict
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def lora_layers(model: nnx.Module) -> list[tuple[tuple, LoraLayer]]:
    """(path, layer) of every LoraLayer in ``model``."""
    return [(tuple(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, LoraLayer)]


def _adaptable_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """(path, layer) of every adaptable layer: LoraLayers at their own path, bare layers otherwise."""
    wrapped = {p for p, _ in lora_layers(model)}
    return [(tuple(p), n) for p, n in nnx.iter_graph(model)
            if isinstance(n, LoraLayer) or (isinstance(n, ADAPTABLE) and tuple(p[:-1]) not in wrapped)]


def _with_adapter(model: nnx.Module, name: str) -> list[tuple[tuple, LoraLayer]]:
    layers = [(p, layer) for p, layer in lora_layers(model) if name in layer.lora]
    if not layers:
        raise ValueError(f"no LoRA adapter named {name!r} in the model; adapters: {adapter_names(model)}")
    return layers


def _check_name(name: str) -> None:
    # Names become nnx.Dict attributes: refuse ones that would shadow its methods (train, items...).
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or hasattr(nnx.Dict, name):
        raise ValueError(f"invalid LoRA adapter name {name!r}: use a Python identifier that is not "
                         "private and not an nnx.Dict method")


def adapter_names(model: nnx.Module) -> list[str]:
    """Names of the adapters present anywhere in ``model``, in order of first appearance."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora))
    return list(names)


# ---------------------------------------------------------------------------------------------
# Public API.

def add_lora(model: nnx.Module, specs: LoraSpec | Sequence[LoraSpec], *, name: str = "default",
             rngs: nnx.Rngs) -> list[str]:
    """Adds adapter ``name`` to every Linear / Conv / Einsum whose path matches a spec, in place.

    The first spec whose ``pattern`` is found (``re.search``) in the path "blocks/3/attn/q" wins.
    Bare layers are wrapped in a ``LoraLayer`` at the same attribute / list index; already wrapped
    layers get a further adapter. New adapters are active. ``A`` is drawn from ``rngs.params``,
    adapter dropout forks ``rngs.dropout`` (dropout follows ``model.train()`` / ``model.eval()``;
    a new adapter starts in train mode, like a freshly built layer). Returns the adapted paths.
    """
    _check_name(name)
    specs = (specs,) if isinstance(specs, LoraSpec) else tuple(specs)
    if not specs or not all(isinstance(s, LoraSpec) for s in specs):
        raise ValueError(f"add_lora needs one or more LoraSpec, got {specs!r}")
    candidates = _adaptable_layers(model)
    targets = []
    for path, layer in candidates:
        spec = next((s for s in specs if re.search(s.pattern, path_str(path))), None)
        if spec is not None:
            targets.append((path, layer, spec))
    if not targets:
        listing = ", ".join(f"{path_str(p)} ({type(n.base if isinstance(n, LoraLayer) else n).__name__})"
                            for p, n in candidates)
        raise ValueError(f"LoRA patterns {[s.pattern for s in specs]} match no layer; the model's "
                         f"adaptable layers are: {listing or '(none)'}")
    clashes = [path_str(p) for p, n, _ in targets if isinstance(n, LoraLayer) and name in n.lora]
    if clashes:
        raise ValueError(f"LoRA adapter {name!r} already exists on {clashes}; pick another name or delete it")
    # Build every wrapper before touching the model, so an unsupported layer leaves it unchanged.
    wrappers = []
    for path, layer, spec in targets:
        if not isinstance(layer, LoraLayer):
            if not path:
                raise ValueError("cannot wrap the model's root layer in place; wrap it in a parent module")
            try:
                layer = LoraLayer(layer)
            except ValueError as e:
                raise ValueError(f"layer {path_str(path)}: {e}") from None
        wrappers.append((path, layer, spec))
    for path, layer, spec in wrappers:
        layer.add(name, spec, rngs)
        _set_child(model, path, layer)
    return [path_str(p) for p, _, _ in wrappers]


def merge(model: nnx.Module, name: str = "default") -> None:
    """W += (alpha/r) B A on every layer with adapter ``name``; the forward then skips it."""
    layers = _with_adapter(model, name)
    merged = [path_str(p) for p, layer in layers if layer.lora[name].merged]
    if merged:
        raise ValueError(f"LoRA adapter {name!r} is already merged on {merged}")
    for _, layer in layers:
        layer.merge(name)


def unmerge(model: nnx.Module, name: str = "default") -> None:
    """W -= (alpha/r) B A, the exact delta ``merge`` added (same float32 computation)."""
    layers = _with_adapter(model, name)
    unmerged = [path_str(p) for p, layer in layers if not layer.lora[name].merged]
    if unmerged:
        raise ValueError(f"LoRA adapter {name!r} is not merged on {unmerged}")
    for _, layer in layers:
        layer.unmerge(name)


def set_active(model: nnx.Module, names: str | Sequence[str]) -> None:
    """Makes exactly ``names`` the active adapters (an empty list gives the base model).

    Merged adapters stay in the weights whatever their active flag; ``unmerge`` them to remove them.
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = sorted(set(names) - set(adapter_names(model)))
    if unknown:
        raise ValueError(f"unknown LoRA adapter(s) {unknown}; the model has {adapter_names(model)}")
    for _, layer in lora_layers(model):
        for key, adapter in layer.lora.items():
            adapter.active = key in names


def delete_adapter(model: nnx.Module, name: str) -> None:
    """Removes adapter ``name``; a layer left without adapters goes back to its bare base layer."""
    layers = _with_adapter(model, name)
    merged = [path_str(p) for p, layer in layers if layer.lora[name].merged]
    if merged:
        raise ValueError(f"LoRA adapter {name!r} is merged on {merged}; unmerge it before deleting")
    for path, layer in layers:
        del layer.lora[name]
        if not len(layer.lora):
            _set_child(model, path, layer.base)


def merge_and_unload(model: nnx.Module) -> nnx.Module:
    """Merges every active adapter and puts each base layer back in place of its LoraLayer.

    The model's parameter paths are the original ones again; inactive, unmerged adapters are dropped.
    """
    for path, layer in lora_layers(model):
        for key, adapter in layer.lora.items():
            if adapter.active and not adapter.merged:
                layer.merge(key)
        _set_child(model, path, layer.base)
    return model


def lora_filter(name: str | None = None):
    """NNX filter of the adapter params: all adapters, or the one called ``name``."""
    if name is None:
        return nnx.LoRAParam

    def named(path, value) -> bool:
        # Adapter params live at .../lora/NAME/{a,b}.
        return len(path) >= 3 and path[-3] == "lora" and path[-2] == name

    return nnx.All(nnx.LoRAParam, named)


def trainable_filter(model: nnx.Module, name: str | None = None, modules_to_save: Sequence[str] = ("head",)):
    """Adapter params (all, or adapter ``name``) plus every Param of the modules named in
    ``modules_to_save`` (a path segment like "head", or several like "blocks/1/mlp"), as PEFT's
    ``modules_to_save``. Pass it to ``create_train_state``."""
    if name is not None:
        _with_adapter(model, name)
    elif not adapter_names(model):
        raise ValueError("the model has no LoRA adapters; call add_lora first")
    modules_to_save = (modules_to_save,) if isinstance(modules_to_save, str) else tuple(modules_to_save)
    segments = [f"/{m.strip('/')}/" for m in modules_to_save]  # whole path segments: "head" is not "heads"

    def saved(path, value=None) -> bool:
        return any(s in f"/{path_str(path)}/" for s in segments)

    param_paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    missing = [m for m, s in zip(modules_to_save, segments, strict=True)
               if not any(s in f"/{path_str(p)}/" for p in param_paths)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no parameter path of the model")
    # Other adapters under a saved module (e.g. a second adapter on the head) stay frozen.
    return nnx.Any(lora_filter(name), nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam), saved))


# ---------------------------------------------------------------------------------------------
# Adapters-only checkpoints: one orbax directory with "arrays" (a list of {"a", "b"}) and
# "config" (JSON: format and, per entry, path, name, rank, alpha, dropout, kind and shapes).

def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        arrays=ocp.StandardCheckpointHandler(), config=ocp.JsonCheckpointHandler()))


def save_adapters(model: nnx.Module, directory: str, name: str | None = None, *,
                  overwrite: bool = False) -> list[str]:
    """Writes the adapter params (all adapters, or ``name``) and their configuration to ``directory``.

    Orbax writes into a temporary directory and renames it when complete, so an interrupted save
    never leaves a half-written checkpoint under ``directory``. Returns the saved param paths.
    """
    entries, arrays = [], []
    for path, layer in lora_layers(model):
        for key, adapter in layer.lora.items():
            if name is None or key == name:
                entries.append({"path": path_str(path), "name": key, "kind": type(layer.base).__name__,
                                "rank": adapter.rank, "alpha": adapter.alpha, "dropout": float(adapter.dropout.rate),
                                "a_shape": list(adapter.a[...].shape), "b_shape": list(adapter.b[...].shape)})
                arrays.append({"a": adapter.a.get_value(), "b": adapter.b.get_value()})
    if not entries:
        raise ValueError(f"no LoRA adapter{'' if name is None else f' named {name!r}'} to save")
    with _checkpointer() as ckpt:
        ckpt.save(os.path.abspath(directory),
                  ocp.args.Composite(arrays=ocp.args.StandardSave({"adapters": arrays}),
                                     config=ocp.args.JsonSave({"format": CHECKPOINT_FORMAT, "adapters": entries})),
                  force=overwrite)
    return [f"{e['path']}/lora/{e['name']}/{ab}" for e in entries for ab in ("a", "b")]


def read_adapter_config(directory: str) -> dict:
    """The JSON part of an adapters checkpoint: {"format", "adapters": [{"path", "name", "rank", ...}]}."""
    with _checkpointer() as ckpt:
        config = ckpt.restore(os.path.abspath(directory), ocp.args.Composite(config=ocp.args.JsonRestore())).config
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{directory} is not a LoRA adapters checkpoint ({CHECKPOINT_FORMAT})")
    return config


def load_adapters(model: nnx.Module, directory: str, name: str | None = None) -> list[str]:
    """Loads adapter params saved by ``save_adapters`` into the model's existing adapters.

    Every adapter of the checkpoint (or those called ``name``) must exist at the same layer path with
    the same rank, alpha and shapes, unmerged, and every model adapter of those names must be in the
    checkpoint; otherwise ``CheckpointMismatchError`` names the path (and both shapes) and nothing
    changes. Arrays take the dtype and sharding of the model's params. Returns the loaded param paths.
    """
    stored = read_adapter_config(directory)["adapters"]
    selected = [i for i, e in enumerate(stored) if name is None or e["name"] == name]
    entries = [stored[i] for i in selected]
    if not entries:
        raise CheckpointMismatchError(f"checkpoint {directory} has no LoRA adapter named {name!r}")
    layers = {path_str(p): layer for p, layer in lora_layers(model)}
    targets = []
    for e in entries:
        where = f"LoRA adapter {e['name']!r} of layer '{e['path']}' (rank {e['rank']})"
        layer = layers.get(e["path"])
        if layer is None or e["name"] not in layer.lora:
            raise CheckpointMismatchError(f"checkpoint {directory}: {where} is missing in this model; "
                                          f"call add_lora with the same specs and name first")
        adapter = layer.lora[e["name"]]
        if adapter.merged:
            raise CheckpointMismatchError(f"{where} is merged in this model; unmerge it before loading")
        for ab in ("a", "b"):
            got, wanted = tuple(e[f"{ab}_shape"]), tuple(getattr(adapter, ab)[...].shape)
            if got != wanted:
                raise CheckpointMismatchError(
                    f"checkpoint {directory}: array '{e['path']}/lora/{e['name']}/{ab}' has shape {got}, "
                    f"this model expects {wanted}")
        if not math.isclose(e["alpha"], adapter.alpha):
            raise CheckpointMismatchError(f"{where} has alpha {e['alpha']} in the checkpoint, "
                                          f"{adapter.alpha} in this model")
        targets.append(adapter)
    saved = {(e["path"], e["name"]) for e in entries}
    names = {e["name"] for e in entries}
    absent = [f"{p}/lora/{k}" for p, layer in layers.items() for k in layer.lora
              if k in names and (p, k) not in saved]
    if absent:
        raise CheckpointMismatchError(f"checkpoint {directory} lacks the model's LoRA adapters {absent}")

    def like(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    # Orbax restores whole trees: entries not loaded here come back as small host arrays, unused.
    target_at = dict(zip(selected, targets, strict=True))
    abstract = {"adapters": [
        {ab: like(getattr(target_at[i], ab).get_value()) for ab in ("a", "b")} if i in target_at
        else {ab: jax.ShapeDtypeStruct(tuple(e[f"{ab}_shape"]), jnp.float32) for ab in ("a", "b")}
        for i, e in enumerate(stored)]}
    with _checkpointer() as ckpt:
        arrays = ckpt.restore(os.path.abspath(directory),
                              ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract))).arrays["adapters"]
    for i, adapter in target_at.items():
        adapter.a.set_value(arrays[i]["a"])
        adapter.b.set_value(arrays[i]["b"])
    return [f"{e['path']}/lora/{e['name']}/{ab}" for e in entries for ab in ("a", "b")]
