"""Plain data to typed-dataclass fields: the coercion of a value to a field's type, :func:`build` (an instance
from nested plain data) and the messages of unknown keys and bad values (:class:`ConfigError`, with the
closest valid key or, from ``hints``, the key a name from other tools means).

Moved out of :mod:`preftune._configio` (field types: see its docstring), which imports everything here and
is where to import from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

log = logging.getLogger("preftune.config")

__all__ = ["ConfigError", "build", "suggest"]


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what was expected."""


def suggest(key: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    """`` (did you mean 'PREFIX<closest>'?)`` or an empty string."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


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
