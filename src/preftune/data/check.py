"""Validation without a tokenizer: every record of every source checked, bad rows collected, not raised.

What ``preftune data FILE`` does when no tokenizer is given. Per file: its format, detected shape, columns and
the value types seen in them (the schema), records read and kept by the mixture, and every bad row (file,
line or row, field, what was expected): malformed JSON lines, CSV records with the wrong number of fields,
and each record that the shape's validation refuses (the same checks training runs, `shapes.parse_pair`).
A file that cannot be read at all (missing, not the format, a missing column, empty) is reported as that
file's error. Character-length percentiles of prompt, chosen and rejected over the valid records (messages:
their content, summed) stand in for token lengths. Unpaired rows (`preftune.data.unpaired`, ``data.unpair``
included): prompt and completion lengths, bad labels as bad rows, and the training rows per label.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import DataError, Location
from .mix import Picker, Source, plan_sources
from .shapes import Columns, Parsed, detect_shape, parse_pair, parse_weight
from .sources import SourceFile, read_records, source_columns
from .unpaired import file_kind, parse_rows, unpaired_shape
from .unpaired_load import data_kind

__all__ = ["PERCENTILES", "check_records", "percentiles"]

PERCENTILES = (50, 90, 99)
_FIELDS = ("prompt", "chosen", "rejected")
_ROW_FIELDS = ("prompt", "completion")


def percentiles(values: Iterable[int]) -> dict[str, int | None]:
    """Nearest-rank p50 / p90 / p99 and max (None for no values): always an observed value."""
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.int64)
    if arr.size == 0:
        return {**{f"p{q}": None for q in PERCENTILES}, "max": None}
    pct = np.percentile(arr, PERCENTILES, method="inverted_cdf")
    return {**{f"p{q}": int(v) for q, v in zip(PERCENTILES, pct)}, "max": int(arr.max())}


def check_records(cfg: Any, *, seed: int = 0, max_bad: int = 20) -> dict[str, Any]:
    """Check the records of a DataConfig-like ``cfg`` (all its train and eval sources).

    Returns ``{"files": [...], "sources": [...], "lengths": {field: percentiles}, "valid", "bad", "errors",
    "bad_rows": [first max_bad "location: message" lines], "unpaired", "labels"}``; for unpaired rows
    (`preftune.data.unpaired`) the fields are prompt and completion, and ``labels`` counts the valid
    training rows per label. Raises `DataError` only for a configuration that names nothing to read (no
    train files).
    """
    files: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    bad_rows: list[str] = []
    unpair = bool(getattr(cfg, "unpair", False))
    plans = {role: plan_sources(cfg, role) for role in ("train", "eval")}
    try:
        rows = data_kind(plans["train"] + plans["eval"], unpair, None)
    except DataError:
        rows = unpair or getattr(cfg, "shape", "auto") == "unpaired"  # reported per file below
    fields = _ROW_FIELDS if rows else _FIELDS
    lengths: dict[str, list[int]] = {f: [] for f in (*_FIELDS, *_ROW_FIELDS)}
    labels = {"desirable": 0, "undesirable": 0}
    for role in ("train", "eval"):
        for source in plans[role]:
            available, positions = source.positions(seed, bad=[])
            pick = Picker(positions)
            selected = records = 0
            for src in source.files:
                mode = (rows, unpair, labels if role == "train" else None)
                report = _check_file(src, source, role, pick, lengths, mode)
                selected, records = selected + report["selected"], records + report["records"]
                files.append(report)
                bad_rows.extend(report.pop("bad_lines"))
            sources.append(
                {
                    "name": source.name,
                    "role": role,
                    "records": records if available is None else available,
                    "selected": selected,
                }
            )
    return {
        "files": files,
        "sources": sources,
        "lengths": {f: percentiles(lengths[f]) for f in fields},
        "valid": sum(f["valid"] for f in files),
        "bad": sum(f["bad"] for f in files),
        "errors": sum(1 for f in files if f["error"]),
        "bad_rows": bad_rows[:max_bad],
        "unpaired": rows,
        "labels": labels if rows else None,
    }


def _check_file(
    src: SourceFile,
    source: Source,
    role: str,
    pick: Picker,
    lengths: dict[str, list[int]],
    mode: tuple[bool, bool, dict[str, int] | None] = (False, False, None),
) -> dict[str, Any]:
    """One file's report; ``mode``: (the data is unpaired rows, data.unpair, label counts to add to)."""
    rows, unpair, labels = mode
    cols = source.cols
    report: dict[str, Any] = {
        "name": src.name,
        "source": source.name,
        "role": role,
        "format": src.format,
        "sampled": source.sampled,
        "shape": None,
        "columns": [],
        "types": {},
        "records": 0,
        "selected": 0,
        "valid": 0,
        "bad": 0,
        "error": None,
        "bad_lines": [],
    }
    bad: list[tuple[Location, str]] = []
    refused = (
        0  # records read but refused by the shape's checks (the rest of `bad`: skipped unread)
    )
    try:
        columns = source_columns(src)
        records = read_records(src, None if columns is None else _wanted(cols, columns), bad)
        first = next(records, None)
        if first is None:
            _empty(src, bad)
        report["columns"] = list(columns) if columns is not None else list(first[0])  # type: ignore[index]
        kind = file_kind(source.shape, cols, first[0], columns, unpair)  # type: ignore[index]
        if rows and kind == "pairs":
            raise DataError(
                f"{src.name}: holds pairs ({cols.chosen!r} / {cols.rejected!r}) among unpaired rows; "
                "set data.unpair=true to split each pair into a desirable and an undesirable row"
            )
        if kind == "unpaired":
            shape = unpaired_shape(cols, first[0], columns, src.name)  # type: ignore[index]
        else:
            forced = "auto" if source.shape == "unpaired" else source.shape
            shape = detect_shape(forced, cols, first[0], columns, src.name)  # type: ignore[index]
        names = {
            "pairs": shape,
            "unpaired": f"unpaired {shape}",
            "unpair": f"{shape} pairs, unpaired",
        }
        report["shape"] = names[kind]
        for record, loc in itertools.chain([first], records):  # type: ignore[list-item]
            report["records"] += 1
            _note_types(report["types"], record)
            if not pick():
                continue
            report["selected"] += 1
            try:
                if kind == "pairs":
                    parsed: Any = parse_pair(record, shape, cols, loc)
                else:
                    parsed = parse_rows(record, kind, shape, cols, loc)
                if cols.weight:
                    parse_weight(record.get(cols.weight), loc, cols.weight)
            except DataError as e:
                bad.append((loc, _without(str(e), loc)))
                refused += 1
                continue
            report["valid"] += 1
            if kind == "pairs":
                for name, value in zip(_FIELDS, _texts(parsed)):
                    lengths[name].append(value)
                continue
            for row in parsed:
                lengths["prompt"].append(_size(row.prompt))
                lengths["completion"].append(_size(row.completion))
                if labels is not None:
                    labels["desirable" if row.label else "undesirable"] += 1
    except DataError as e:
        report["error"] = str(e)
    skipped = len(bad) - refused  # malformed rows the readers skipped: read, and in the data
    report["records"] += skipped
    report["selected"] += skipped if not source.sampled else 0
    report["bad"] = len(bad)
    report["bad_lines"] = [f"{loc}: {msg}" for loc, msg in bad]
    report["types"] = {k: "|".join(sorted(v)) for k, v in report["types"].items()}
    return report


