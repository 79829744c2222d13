"""Parameter subsets as NNX filters ("parameter subsets are filters").

Each function takes a model and returns a filter for ``nnx.state`` / ``nnx.split``, e.g.
``nnx.split(model, param_filter(model, "bn"), ...)``. The subsets ``bn``, ``head`` and
``backbone`` partition the model's Params: every Param is in exactly one of them.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

Path = tuple  # a tuple of attribute names / list indices from the model root


def _under(prefixes: list[Path]) -> Callable[[Path, object], bool]:
    """Predicate ``(path, value) -> bool``: True when ``path`` lies under one of ``prefixes``."""
    prefixes = [tuple(p) for p in prefixes]

    def predicate(path, value) -> bool:
        return any(tuple(path[: len(p)]) == p for p in prefixes)

    return predicate


def _bn_predicate(model: nnx.Module) -> Callable[[Path, object], bool]:
    # Walk the graph once now; the filter then only compares paths, so it is cheap to apply.
    paths = [path for path, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)]
    return _under(paths)


def _head_predicate(path, value) -> bool:
    # Any attribute named "head" on the path, so the filter still works on a wrapped model.
    return "head" in path


def all_params(model: nnx.Module):
    """Every Param."""
    return nnx.Param


def bn_affine(model: nnx.Module):
    """The scale and bias Params of every nnx.BatchNorm (not the running statistics)."""
    return nnx.All(nnx.Param, _bn_predicate(model))


def head(model: nnx.Module):
    """The Params of the classifier (the attribute named ``head``)."""
    return nnx.All(nnx.Param, _head_predicate)


def backbone(model: nnx.Module):
    """Every Param that is neither a BatchNorm affine parameter nor in the head."""
    return nnx.All(nnx.Param, nnx.Not(nnx.Any(_bn_predicate(model), _head_predicate)))


def bn_and_head(model: nnx.Module):
    """BatchNorm affine Params plus the head (the usual cheap fine-tuning subset)."""
    return nnx.All(nnx.Param, nnx.Any(_bn_predicate(model), _head_predicate))


PARAM_SUBSETS: dict[str, Callable[[nnx.Module], object]] = {
    "all": all_params,
    "bn": bn_affine,
    "head": head,
    "backbone": backbone,
    "bn_and_head": bn_and_head,
}


def param_filter(model: nnx.Module, name: str):
    """The filter of subset ``name`` (a key of ``PARAM_SUBSETS``) for ``model``."""
    if name not in PARAM_SUBSETS:
        choices = ", ".join(PARAM_SUBSETS)
        raise ValueError(f"unknown parameter subset {name!r}; choose one of: {choices}")
    return PARAM_SUBSETS[name](model)


def conv_and_linear_layers(model: nnx.Module):
    """Yields (path, kind, layer) for every ``nnx.Conv`` ("conv") and ``nnx.Linear`` ("linear")
    of ``model``, in graph order; ``path`` is a tuple of attribute names / list indices."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Conv):
            yield tuple(path), "conv", node
        elif isinstance(node, nnx.Linear):
            yield tuple(path), "linear", node
