"""Typed-dataclass configs from plain data: coercion, ``key.sub=value`` overrides, YAML in and out.

Generic machinery behind :mod:`preftune.config`, which holds the schema and is where to import from. Each
function here takes the dataclass (or instance) it works on; errors are :class:`ConfigError` naming the key
and suggesting the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "build",
    "config_to_dict",
    "format_config",
    "read_yaml_mapping",
    "suggest",
]


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what was expected."""


def suggest(key: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'PREFIX<closest>'?)`` or an empty string."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _suggest_key(root: type, key: str) -> str:
    """Suggestion for an unknown dotted key: fix each part within its own section (so that a shared
    section prefix cannot make unrelated keys look alike), else a field of the same name elsewhere
    (``lr`` -> ``optim.lr``)."""
    cls: Any = root
    fixed: list[str] = []
    for part in key.split("."):
        if cls is None or not dataclasses.is_dataclass(cls):
            break
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            match = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            if not match:
                break
            part = match[0]
        fixed.append(part)
        tp = _hints(cls)[part]
        cls = tp if dataclasses.is_dataclass(tp) else None
    else:
        return f" (did you mean '{'.'.join(fixed)}'?)"
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in _all_keys(root) if k.rsplit(".", 1)[-1] == leaf]
    return f" (did you mean {' or '.join(repr(k) for k in same_leaf)}?)" if same_leaf else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the annotated type ``tp``, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_null = value is None or (
            isinstance(value, str) and value.lower() in ("null", "none", "~")
        )
        if is_null and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:  # Optional[X]: X's own message, plus "or null"
            try:
                return _coerce(value, non_null[0], key)
            except ConfigError as e:
                if not str(e).startswith(f"{key}: "):
                    raise  # an element's error, e.g. loss.weights[1]
                raise ConfigError(f"{e} (or null)") from None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if value is None and origin in (list, dict):
        raise ConfigError(f"{key}: expected a {'list' if origin is list else 'mapping'}, got null")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [text]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "yes",
            "on",
            "1",
            "false",
            "no",
            "off",
            "0",
        ):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from nested plain data; unknown keys and bad types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}'{suggest(str(key), names, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: Any, overrides: typing.Sequence[str]) -> Any:
    """Apply ``key.sub=value`` strings; values are parsed to the field's type (YAML syntax for lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        parts = key.split(".")
        obj: Any = cfg
        value_tp: Any = Any
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(obj, dict):
                # A key under a dict-valued field, e.g. loss.params.label_smoothing=0.1.
                if not last:
                    section = ".".join(parts[:i])
                    raise ConfigError(
                        f"unknown key '{key}': set entries of '{section}' as {section}.NAME=VALUE"
                    )
                obj[part] = _coerce(yaml.safe_load(raw), value_tp, key)
                break
            if not dataclasses.is_dataclass(obj):  # e.g. loss.beta.x=1: beta is a plain value
                raise ConfigError(f"unknown key '{key}'{_suggest_key(type(cfg), key)}")
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                raise ConfigError(f"unknown key '{key}'{_suggest_key(type(cfg), key)}")
            tp = _hints(type(obj))[part]
            if last:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(
                        f"'{key}' is a section; set one of its keys, e.g. {key}.<name>=..."
                    )
                setattr(obj, part, _coerce(raw, tp, key))
            else:
                if typing.get_origin(tp) is dict:
                    value_tp = typing.get_args(tp)[1]
                obj = getattr(obj, part)
    return cfg


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty file: ``{}``); a missing file or bad YAML raises ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def format_config(cfg: Any, indent: int = 0) -> str:
    """YAML-like text of the resolved config with each field's help as a comment."""
    lines = []
    pad = "  " * indent
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{pad}{f.name}:  # {help_text}")
            lines.append(format_config(value, indent + 1))
        else:
            dumped = yaml.safe_dump(value, default_flow_style=True).strip()
            if dumped.endswith("\n..."):
                dumped = dumped[: -len("\n...")]
            dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{f.name}: {dumped}  # {help_text}")
    return "\n".join(lines)
