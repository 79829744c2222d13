"""Experiment configs: loading `configs/NAME.py[:ARG]`, validated overrides, choices, sweeps.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict` and, where it sweeps,
`get_sweep(arg=None) -> list[dict]` of overrides keyed by dotted paths ("optim.lr": 0.1).
Overrides from the command line (`--config.optim.lr=0.1`) and from sweeps go through one
function, `apply_overrides`, so a bad key or value fails the same way everywhere: a
`ConfigError` whose message is one line naming the key and what is allowed.

A component's settings have one schema: a frozen dataclass of the library owns the fields, their
defaults, their allowed values (``Literal[...]`` annotations) and their checks (``__post_init__``
calling `check_fields`). An experiment's whole config is one such dataclass composed of its
sections (``Unlearning(data=..., model=..., ntk=...)``), with the checks across sections in its own
``__post_init__``: the config file makes it, ``c = section(Unlearning)``, sets its presets, and the
experiment builds it once, ``exp = build(Unlearning, config)``, and passes typed pieces down
(``exp.ntk``). ``override(exp, {"ntk.chunk_size": 8})`` is a changed, re-checked copy. Adding an
option is then one edit, in the dataclass.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import ml_collections


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message is one line."""


class PathNotFoundError(FileNotFoundError):
    """A path the user gave (a data folder, a model or weights file, a checkpoint) that does not
    exist; the message is one line naming it. A given path never falls back to a default."""


class DataSourceError(FileNotFoundError):
    """A data source that is not available here; the message says what provides it."""


class DamagedFileError(ValueError):
    """A data or weights file that is there but cannot be used as it is (truncated, a missing array,
    a wrong shape, non-finite weights); the message is one line naming the file and what is wrong."""


def require_path(path: str, what: str) -> str:
    """``path`` when it exists; else a `PathNotFoundError` naming ``what`` (e.g. "data.data_dir")."""
    if not os.path.exists(path):
        raise PathNotFoundError(f"{what} {path!r} does not exist")
    return path


# ------------------------------------------------------------------ schemas: library dataclasses

class FieldError(ValueError):
    """A dataclass field whose value is not allowed: ``field`` names it, ``detail`` says why
    (``"= 'x' is not allowed; choose one of: a, b"``)."""

    def __init__(self, owner: str, field: str, detail: str):
        super().__init__(f"{owner}.{field}{self._gap(detail)}{detail}")
        self.field, self.detail = field, detail

    @staticmethod
    def _gap(detail: str) -> str:
        return "" if detail.startswith(":") else " "

    def on_key(self, key: str) -> ConfigError:
        """This error as the one-line `ConfigError` on config key ``key`` (the field's full path)."""
        return ConfigError(f"config key '{key}'{self._gap(self.detail)}{self.detail}")


@contextlib.contextmanager
def under_key(key: str):
    """Reports a `FieldError` raised inside as the one-line `ConfigError` on ``key``.FIELD: for a
    section's check made after it is built (against the data, or a dataclass made from its values)."""
    try:
        yield
    except FieldError as e:
        raise e.on_key(f"{key}.{e.field}") from None


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of: " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a tuple of ({_describe(args[0])})" if len(args) == 2 and args[1] is Ellipsis else f"a tuple {hint}"
    return {int: "an int", float: "a float", bool: "a bool", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_matches, value, args))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def check_fields(obj) -> None:
    """Checks every field of the dataclass instance ``obj`` against its annotation (``Literal``
    choices, int / float / bool / str, ``tuple[X, ...]``, ``X | None``); a `FieldError` names the
    first that does not match. Call it first in ``__post_init__``."""
    owner = type(obj).__name__
    for field in dataclasses.fields(obj):
        hint, value = _hints(type(obj))[field.name], getattr(obj, field.name)
        if not _matches(value, hint):
            detail = f"= {value!r} is not allowed; " + (
                f"choose {_describe(hint)}" if typing.get_origin(hint) is Literal else f"expected {_describe(hint)}")
            raise FieldError(owner, field.name, detail)


def require(obj, field: str, ok: bool, allowed: str) -> None:
    """A `FieldError` naming ``field`` of ``obj`` unless ``ok``; ``allowed`` says what is."""
    if not ok:
        raise FieldError(type(obj).__name__, field, f"= {getattr(obj, field)!r} is not allowed; expected {allowed}")


def require_names(obj, field: str, allowed: Iterable[str]) -> None:
    """A `FieldError` unless the tuple ``field`` of ``obj`` is non-empty and names only ``allowed``."""
    allowed, names = list(allowed), getattr(obj, field)
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise FieldError(type(obj).__name__, field, f": unknown or empty {unknown or list(names)!r}; choose a tuple "
                         f"of: {', '.join(allowed)} (on the command line: a,b)")


