"""Reading records from files: which files, which format, and where each record came from.

Formats (``format="auto"`` picks by extension; ``.gz`` is allowed on the text formats):

- ``jsonl`` (``.jsonl``, ``.ndjson``): streamed line by line, no line-length limit; errors name the 1-based line.
- ``json`` (``.json``): a list of records, or an object holding the list under ``"data"`` or ``"train"``. A
  ``.json`` file that turns out to hold one object per line is read as JSONL. Errors name the 0-based row.
- ``csv`` (``.csv``; ``.tsv`` is tab-separated): header row first; quoted fields may span lines; errors name the
  1-based line where the record starts. Cells are strings, so CSV holds the standard/implicit string shapes.
- ``parquet`` (``.parquet``, ``.pq``): read in record batches of the needed columns, memory-mapped.
- ``arrow``: a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder gives its
  ``train`` split for training files and its ``validation``/``eval``/``test`` split for eval files) or a single
  ``.arrow`` file written by ``datasets``; memory-mapped, read in batches.

Text is UTF-8; a BOM is skipped and Windows line endings are accepted. Invalid UTF-8 raises a `DataError`
naming the line and the byte offset. So does JSON text holding an invalid UTF-16 surrogate escape (a lone
``\ud800``-``\udfff``, which Python's JSON reader accepts but no tokenizer or Arrow file can hold), naming the
line (or row) and the field. A file that cannot be read (permissions, a folder) or decompressed (not gzip,
truncated, corrupt) is a `DataError` naming the file and the line reached.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError, Location

__all__ = ["FORMATS", "SourceFile", "read_records", "resolve_files", "source_columns"]

FORMATS = ("jsonl", "json", "csv", "parquet", "arrow")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonlines": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
}
_EVAL_SPLITS = ("validation", "eval", "test")
_BATCH_ROWS = 1024  # rows materialised as Python objects at a time for Parquet/Arrow


@dataclass(frozen=True)
class SourceFile:
    """One input: a file (or a saved-dataset folder), its format, and for a DatasetDict the split to read."""

    path: str
    format: str
    split: str | None = None


def resolve_files(
    patterns: Sequence[str], fmt: str = "auto", *, role: str = "train"
) -> list[SourceFile]:
    """Expand paths and globs (sorted, de-duplicated) and settle each file's format."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"data format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    paths: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(os.path.expandvars(str(pattern)))
        if glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise DataError(f"{role} files: no file matches the pattern {pattern!r}")
        elif os.path.exists(expanded):
            matches = [expanded]
        else:
            raise DataError(f"{role} files: {pattern!r} does not exist")
        paths.extend(m for m in matches if m not in paths)
    if not paths:
        raise DataError(f"{role} files: none given")
    return [_source_file(p, fmt, role) for p in paths]


def _source_file(path: str, fmt: str, role: str) -> SourceFile:
    if os.path.isdir(path):
        if fmt not in ("auto", "arrow"):
            raise DataError(f"{path}: is a folder, but format {fmt!r} expects a file")
        return SourceFile(path, "arrow", _dataset_dict_split(path, role))
    if fmt == "auto":
        stem = path[:-3] if path.endswith(".gz") else path
        fmt = _EXTENSIONS.get(os.path.splitext(stem)[1].lower(), "")
        if not fmt:
            raise DataError(
                f"{path}: cannot tell the format from the extension; expected one of "
                f"{', '.join(sorted(_EXTENSIONS))} (optionally .gz) or a saved-dataset folder, "
                "or set data.format"
            )
    return SourceFile(path, fmt)


def _dataset_dict_split(path: str, role: str) -> str | None:
    dict_file = os.path.join(path, "dataset_dict.json")
    if not os.path.exists(dict_file):
        if not os.path.exists(os.path.join(path, "state.json")):
            raise DataError(
                f"{path}: a folder must be a dataset saved with datasets' save_to_disk "
                "(state.json or dataset_dict.json not found); give files or a glob instead"
            )
        return None
    with open(dict_file, encoding="utf-8") as f:
        splits = list(json.load(f).get("splits", []))
    wanted = ("train",) if role == "train" else _EVAL_SPLITS
    for name in wanted:
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    raise DataError(
        f"{path}: a DatasetDict with splits {splits}; none is named {' / '.join(wanted)} for the {role} data. "
        "Save the split you want on its own (dataset_dict[split].save_to_disk(...))"
    )


