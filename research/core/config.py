"""Experiment configs: loading `configs/NAME.py[:ARG]`, validated overrides, choices, sweeps.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict` and, where it sweeps,
`get_sweep(arg=None) -> list[dict]` of overrides keyed by dotted paths ("optim.lr": 0.1).
Overrides from the command line (`--config.optim.lr=0.1`) and from sweeps go through one
function, `apply_overrides`, so a bad key or value fails the same way everywhere: a
`ConfigError` whose message is one line naming the key and what is allowed.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message is one line."""


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
    take the text as it is ("0,1,2" -> "0,1,2").
    """
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=True)
    known = set(_keys(config))
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(_unknown_key_message(config, key))
        # A string field takes the text as written ("0,1,2" stays a string, not a tuple).
        if from_strings and isinstance(value, str) and not isinstance(get(config, key), str):
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


def check_choice(config: ml_collections.ConfigDict, key: str, allowed: Iterable[str]) -> None:
    """Raises a one-line ConfigError when `config[key]` is not one of `allowed`."""
    allowed = list(allowed)
    value = get(config, key)
    if value not in allowed:
        raise ConfigError(f"config key '{key}' = {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check(config: ml_collections.ConfigDict, key: str, predicate: Callable[[Any], bool], allowed: str) -> None:
    """Raises a one-line ConfigError when `predicate(config[key])` fails; `allowed` says what is."""
    value = get(config, key)
    if not predicate(value):
        raise ConfigError(f"config key '{key}' = {value!r} is not allowed; expected {allowed}")


def check_names(config: ml_collections.ConfigDict, key: str, allowed: Iterable[str]) -> list[str]:
    """The names of a comma-separated `config[key]`; a one-line ConfigError when it is empty or
    names something not in `allowed`."""
    allowed = list(allowed)
    text = get(config, key)
    names = [m.strip() for m in str(text).split(",") if m.strip()]
    unknown = [m for m in names if m not in allowed]
    if unknown or not names:
        raise ConfigError(f"config key '{key}': unknown or empty {unknown or text!r}; "
                          f"choose from (comma-separated): {', '.join(allowed)}")
    return names


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
