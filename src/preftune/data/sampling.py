"""Batch sampling: which pairs go in which micro-batch, on which rank, each epoch.

`batch_indices` is a pure function of (lengths, batch_size, seed, epoch, flags, rank, world_size), so a resumed
run rebuilds the same epoch and skips to its batch position.

- Global batch = ``batch_size * world_size`` pairs. The epoch order (a permutation seeded by (seed, epoch), or
  the natural order with ``shuffle=False``) is cut into global batches; rank ``r`` takes ``global[r::world_size]``
  (interleaved), so every rank gets the same number of batches.
- The last, shorter global batch is KEPT (the last window still steps). Its pairs are dealt interleaved too, so
  rank shares differ by at most one pair, and a rank may get an EMPTY last batch when fewer pairs than ranks
  remain; the trainer must still take part in that step (contributing zero pairs).
- ``group_by_length``: the shuffled order is cut into mega-chunks of ``mega_batches`` global batches, each sorted
  by length (longest first), cut into global batches, and the full global batches are shuffled (the short tail
  stays last). Pairs in a batch have similar lengths (less padding) while batch order stays random.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["batch_indices", "padding_share", "pair_lengths", "row_lengths"]


def batch_indices(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = False,
    rank: int = 0,
    world_size: int = 1,
    mega_batches: int = 50,
) -> list[list[int]]:
    """This rank's micro-batches (lists of pair indices) for one epoch; see the module docstring."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}"
        )
    n, global_size = len(lengths), batch_size * world_size
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(n) if shuffle else np.arange(n)
    if group_by_length and n:
        lens = np.asarray(lengths, dtype=np.int64)
        chunk = global_size * max(1, mega_batches)
        order = np.concatenate(
            [
                block[np.argsort(-lens[block], kind="stable")]
                for block in np.split(order, range(chunk, n, chunk))
            ]
        )
    batches = [order[i : i + global_size] for i in range(0, n, global_size)]
    if group_by_length and shuffle:
        full, tail = (
            (batches[:-1], batches[-1:]) if len(batches[-1]) < global_size else (batches, [])
        )
        batches = [full[i] for i in rng.permutation(len(full))] + tail
    return [b[rank::world_size].tolist() for b in batches]


def padding_share(batches: Sequence[Sequence[int]], lengths: Sequence[Any]) -> float:
    """Share of padded token slots when each batch's 2B rows are padded to its longest row.

    ``lengths[i]`` is ``(chosen_row_len, rejected_row_len)`` of pair i (see `row_lengths`) or one int used for
    both rows.
    """
    padded = total = 0
    for batch in batches:
        rows = []
        for i in batch:
            length = lengths[i]
            rows.extend(length if isinstance(length, (tuple, list)) else (length, length))
        if rows:
            width = max(rows)
            total += width * len(rows)
            padded += width * len(rows) - sum(rows)
    return padded / total if total else 0.0


def row_lengths(dataset: Any) -> list[tuple[int, int]]:
    """``(len(prompt+chosen), len(prompt+rejected))`` per pair of a tokenized split."""
    p, c, r = _column_lengths(dataset)
    return list(zip((p + c).tolist(), (p + r).tolist()))


def pair_lengths(dataset: Any) -> list[int]:
    """The longer row of each pair (the length `batch_indices` groups by)."""
    p, c, r = _column_lengths(dataset)
    return (p + np.maximum(c, r)).tolist()


def _column_lengths(dataset: Any) -> tuple[np.ndarray, ...]:
    names = ("prompt_ids", "chosen_ids", "rejected_ids")
    if hasattr(
        dataset, "with_format"
    ):  # datasets.Dataset: read list lengths from Arrow, no Python lists
        import pyarrow.compute as pc

        table = dataset.with_format("arrow")[:]
        return tuple(
            pc.list_value_length(table[name]).to_numpy(zero_copy_only=False).astype(np.int64)
            for name in names
        )
    return tuple(np.array([len(ex[name]) for ex in dataset], dtype=np.int64) for name in names)
