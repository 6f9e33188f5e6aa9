"""`DataError`, `Location` and `Drop`: every complaint about input data says where it is and what was expected.

A `DataError` stops loading (the input is malformed); a `Drop` is a well-formed pair refused by policy, counted
per reason (``data.on_drop="error"`` turns it into a `DataError` naming the record).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["DataError", "Drop", "Location", "suggest"]


class DataError(ValueError):
    """Bad preference data. The message names the file, the line (or row), the field and the expectation.

    The CLI prints ``str(err)`` as one readable message, so the message must stand on its own.
    """


@dataclass(frozen=True)
class Location:
    """Where a record came from: ``line`` (1-based, JSONL/CSV) or ``row`` (0-based, JSON/Parquet/Arrow)."""

    file: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}, line {self.line}"
        if self.row is not None:
            return f"{self.file}, row {self.row} (0-based)"
        return self.file


@dataclass(frozen=True)
class Drop:
    """Why a pair was refused (one of ``tokenize.DROP_REASONS``) and a short detail for the error message."""

    reason: str
    detail: str = ""


def suggest(name: str, available: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest available name, or ''."""
    close = difflib.get_close_matches(name, [str(a) for a in available], n=1, cutoff=0.6)
    if not close:
        lowered = {str(a).lower(): str(a) for a in available}
        close = [lowered[name.lower()]] if name.lower() in lowered else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def missing_column_error(where: Location | str, field: str, available: Iterable[str]) -> DataError:
    available = list(available)
    return DataError(
        f"{where}: column {field!r} not found{suggest(field, available)}; "
        f"available columns: {', '.join(map(repr, available)) or '(none)'}. "
        "Set the column names in the data config (prompt_column / chosen_column / rejected_column / weight_column)."
    )