def choices(cls, field: str) -> tuple:
    """The values a ``Literal[...]`` field (or ``tuple[Literal[...], ...]``) of ``cls`` allows."""
    hint = _hints(cls)[field]
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    return typing.get_args(hint)


def _convert(value, hint):
    """Config values to the field's type: lists to tuples, ints to floats, dicts to dataclasses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return hint(**{k: _convert(v, _hints(hint).get(k, Any)) for k, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        for a in args:
            converted = _convert(value, a)
            if _matches(converted, a):
                return converted
        return value
    if origin is tuple and isinstance(value, (tuple, list)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in value)
        return tuple(_convert(v, a) for v, a in zip(value, args)) if len(value) == len(args) else tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def section(cls, **values) -> ml_collections.ConfigDict:
    """A config section made from the dataclass ``cls``: every field with its default (a nested
    dataclass field becomes a nested section), ``values`` in place of some defaults. The values are
    checked by building ``cls`` once, so a config file with a bad default fails when it loads."""
    instance = _convert(values, cls) if values else cls()

    def to_config(obj) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {f.name: to_config(getattr(obj, f.name)) if dataclasses.is_dataclass(getattr(obj, f.name))
             else getattr(obj, f.name) for f in dataclasses.fields(obj)}, type_safe=True)
    return to_config(instance)


def build(cls, config: ml_collections.ConfigDict | Mapping, key: str = ""):
    """``cls(**config[key])`` (``key=""``: ``config`` is the section), with the values converted to
    the fields' types. An unknown key, a wrong type, a value outside a field's choices or a failed
    check is one `ConfigError` line naming ``key`` and what is allowed."""
    node = get(config, key) if key else config
    return _build(cls, node.to_dict() if isinstance(node, ml_collections.ConfigDict) else dict(node), key)


def section_of(config, key: str, cls):
    """``config``'s section ``key`` as a ``cls``: taken as it is from a built schema (a dataclass),
    else built from the config section (`build`). Lets a trainer take either."""
    return getattr(config, key) if dataclasses.is_dataclass(config) else build(cls, config, key)


def _build(cls, values: dict, key: str):
    prefix = f"{key}." if key else ""
    hints = _hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for name, value in values.items():
        if name not in fields:
            guess = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean '{prefix}{guess[0]}'?)" if guess else ""
            raise ConfigError(f"unknown config key '{prefix}{name}'{hint}; {cls.__name__} has: {', '.join(fields)}")
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, Mapping):
            values[name] = _build(hints[name], dict(value), prefix + name)
    try:
        return cls(**{k: _convert(v, hints[k]) for k, v in values.items()})
    except FieldError as e:
        raise e.on_key(prefix + e.field) from None
    except ConfigError:
        raise  # a check across sections, already one line naming its key
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key '{key or cls.__name__}': {str(e).splitlines()[0]}") from None


def override(obj, updates: Mapping[str, Any]):
    """A copy of the dataclass ``obj`` with the dotted fields of ``updates`` replaced
    (``{"online_lora.lr": 1e-4}``), converted and checked as `build` does: an unknown key or a value
    that is not allowed is one `ConfigError` line naming the key."""
    values = dataclasses.asdict(obj)
    for key, value in updates.items():
        *path, leaf = key.split(".")
        parent = values
        for part in path:
            if not isinstance(parent.get(part), dict):
                raise ConfigError(f"unknown config key '{key}' in {type(obj).__name__}")
            parent = parent[part]
        if leaf not in parent:
            raise ConfigError(f"unknown config key '{key}' in {type(obj).__name__}")
        parent[leaf] = value
    return _build(type(obj), values, "")


def load_module(path: str):
    """Imports a config file by path (`configs/NAME.py`) as a module."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_arg(spec: str) -> tuple[str, str | None]:
    path, _, arg = spec.partition(":")
    return path, (arg or None)


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` through its `get_config(arg)` and applies `overrides`.

    The returned config is locked: assigning a key that does not exist raises.
    """
    path, arg = _split_arg(spec)
    module = load_module(path)
    config = module.get_config(arg) if arg is not None else module.get_config()
    config.lock()
    return apply_overrides(config, overrides or {})


def load_sweep(spec: str) -> list[dict[str, Any]]:
    """The list of override dicts declared by the config file's `get_sweep(arg)`."""
    path, arg = _split_arg(spec)
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"config file '{path}' defines no get_sweep(arg)")
    sweep = module.get_sweep(arg) if arg is not None else module.get_sweep()
    return [dict(point) for point in sweep]


def _keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        out.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            out.extend(_keys(value, prefix + key + "."))
    return out


def _unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
    parent_path, _, leaf = key.rpartition(".")
    parent = config
    for part in parent_path.split(".") if parent_path else []:
        parent = parent[part]
    siblings = sorted(parent.keys())
    guess = difflib.get_close_matches(leaf, siblings, n=1)
    hint = f" (did you mean '{(parent_path + '.' if parent_path else '') + guess[0]}'?)" if guess else ""
    where = f"'{parent_path}'" if parent_path else "the top level"
    return f"unknown config key '{key}'{hint}; keys at {where}: {', '.join(siblings)}"


def _parse_string(text: str) -> Any:
    """Command-line text to a Python value: literals as literals, anything else as a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_sequence(text: str) -> tuple:
    """Command-line text for a tuple field: "(1, 2)", "1,2", "a,b" or "" (empty)."""
    if not text.strip():
        return ()
    value = _parse_string(text)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return tuple(_parse_string(part.strip()) for part in text.split(",") if part.strip())


def _coerce(key: str, current: Any, value: Any) -> Any:
    """Checks `value` against the type of the current value; ints widen to floats."""
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, str):
        if isinstance(value, str):
            return value
    elif isinstance(current, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(current)(value)
        # Text for a tuple of numbers is an error here: the command line parses "0,1" before this,
        # so only a Python caller passes it, and ("0,1",) would reach the code as a string.
        of_numbers = bool(current) and not any(isinstance(v, str) for v in current)
        if not (of_numbers and isinstance(value, str)):
            return type(current)((value,))  # "--config.x=3" for a one-element tuple
    elif isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"config key '{key}' is a group; set its fields ({', '.join(sorted(current.keys()))})")
    else:
        return value
    raise ConfigError(
        f"config key '{key}' expects {type(current).__name__}, got {value!r} ({type(value).__name__})"
    )


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any], *, from_strings: bool = False
) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with dotted-key `overrides` applied and type-checked.

    With `from_strings`, values are command-line text and are parsed as Python literals first
    ("0.1" -> 0.1, "(2, 4)" -> (2, 4), "resnet20" -> "resnet20"), except for string fields, which
    take the text as it is ("0,1,2" -> "0,1,2"), and tuple fields, which take a comma list
    ("0,1,2" -> (0, 1, 2), "ce,mse" -> ("ce", "mse"), "" -> ()).
    """
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=True)
    known = set(_keys(config))
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(_unknown_key_message(config, key))
        # A string field takes the text as written ("0,1,2" stays a string, not a tuple).
        current = get(config, key)
        if from_strings and isinstance(value, str) and isinstance(current, (tuple, list)):
            value = _parse_sequence(value)  # "0,1,2", "a,b", "(1, 2)" and "" all name a tuple
        elif from_strings and isinstance(value, str) and not isinstance(current, str):
            value = _parse_string(value)
        parent_path, _, leaf = key.rpartition(".")
        parent = config
        for part in parent_path.split(".") if parent_path else []:
            parent = parent[part]
        parent[leaf] = _coerce(key, parent[leaf], value)
    config.lock()
    return config


def get(config: ml_collections.ConfigDict, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def parse_presets(arg: str | None, allowed: Iterable[str], config_file: str) -> list[str]:
    """The presets of a config's ARG (``configs/NAME.py:a,b``); a one-line ConfigError naming
    `config_file` and the allowed presets when one is unknown."""
    allowed = list(allowed)
    presets = [p.strip() for p in (arg or "").split(",") if p.strip()]
    unknown = [p for p in presets if p not in allowed]
    if unknown:
        raise ConfigError(f"unknown preset(s) {unknown} for {config_file}; choose from: {', '.join(allowed)}")
    return presets


def split_override_args(argv: list[str], flag: str = "config") -> tuple[list[str], dict[str, str]]:
    """Separates `--config.a.b=value` arguments from the rest of argv."""
    rest, overrides = [], {}
    prefix = f"--{flag}."
    args = iter(argv)
    for arg in args:
        if arg.startswith(prefix):
            key, eq, value = arg[len(prefix):].partition("=")
            if not eq:  # "--config.a.b value"
                value = next(args, None)
                if value is None:
                    raise ConfigError(f"config key '{key}' has no value; write --{flag}.{key}=VALUE")
            overrides[key] = value
        else:
            rest.append(arg)
    return rest, overrides