def _wanted(cols: Columns, columns: list[str]) -> list[str]:
    names = (*cols.needed(), cols.completion, cols.label, *cols.optional())
    return [c for c in names if c in columns] or list(columns)


def _empty(src: SourceFile, bad: list) -> None:
    if bad:  # every row malformed: report them, nothing else to check
        raise DataError(f"{src.name}: no valid records ({len(bad)} malformed)")
    empty = os.path.isfile(src.path) and os.path.getsize(src.path) == 0
    raise DataError(
        f"{src.name}: {'the file is empty' if empty else 'no records in this file'}; "
        "expected preference records"
    )


def _without(message: str, loc: Location) -> str:
    prefix = f"{loc}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


_TYPE_NAMES = {str: "str", int: "int", float: "float", bool: "bool", list: "list", dict: "dict"}


def _note_types(types: dict[str, set[str]], record: dict) -> None:
    for key, value in record.items():
        kind = "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)
        types.setdefault(key, set()).add(kind)


def _size(value: Any) -> int:
    """Characters of a text, or of the messages' content, summed."""
    if isinstance(value, str):
        return len(value)
    return sum(len(m.get("content") or "") for m in value)


def _texts(parsed: Parsed) -> tuple[int, int, int]:
    """Characters of prompt, chosen and rejected."""
    return _size(parsed.prompt), _size(parsed.chosen), _size(parsed.rejected)