def source_columns(src: SourceFile) -> list[str] | None:
    """Column names of a tabular source (Parquet, Arrow, CSV header), or None for JSON/JSONL."""
    if src.format == "parquet":
        return list(_parquet_file(src.path).schema_arrow.names)
    if src.format == "arrow":
        return list(_load_arrow(src).column_names)
    if src.format == "csv":
        for header, _ in _csv_rows(src.path):
            return header
        return []
    return None


def read_records(
    src: SourceFile, columns: Iterable[str] | None = None
) -> Iterator[tuple[dict, Location]]:
    """Yield ``(record, location)`` for each record. ``columns`` limits what columnar formats read."""
    if src.format == "jsonl":
        yield from _read_jsonl(src.path)
    elif src.format == "json":
        yield from _read_json(src.path)
    elif src.format == "csv":
        yield from _read_csv(src.path)
    elif src.format == "parquet":
        yield from _read_parquet(src.path, columns)
    elif src.format == "arrow":
        yield from _read_arrow(src, columns)
    else:  # pragma: no cover - resolve_files guards this
        raise DataError(f"{src.path}: unknown format {src.format!r}")


# ----------------------------------------------------------------------------------------- text formats


# Lone UTF-16 surrogates: JSON escapes \ud800-\udfff that are not part of a valid pair survive json.loads.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")
# What reading a (gzip) file raises: OSError (gzip.BadGzipFile too), EOFError (truncated), zlib.error.
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _open_binary(path: str) -> io.BufferedIOBase:
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _read_error(path: str, line: int | None, e: BaseException) -> DataError:
    """A failure reading or decompressing ``path`` (at 1-based ``line``, if known) as one clear message."""
    where = path if line is None else f"{path}, line {line}"
    if not path.endswith(".gz"):
        return DataError(f"{where}: cannot read the file ({e})")
    if isinstance(e, EOFError):
        why = "the compressed data ends early (a truncated download or copy?)"
    elif isinstance(e, gzip.BadGzipFile) and "Not a gzipped file" in str(e):
        why = "it is not gzip data"
    else:
        why = f"corrupt gzip data ({e})"
    return DataError(
        f"{where}: cannot decompress: {why}; expected a complete gzip file "
        "(check it with `gzip -t`)"
    )


def _raw_lines(f: io.BufferedIOBase, path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) for each line; read and decompression failures become DataErrors."""
    lineno = 0
    while True:
        try:
            raw = f.readline()
        except _READ_ERRORS as e:
            raise _read_error(path, lineno + 1, e) from None
        if not raw:
            return
        lineno += 1
        yield lineno, raw


def _decoded_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text with its line ending) for each line, strict UTF-8, BOM skipped."""
    offset = 0
    with _open_binary(path) as f:
        for lineno, raw in _raw_lines(f, path):
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(f"{path}, line {lineno}", raw, e, start) from None


def _utf8_error(where: str, raw: bytes, e: UnicodeDecodeError, base: int) -> DataError:
    return DataError(
        f"{where}: invalid UTF-8 byte 0x{raw[e.start]:02x} at byte offset {base + e.start} of the file "
        f"(byte {e.start + 1} of the line); expected UTF-8 text. Re-encode the file as UTF-8 "
        "(e.g. `iconv -f latin1 -t utf-8`)"
    )


def _read_jsonl(path: str) -> Iterator[tuple[dict, Location]]:
    for lineno, text in _decoded_lines(path):
        text = text.strip()
        if not text:
            continue
        loc = Location(path, line=lineno)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{loc}: malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{loc}: expected a JSON object per line, got {type(obj).__name__}")
        if "\\u" in text and _SURROGATE_ESCAPE.search(text):
            _check_surrogates(obj, loc)
        yield obj, loc


def _check_surrogates(record: dict, loc: Location) -> None:
    for field, text in _strings_in(record, ""):
        found = _SURROGATE.search(text)
        if found:
            bad = found.group()
            raise DataError(
                f"{loc}: field {field!r} holds an invalid UTF-16 surrogate escape "
                f"(\\u{ord(bad):04x} without its pair); expected valid Unicode text"
            )


