"""What every build of a tokenized-data cache entry shares (pairs in `load`, unpaired rows in
`unpaired_load`): a pass over sources, the notes it takes, the ``eval_fraction`` draw, and the whole-input
checks and meta of the written splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cache import max_weight
from .errors import DataError
from .mix import Source, source_table
from .tokenize import DROP_REASONS, Tally

__all__ = ["Notes", "Pass", "eval_records", "finish"]


def eval_records(rows_read: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted record positions ``eval_fraction`` sends to eval (see the module docstring)."""
    if rows_read < 2:
        raise DataError(f"data.eval_fraction needs at least 2 records, read {rows_read}")
    n_eval_rows = min(max(1, round(fraction * rows_read)), rows_read - 1)
    return np.sort(np.random.default_rng(seed).permutation(rows_read)[:n_eval_rows])


def finish(
    tmp: Path,
    meta: dict,
    passes: tuple[Pass, Pass],
    srcs: tuple[list[Source], list[Source]],
    eval_set: set[int],
    fraction: float,
    counts: tuple[int, int],
    notes: Notes,
    tokenizer: Any,
    what: str = "pairs",
) -> None:
    """The whole-input checks on written splits, and the entry's meta (drops, rows per source, ...)."""
    (train, evaluated), (train_srcs, eval_srcs), (n_train, n_eval) = passes, srcs, counts
    rows_read = train.rows + evaluated.rows
    total = Tally(truncations=dict.fromkeys(train.tally.truncations, 0))
    total.add(train.tally)
    total.add(evaluated.tally)
    by_split = {"train": train.tally.drops}
    if fraction > 0:
        by_split = {"train": dict.fromkeys(DROP_REASONS, 0), "eval": dict.fromkeys(DROP_REASONS, 0)}
        for row, reason in train.dropped:
            by_split["eval" if row in eval_set else "train"][reason] += 1
    elif eval_srcs:
        by_split["eval"] = evaluated.tally.drops
    if n_train == 0:
        raise DataError(
            f"no training {what} left: {rows_read} records read, drops {_nonzero(total)}"
        )
    weighted = [s for s in train_srcs if s.cols.weight]
    if weighted and max_weight(tmp / "train.arrow") <= 0:
        files = ", ".join(f.name for s in train_srcs for f in s.files)
        names = ", ".join(sorted({repr(s.cols.weight) for s in weighted}))
        raise DataError(
            f"{files}: every training {what[:-1]} has weight 0 (field {names}): nothing to learn; "
            "expected at least one weight > 0"
        )
    if (fraction > 0 or eval_srcs) and n_eval == 0:
        raise DataError(f"no eval {what} left: {rows_read} records read, drops {_nonzero(total)}")
    table = source_table(train.spans, train.written, train.dropped, "train", eval_set)
    if eval_srcs:
        table += source_table(evaluated.spans, evaluated.written, evaluated.dropped, "eval", set())
    meta.update(
        has_eval=n_eval > 0,
        n_train=n_train,
        n_eval=n_eval,
        rows_read=rows_read,
        drops=total.drops,
        drops_by_split=by_split,
        truncations=total.truncations,
        first_drop=total.first_drop,
        shapes=notes.shapes,
        files={
            "train": [f.name for s in train_srcs for f in s.files],
            "eval": [f.name for s in eval_srcs for f in s.files],
        },
        sources=table,
        warnings=notes.warnings(tokenizer),
    )


def _nonzero(tally: Tally) -> dict[str, int]:
    return {k: v for k, v in tally.drops.items() if v}


@dataclass
class Pass:
    """One pass over sources (train or eval)."""

    rows: int = 0  # records read
    tally: Tally = field(default_factory=Tally)
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (record position, reason)
    written: list[int] = field(default_factory=list)  # record position of each pair written
    spans: list[tuple[str, int, int, int | None]] = field(
        default_factory=list
    )  # name, rows, available


@dataclass
class Notes:
    """What the passes learn besides pairs: each file's shape, and plain-text prompts per source."""

    shapes: dict[str, str] = field(default_factory=dict)
    plain: dict[str, list[int]] = field(
        default_factory=dict
    )  # source -> [plain-text prompts, prompts]
    rows: set[str] = field(default_factory=set)  # sources of unpaired rows (a different fix)

    def warnings(self, tokenizer: Any) -> list[str]:
        if not getattr(tokenizer, "chat_template", None):
            return []
        pairs = (
            "set data.shape=conversational to apply it; a string prompt becomes one user message"
        )
        rows = "give the prompts as messages, [{role: user, content: ...}], to apply it"
        return [
            f"{name}: {raw} of {n} prompts are plain text: the tokenizer's chat template was not applied "
            f"({rows if name in self.rows else pairs})"
            for name, (raw, n) in self.plain.items()
            if raw
        ]
