"""Typed-dataclass configs from plain data: coercion, ``key.sub=value`` overrides, YAML in and out.

Generic machinery behind :mod:`preftune.config`, which holds the schema and is where to import from.
Each function here takes the dataclass (or instance) it works on; errors are :class:`ConfigError` naming
the key and suggesting the closest valid one (or, from ``hints``, the key a name from other tools means).

Field types: bool, int, float, str, ``X | None``, ``list[X]``, ``dict[str, X]``, nested sections (a
dataclass-typed field) and lists of sections (``list[SomeDataclass]``, each entry a mapping; errors name
the entry, ``data.sources[1].fraction``). A null for a field that cannot be null resets it to its default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

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


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what was expected."""


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a one-line ``help`` (a list, dict or section default is copied per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw
        )
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def suggest(key: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'PREFIX<closest>'?)`` or an empty string."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


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


_INDEXED = re.compile(r"^(\w+)\[(\d+)\]$")  # an entry of a list-valued field: sources[1]


def _split_part(part: str) -> tuple[str, int | None]:
    m = _INDEXED.match(part)
    return (m.group(1), int(m.group(2))) if m else (part, None)


def _hint(key: str, hints: Mapping[str, str] | None) -> str | None:
    """The key that a name known from other tools stands for, from ``hints``: a full key (list indices
    written ``[]``, ``data.sources[].name``) or a bare name matched anywhere (``learning_rate``)."""
    if not hints:
        return None
    indices = re.findall(r"\[\d+\]", key)
    pattern = re.sub(r"\[\d+\]", "[]", key)
    target = hints.get(pattern)
    if target is None:
        leaf = pattern.rsplit(".", 1)[-1]
        target = hints.get(leaf) if "." not in leaf else None
    if target is None:
        return None
    for index in indices:  # the entry named: data.sources[2].name -> data.sources[2].config
        target = target.replace("[]", index, 1)
    return target


def _unknown_key(key: str, hints: Mapping[str, str] | None, fallback: str) -> str:
    target = _hint(key, hints)
    return f"unknown key '{key}'" + (f" (did you mean '{target}'?)" if target else fallback)


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


def _nullable(tp: Any) -> bool:
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(tp)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _is_null_text(raw: str) -> bool:
    """YAML's spellings of null (``none`` is a string in YAML, and a choice of some settings)."""
    return raw.strip() in ("null", "Null", "NULL", "~")


def _yaml(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{key}: not valid YAML ({getattr(e, 'problem', None) or e}): {text!r}"
        ) from None


def _number(value: Any, tp: type, key: str) -> Any:
    """An int (whole floats and numeric strings too) or a float (ints and numeric strings too)."""
    if not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = tp(value) if isinstance(value, str) else value
            if isinstance(number, (int, float)) and (tp is float or float(number).is_integer()):
                return tp(number)
    raise ConfigError(f"{key}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True}
_BOOL_WORDS.update({"false": False, "no": False, "off": False, "0": False})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, hints: Mapping[str, str] | None = None) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the annotated type ``tp``, or raise ConfigError.

    A dataclass type (the items of a ``list[SomeDataclass]`` field) is built from a mapping, or from a
    string holding one in YAML flow syntax (``{path: a.jsonl, fraction: 0.5}``)."""
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
                return _coerce(value, non_null[0], key, hints)
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
            value = _yaml(text, key) if text.startswith("[") else [text]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, f"{key}[{i}]", hints) for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = _yaml(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        return _number(value, tp, key)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            with contextlib.suppress(yaml.YAMLError):
                value = yaml.safe_load(value)
        return build(tp, value, f"{key}.", hints)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def build(
    cls: type, data: dict[str, Any], prefix: str = "", hints: Mapping[str, str] | None = None
) -> Any:
    """An instance of dataclass ``cls`` from nested plain data; unknown keys and bad types raise ConfigError.

    ``hints`` maps names other tools use to this schema's keys, for the unknown-key message (see `_hint`).
    A null given for a field that cannot be null resets it to its default (a list or mapping: empty).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = _types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(_unknown_key(full, hints, suggest(str(key), fields, prefix)))
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value or {}, f"{full}.", hints)
        elif value is None and not _nullable(tp):
            kwargs[key] = _default(fields[key])
            log.info("%s: null: its default %r", full, kwargs[key])
        else:
            kwargs[key] = _coerce(value, tp, full, hints)
    return cls(**kwargs)


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