def _strings_in(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(field path, text) of every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            name = f"{path}.{key}" if path else str(key)
            yield f"{name} (the key)", str(key)
            yield from _strings_in(item, name)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings_in(item, f"{path}[{i}]")


def _read_json(path: str) -> Iterator[tuple[dict, Location]]:
    with _open_binary(path) as f:
        try:
            data = f.read()
        except _READ_ERRORS as e:
            raise _read_error(path, None, e) from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise _utf8_error(
            f"{path}, line {line}", data[line_start:], _shift(e, line_start), line_start
        ) from None
    del data
    surrogates = "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file: read it as JSONL
            yield from _read_jsonl(path)
            return
        raise DataError(
            f"{path}, line {e.lineno}: malformed JSON ({e.msg} at column {e.colno}); "
            "expected a list of records (or JSONL, one object per line)"
        ) from None
    del text
    if isinstance(obj, dict):
        for key in ("data", "train"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            raise DataError(
                f"{path}: expected a JSON list of records or an object with a 'data' or 'train' list; "
                f"got an object with keys {list(obj)[:10]}"
            )
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(obj).__name__}")
    for row, record in enumerate(obj):
        loc = Location(path, row=row)
        if not isinstance(record, dict):
            raise DataError(
                f"{loc}: expected a JSON object (a record), got {type(record).__name__}"
            )
        if surrogates:
            _check_surrogates(record, loc)
        yield record, loc


def _shift(e: UnicodeDecodeError, by: int) -> UnicodeDecodeError:
    return UnicodeDecodeError(e.encoding, e.object, e.start - by, e.end - by, e.reason)


def _csv_rows(path: str) -> Iterator[tuple[list[str], int]]:
    """(fields, 1-based line where the record starts) for each non-blank CSV record."""
    delimiter = "\t" if path.removesuffix(".gz").lower().endswith(".tsv") else ","
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # very long cells are fine
    lines = (text for _, text in _decoded_lines(path))
    reader = csv.reader(lines, delimiter=delimiter)
    consumed = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}, line {consumed + 1}: malformed CSV ({e})") from None
        start, consumed = consumed + 1, reader.line_num
        if fields:
            yield fields, start


def _read_csv(path: str) -> Iterator[tuple[dict, Location]]:
    header: list[str] | None = None
    for fields, line in _csv_rows(path):
        if header is None:
            header = [h.strip() for h in fields]
            continue
        loc = Location(path, line=line)
        if len(fields) != len(header):
            raise DataError(
                f"{loc}: expected {len(header)} fields (header: {', '.join(header)}), got {len(fields)}; "
                "quote fields that contain the delimiter, quotes or newlines"
            )
        yield dict(zip(header, fields)), loc


# ------------------------------------------------------------------------------------ columnar formats


def _parquet_file(path: str) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, memory_map=True)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a non-Parquet file
        raise DataError(f"{path}: cannot read as Parquet ({e})") from None


def _read_parquet(path: str, columns: Iterable[str] | None) -> Iterator[tuple[dict, Location]]:
    pf = _parquet_file(path)
    names = pf.schema_arrow.names
    wanted = [c for c in columns if c in names] if columns is not None else None
    row = 0
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=wanted):
        for record in batch.to_pylist():
            yield record, Location(path, row=row)
            row += 1


def _load_arrow(src: SourceFile) -> Any:
    import datasets

    try:
        if os.path.isdir(src.path):
            ds = datasets.load_from_disk(src.path, keep_in_memory=False)
            return ds[src.split] if src.split is not None else ds
        return datasets.Dataset.from_file(src.path, in_memory=False)
    except Exception as e:
        raise DataError(f"{src.path}: cannot read as a saved dataset ({e})") from None


def _read_arrow(src: SourceFile, columns: Iterable[str] | None) -> Iterator[tuple[dict, Location]]:
    ds = _load_arrow(src)
    if columns is not None:
        ds = ds.select_columns([c for c in columns if c in ds.column_names])
    where = src.path if src.split is None else f"{src.path} [split {src.split}]"
    ds = ds.with_format(
        None
    )  # plain Python values even if the dataset was saved with a torch format
    row = 0
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values)), Location(where, row=row)
            row += 1
