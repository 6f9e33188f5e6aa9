"""The text formats: JSONL, JSON and CSV/TSV (optionally gzip-compressed), read as ``(record, Location)``.

Text is UTF-8; a BOM is skipped and Windows line endings are accepted. Invalid UTF-8 raises a `DataError`
naming the line and the byte offset. So does JSON text holding an invalid UTF-16 surrogate escape (a lone
``\ud800``-``\udfff``, which Python's JSON reader accepts but no tokenizer or Arrow file can hold), naming the
line (or row) and the field. A file that cannot be read (permissions, a folder) or decompressed (not gzip,
truncated, corrupt) is a `DataError` naming the file and the line reached.

``bad``: where given (validation without a tokenizer, `preftune.data.check`), a malformed JSONL line, a CSV
record with the wrong number of fields and a JSON list item that is not an object are appended to it as
``(Location, message)`` and skipped, so that one pass reports every bad row; otherwise the first one raises.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from typing import Any

from .errors import DataError, Location

__all__ = ["csv_header", "read_csv", "read_json", "read_jsonl"]

Bad = list[tuple[Location, str]]


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


def _complain(bad: Bad | None, loc: Location, message: str) -> None:
    """Record a bad row in ``bad``, or raise it when there is none."""
    if bad is None:
        raise DataError(f"{loc}: {message}")
    bad.append((loc, message))


def read_jsonl(path: str, bad: Bad | None = None) -> Iterator[tuple[dict, Location]]:
    for lineno, text in _decoded_lines(path):
        text = text.strip()
        if not text:
            continue
        loc = Location(path, line=lineno)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            msg = f"malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
            _complain(bad, loc, msg)
            continue
        if not isinstance(obj, dict):
            _complain(bad, loc, f"expected a JSON object per line, got {type(obj).__name__}")
            continue
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


def read_json(path: str, bad: Bad | None = None) -> Iterator[tuple[dict, Location]]:
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
            yield from read_jsonl(path, bad)
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
            _complain(bad, loc, f"expected a JSON object (a record), got {type(record).__name__}")
            continue
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


def csv_header(path: str) -> list[str]:
    for header, _ in _csv_rows(path):
        return [h.strip() for h in header]
    return []


def read_csv(path: str, bad: Bad | None = None) -> Iterator[tuple[dict, Location]]:
    header: list[str] | None = None
    for fields, line in _csv_rows(path):
        if header is None:
            header = [h.strip() for h in fields]
            continue
        loc = Location(path, line=line)
        if len(fields) != len(header):
            msg = (
                f"expected {len(header)} fields (header: {', '.join(header)}), got {len(fields)}; "
                "quote fields that contain the delimiter, quotes or newlines"
            )
            _complain(bad, loc, msg)
            continue
        yield dict(zip(header, fields)), loc
