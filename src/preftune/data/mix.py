"""Sources and mixtures: what loading reads, source by source, and which of each source's records it keeps.

A `Source` is one entry of ``data.train_files`` / ``data.eval_files`` (a path, glob or Hub id, read with the
section's format, shape and columns) or of ``data.sources`` / ``data.eval_sources`` (a `SourceConfig`, with
its own format, shape, columns, Hub config / split / revision, and sampling).

Sampling (the mixture): a source with ``fraction`` keeps ``round(fraction * n)`` of its ``n`` records (at least
one), with ``max_rows`` at most that many (both: the smaller). Which records: the first ``k`` of a permutation
of ``0..n-1`` drawn from ``numpy.random.default_rng([seed, crc32(source name)])``, kept in file order. So the
sample depends on the seed and the source alone: adding, removing or reordering other sources does not change
it, and the same seed gives the same mixture on every machine. ``n`` comes from metadata (Parquet, Arrow, Hub)
or from one counting pass over the records (text formats).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cache import source_digest
from .errors import DataError
from .shapes import Columns
from .sources import SourceFile, count_records, resolve_files

__all__ = ["Picker", "Source", "plan_sources", "sample_positions", "source_table"]


@dataclass(frozen=True)
class Source:
    """One source of records: its input files, how to read them, and how many of its records to keep."""

    name: str  # as configured: the path, glob or Hub id
    files: tuple[SourceFile, ...]
    cols: Columns
    shape: str
    fraction: float | None = None
    max_rows: int | None = None

    @property
    def sampled(self) -> bool:
        return self.fraction is not None or self.max_rows is not None

    def key(self, root: Path, seed: int) -> dict[str, Any]:
        """Everything about the source that decides the tokenized data (see cache.py)."""
        return {
            "inputs": [source_digest(f, root) for f in self.files],
            "columns": self.cols.__dict__,
            "shape": self.shape,
            "fraction": self.fraction,
            "max_rows": self.max_rows,
            "seed": seed if self.sampled else None,
        }

    def positions(self, seed: int, bad: list | None = None) -> tuple[int | None, np.ndarray | None]:
        """(records available, sorted positions kept) for a sampled source; (None, None) keeps all.
        ``bad``: count past malformed rows of the text formats (validation) instead of raising."""
        if not self.sampled:
            return None, None
        n = sum(count_records(f, bad) for f in self.files)
        label = "|".join(f.name for f in self.files)
        return n, sample_positions(n, self.fraction, self.max_rows, seed, label)


def sample_positions(
    n: int, fraction: float | None, max_rows: int | None, seed: int, label: str
) -> np.ndarray | None:
    """Sorted positions of the records kept of ``n`` (None: all of them); see the module docstring."""
    k = n
    if fraction is not None:
        k = min(k, max(1, round(fraction * n)))
    if max_rows is not None:
        k = min(k, max_rows)
    if k >= n:
        return None
    rng = np.random.default_rng([int(seed), zlib.crc32(label.encode())])
    return np.sort(rng.permutation(n)[:k])


class Picker:
    """Asked once per record in order: whether to keep it (``positions`` sorted; None keeps all)."""

    def __init__(self, positions: np.ndarray | None):
        self._positions = positions
        self._next = 0  # index into positions
        self._seen = 0

    def __call__(self) -> bool:
        i, self._seen = self._seen, self._seen + 1
        if self._positions is None:
            return True
        if self._next < len(self._positions) and self._positions[self._next] == i:
            self._next += 1
            return True
        return False


def plan_sources(cfg: Any, role: str) -> list[Source]:
    """The train (``role="train"``) or eval sources of a DataConfig-like ``cfg``, files resolved."""
    fmt, shape = getattr(cfg, "format", "auto"), getattr(cfg, "shape", "auto")
    base = Columns.from_config(cfg)
    files = getattr(cfg, "train_files" if role == "train" else "eval_files", None) or []
    specs = getattr(cfg, "sources" if role == "train" else "eval_sources", None) or []
    out, seen = [], set()
    for pattern in [files] if isinstance(files, str) else files:
        found = [f for f in resolve_files([pattern], fmt, role=role) if f not in seen]
        seen.update(found)
        if found:  # a file two patterns match is read once, with the first
            out.append(Source(str(pattern), tuple(found), base, shape))
    for i, spec in enumerate(specs):
        key = f"data.{'sources' if role == 'train' else 'eval_sources'}[{i}]"
        try:
            resolved = resolve_files(
                [spec.path],
                spec.format or fmt,
                role=role,
                split=spec.split,
                config=spec.config,
                revision=spec.revision,
            )
        except DataError as e:
            raise DataError(f"{key}: {e}") from None
        cols = Columns.from_config(spec, base)
        out.append(
            Source(
                spec.path, tuple(resolved), cols, spec.shape or shape, spec.fraction, spec.max_rows
            )
        )
    if role == "train" and not out:
        raise DataError("train files: none given (set data.train_files or data.sources)")
    return out


def source_table(
    spans: list[tuple[str, int, int, int | None]],
    written: list[int],
    dropped: list[tuple[int, str]],
    role: str,
    eval_rows: set[int],
) -> list[dict[str, Any]]:
    """Rows per source of one pass: records available, selected (kept by the mixture), pairs per split,
    dropped. ``spans``: (name, first record position, end, records available or None = all selected);
    ``written``: the record position of each pair written; ``eval_rows``: positions split off for eval."""
    pos = np.asarray(written, dtype=np.int64)
    in_eval = np.isin(pos, np.fromiter(eval_rows, dtype=np.int64, count=len(eval_rows)))
    gone = np.asarray([row for row, _ in dropped], dtype=np.int64)
    out = []
    for name, start, end, available in spans:
        mine = (pos >= start) & (pos < end)
        n_eval = int((mine & in_eval).sum()) if role == "train" else int(mine.sum())
        out.append(
            {
                "name": name,
                "role": role,
                "records": end - start if available is None else available,
                "selected": end - start,
                "train": int(mine.sum()) - n_eval if role == "train" else 0,
                "eval": n_eval,
                "dropped": int(((gone >= start) & (gone < end)).sum()),
            }
        )
    return out
