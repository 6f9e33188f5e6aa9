"""Preference data: load any common format and shape, tokenize exactly, cache, collate, and sample batches.

Modules: ``spec`` (the ``data`` config section: DataConfig, SourceConfig and their checks), ``sources`` (files,
formats and the records they hold; text formats in ``textfiles``, Hub datasets in ``hub``), ``mix`` (sources
with their own columns and shape, sampled by fraction / max_rows), ``shapes`` and ``chat`` (standard /
conversational / implicit records, system and tools, rendering), ``tokenize`` (exact boundary, truncation,
drops), ``cache`` (on-disk tokenized splits), ``load`` (the pipeline; ``entry``: what its builds share),
``unpaired`` / ``unpaired_load`` (KTO's rows of prompt, completion and label, pairs unpaired, KL partners),
``check`` (validation without a tokenizer), ``sampling`` (batch order, length grouping, ranks).

Names are imported on first use, so that ``preftune.config`` can import ``preftune.data.spec`` without
numpy or pyarrow (``preftune --help`` answers at once).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import DataError, Location
    from .load import PreferenceData, load_preference_data
    from .sampling import batch_indices, padding_share, pair_lengths, row_lengths
    from .tokenize import DROP_REASONS

_EXPORTS = {
    "DROP_REASONS": "tokenize",
    "DataError": "errors",
    "Location": "errors",
    "PreferenceData": "load",
    "batch_indices": "sampling",
    "load_preference_data": "load",
    "padding_share": "sampling",
    "pair_lengths": "sampling",
    "row_lengths": "sampling",
}

__all__ = [
    "DROP_REASONS",
    "DataError",
    "Location",
    "PreferenceData",
    "batch_indices",
    "load_preference_data",
    "padding_share",
    "pair_lengths",
    "row_lengths",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
