"""Preference data: load any common format and shape, tokenize exactly, cache, collate, and sample batches.

Modules: ``sources`` (files and formats), ``shapes`` (standard / conversational / implicit records),
``tokenize`` (exact boundary, truncation, drops), ``cache`` (on-disk tokenized splits), ``load`` (the pipeline),
``sampling`` (batch order, length grouping, ranks).
"""

from .errors import DataError, Location
from .load import PreferenceData, load_preference_data
from .sampling import batch_indices, padding_share, pair_lengths, row_lengths
from .tokenize import DROP_REASONS

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
