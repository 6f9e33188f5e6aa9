"""Reading records: which inputs, which format, and where each record came from.

Formats (``format="auto"`` picks by extension; ``.gz`` is allowed on the text formats):

- ``jsonl`` (``.jsonl``, ``.ndjson``): streamed line by line, no line-length limit; errors name the 1-based line.
- ``json`` (``.json``): a list of records, or an object holding the list under ``"data"`` or ``"train"``. A
  ``.json`` file that turns out to hold one object per line is read as JSONL. Errors name the 0-based row.
- ``csv`` (``.csv``; ``.tsv`` is tab-separated): header row first; quoted fields may span lines; errors name the
  1-based line where the record starts. Cells are strings, so CSV holds the standard/implicit string shapes.
- ``parquet`` (``.parquet``, ``.pq``): read in record batches of the needed columns, memory-mapped.
- ``arrow``: a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder gives the split
  asked for, else its ``train`` split for training data and its ``validation``/``eval``/``test`` split for eval
  data) or a single ``.arrow`` file written by ``datasets``; memory-mapped, read in batches.
- ``hub``: a Hub dataset ``org/name`` (see `preftune.data.hub`): a string shaped so that is not an existing
  path. A missing local path is an error, never a network lookup.

The text formats (UTF-8, BOM, gzip, surrogate checks) are read by `preftune.data.textfiles`.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from . import hub
from .errors import DataError, Location
from .textfiles import Bad, csv_header, read_csv, read_json, read_jsonl

__all__ = [
    "FORMATS",
    "SourceFile",
    "count_records",
    "read_records",
    "resolve_files",
    "source_columns",
]

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
_BATCH_ROWS = 1024  # rows materialised as Python objects at a time for Parquet/Arrow


@dataclass(frozen=True)
class SourceFile:
    """One input: a file, a saved-dataset folder or a Hub dataset (``format="hub"``, ``path`` its id), its
    format, and the split to read (DatasetDict folders, Hub datasets), Hub configuration and revision."""

    path: str
    format: str
    split: str | None = None
    config: str | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        """How messages and locations name it."""
        if self.format == "hub":
            return hub.describe(self.path, self.config, self.split)
        return self.path if self.split is None else f"{self.path} [split {self.split}]"


def resolve_files(
    patterns: Sequence[str],
    fmt: str = "auto",
    *,
    role: str = "train",
    split: str | None = None,
    config: str | None = None,
    revision: str | None = None,
) -> list[SourceFile]:
    """Expand paths and globs (sorted, de-duplicated), recognise Hub ids, and settle each input's format.

    ``split`` applies to DatasetDict folders and Hub datasets, ``config`` and ``revision`` to Hub datasets.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"data format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    paths: list[str] = []
    found: list[SourceFile] = []
    for pattern in patterns:
        expanded = os.path.expanduser(os.path.expandvars(str(pattern)))
        if glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise DataError(f"{role} files: no file matches the pattern {pattern!r}")
        elif os.path.exists(expanded):
            matches = [expanded]
        elif hub.looks_like_hub_id(str(pattern)):
            found.append(_hub_source(str(pattern), role, split, config, revision))
            continue
        else:
            raise DataError(f"{role} files: {pattern!r} does not exist")
        if config is not None or revision is not None:
            raise DataError(
                f"{pattern}: config and revision apply to Hub datasets; this is a local path"
            )
        for m in matches:
            if m not in paths:
                paths.append(m)
                found.append(_source_file(m, fmt, role, split))
    if not found:
        raise DataError(f"{role} files: none given")
    return found


def _hub_source(
    repo: str, role: str, split: str | None, config: str | None, revision: str | None
) -> SourceFile:
    where = hub.describe(repo, config, None)
    names = hub.split_names(repo, config, revision)
    fix = "Name one with a data source's split (data.sources: [{path: ..., split: ...}])"
    chosen = hub.choose_split(names, split, role, where, fix)
    return SourceFile(repo, "hub", chosen, config, revision)


def _source_file(path: str, fmt: str, role: str, split: str | None = None) -> SourceFile:
    if os.path.isdir(path):
        if fmt not in ("auto", "arrow"):
            raise DataError(f"{path}: is a folder, but format {fmt!r} expects a file")
        return SourceFile(path, "arrow", _dataset_dict_split(path, role, split))
    if split is not None:
        raise DataError(f"{path}: a split applies to Hub datasets and DatasetDict folders")
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


def _dataset_dict_split(path: str, role: str, split: str | None) -> str | None:
    dict_file = os.path.join(path, "dataset_dict.json")
    if not os.path.exists(dict_file):
        if not os.path.exists(os.path.join(path, "state.json")):
            raise DataError(
                f"{path}: a folder must be a dataset saved with datasets' save_to_disk "
                "(state.json or dataset_dict.json not found); give files or a glob instead"
            )
        if split is not None:
            raise DataError(
                f"{path}: a saved Dataset, not a DatasetDict: it has no split {split!r}"
            )
        return None
    with open(dict_file, encoding="utf-8") as f:
        splits = list(json.load(f).get("splits", []))
    fix = "Name one with a data source's split, or save the split you want on its own"
    return hub.choose_split(splits, split, role, f"{path}: a DatasetDict with", fix)


def source_columns(src: SourceFile) -> list[str] | None:
    """Column names of a tabular source (Parquet, Arrow, Hub, CSV header), or None for JSON/JSONL."""
    if src.format == "parquet":
        return list(_parquet_file(src.path).schema_arrow.names)
    if src.format in ("arrow", "hub"):
        return list(_load_arrow(src).column_names)
    if src.format == "csv":
        return csv_header(src.path)
    return None


def count_records(src: SourceFile, bad: Bad | None = None) -> int:
    """How many records ``read_records`` yields (from metadata where the format has it)."""
    if src.format == "parquet":
        return int(_parquet_file(src.path).metadata.num_rows)
    if src.format in ("arrow", "hub"):
        return len(_load_arrow(src))
    return sum(1 for _ in read_records(src, columns=(), bad=[] if bad is not None else None))


def read_records(
    src: SourceFile, columns: Iterable[str] | None = None, bad: Bad | None = None
) -> Iterator[tuple[dict, Location]]:
    """Yield ``(record, location)`` for each record. ``columns`` limits what columnar formats read;
    ``bad`` collects malformed rows of the text formats instead of raising (see `textfiles`)."""
    if src.format == "jsonl":
        yield from read_jsonl(src.path, bad)
    elif src.format == "json":
        yield from read_json(src.path, bad)
    elif src.format == "csv":
        yield from read_csv(src.path, bad)
    elif src.format == "parquet":
        yield from _read_parquet(src.path, columns)
    elif src.format in ("arrow", "hub"):
        yield from _read_arrow(src, columns)
    else:  # pragma: no cover - resolve_files guards this
        raise DataError(f"{src.path}: unknown format {src.format!r}")


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
    if src.format == "hub":
        assert src.split is not None
        return hub.dataset(src.path, src.config, src.split, src.revision)
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
    where = src.name
    ds = ds.with_format(
        None
    )  # plain Python values even if the dataset was saved with a torch format
    row = 0
    for batch in ds.iter(batch_size=_BATCH_ROWS):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values)), Location(where, row=row)
            row += 1
