"""Typed-dataclass configs from plain data: coercion, ``key.sub=value`` overrides, YAML in and out.

Generic machinery behind :mod:`preftune.config`, which holds the schema and is where to import from.
Each function here takes the dataclass (or instance) it works on; errors are :class:`ConfigError` naming
the key and suggesting the closest valid one (or, from ``hints``, the key a name from other tools means).
The coercion of values, :func:`build` and those messages live in :mod:`preftune._coercion` (importable
from here).

Field types: bool, int, float, str, ``X | None``, ``list[X]``, ``dict[str, X]``, nested sections (a
dataclass-typed field) and lists of sections (``list[SomeDataclass]``, each entry a mapping; errors name
the entry, ``data.sources[1].fraction``). A null for a field that cannot be null resets it to its default.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from preftune._coercion import (
    ConfigError,
    _coerce,
    _default,
    _is_null_text,
    _nullable,
    _split_part,
    _types,
    _unknown_key,
    _yaml,
    build,
    suggest,
)

log = logging.getLogger("preftune.config")

__all__ = [
    "ConfigError",
    "apply_overrides",
    "build",
    "config_to_dict",
    "format_config",
    "read_yaml_mapping",
    "setting",
    "suggest",
]


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a one-line ``help`` (a list, dict or section default is copied per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw
        )
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = _types(cls)
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
    for raw in key.split("."):
        part, index = _split_part(raw)
        if cls is None or not dataclasses.is_dataclass(cls):
            break
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            match = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            if not match:
                break
            part = match[0]
        tp = _types(cls)[part]
        if index is not None and typing.get_origin(tp) is list:  # an entry of a list of sections
            fixed.append(f"{part}[{index}]")
            cls = typing.get_args(tp)[0]
            continue
        fixed.append(part)
        cls = tp if dataclasses.is_dataclass(tp) else None
    else:
        return f" (did you mean '{'.'.join(fixed)}'?)"
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in _all_keys(root) if k.rsplit(".", 1)[-1] == leaf]
    return f" (did you mean {' or '.join(repr(k) for k in same_leaf)}?)" if same_leaf else ""


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(
    cfg: Any,
    overrides: Sequence[str],
    *,
    hints: Mapping[str, str] | None = None,
    exclusive: Sequence[tuple[str, str]] = (),
) -> Any:
    """Apply ``key.sub=value`` strings; values are parsed to the field's type (YAML syntax for lists).

    ``key`` may name an entry of a list of sections, ``data.sources[1].fraction=0.5`` (or the whole entry,
    ``data.sources[1]={path: b.jsonl}``). ``null`` for a field that cannot be null resets it to its default.
    ``exclusive``: pairs of keys that cannot both be set; setting one clears the other, with a log line
    (the later setting wins). ``hints``: see `build`.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        _apply_one(cfg, key, raw, hints)
        _settle_exclusive(cfg, key, exclusive)
    return cfg


def _apply_one(cfg: Any, key: str, raw: str, hints: Mapping[str, str] | None) -> None:
    parts = key.split(".")
    obj: Any = cfg
    value_tp: Any = Any
    for i, raw_part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(obj, dict):
            # A key under a dict-valued field, e.g. loss.params.label_smoothing=0.1.
            if not last:
                section = ".".join(parts[:i])
                raise ConfigError(
                    f"unknown key '{key}': set entries of '{section}' as {section}.NAME=VALUE"
                )
            obj[raw_part] = _coerce(_yaml(raw, key), value_tp, key, hints)
            return
        if not dataclasses.is_dataclass(obj):  # e.g. loss.beta.x=1: beta is a plain value
            raise ConfigError(_unknown_key(key, hints, _suggest_key(type(cfg), key)))
        part, index = _split_part(raw_part)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            raise ConfigError(_unknown_key(key, hints, _suggest_key(type(cfg), key)))
        tp = _types(type(obj))[part]
        where = ".".join([*parts[:i], raw_part])
        if index is not None:
            if typing.get_origin(tp) is not list:
                raise ConfigError(f"{where}: '{part}' is not a list")
            items = getattr(obj, part)
            if index >= len(items):
                have = f"entries 0 to {len(items) - 1}" if items else "no entries"
                raise ConfigError(f"{where}: no such entry; '{part}' has {have}")
            (item_tp,) = typing.get_args(tp)
            if last:
                items[index] = _coerce(raw, item_tp, where, hints)
                return
            obj = items[index]
            continue
        if last:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(
                    f"'{key}' is a section; set one of its keys, e.g. {key}.<name>=..."
                )
            if _is_null_text(raw) and not _nullable(tp):
                setattr(obj, part, _default(fields[part]))
                log.info("%s=null: its default %r", key, getattr(obj, part))
            else:
                setattr(obj, part, _coerce(raw, tp, key, hints))
            return
        if typing.get_origin(tp) is dict:
            value_tp = typing.get_args(tp)[1]
        obj = getattr(obj, part)


def _settle_exclusive(cfg: Any, key: str, pairs: Sequence[tuple[str, str]]) -> None:
    """After ``key`` was set: of each pair holding it, clear the other key when both are on."""
    for pair in (p for p in pairs if key in p):
        (other,) = [k for k in pair if k != key]
        if _is_on(cfg, key) and _is_on(cfg, other):
            section, f = _field_at(cfg, other)
            old = getattr(section, f.name)
            setattr(section, f.name, _default(f))
            log.info(
                "%s set after %s=%s: the later setting wins (%s cleared)", key, other, old, other
            )


def _field_at(cfg: Any, key: str) -> tuple[Any, dataclasses.Field]:
    section = cfg
    for part in key.split(".")[:-1]:
        section = getattr(section, part)
    return section, next(f for f in dataclasses.fields(section) if f.name == key.split(".")[-1])


def _is_on(cfg: Any, key: str) -> bool:
    section, f = _field_at(cfg, key)
    return getattr(section, f.name) not in (None, 0, "", [], {})  # 0 covers False


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
    hints = _types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{pad}{f.name}:  # {help_text}")
            lines.append(format_config(value, indent + 1))
        else:
            dumped = yaml.safe_dump(_shown(value), default_flow_style=True, sort_keys=False).strip()
            if dumped.endswith("\n..."):
                dumped = dumped[: -len("\n...")]
            dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{f.name}: {dumped}  # {help_text}")
    return "\n".join(lines)


def _shown(value: Any) -> Any:
    """Plain data for display: a section inside a list shows the fields that differ from their default."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _shown(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) != _default(f)
        }
    if isinstance(value, list):
        return [_shown(v) for v in value]
    return value
