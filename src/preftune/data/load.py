"""`load_preference_data`: files -> validated, tokenized, cached train/eval splits.

Pipeline: resolve files -> cache key -> (hit) open the cached Arrow files, or (miss) stream records, render
(shapes.py), cut over-long texts to what truncation can keep, tokenize exactly and truncate (tokenize.py) in
chunks, write Arrow, split, commit the entry.

Whole-input errors (`DataError`): a file with no records ("is empty"), and training pairs whose weights are
all 0 (nothing to learn).

Eval split by ``eval_fraction``: ``round(fraction * rows_read)`` records (at least 1) of the training files, by
a permutation seeded with ``seed``, go to eval. The split is made on the records as READ (before drops), so
which pair lands in eval depends only on the files and the seed, not on tokenization settings; drops are then
counted per split. Both splits keep file order (shuffling is `batch_indices`' job). ``eval_files`` and
``eval_fraction > 0`` are exclusive.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cache import (
    PairWriter,
    cache_key,
    cache_root,
    committed_entry,
    read_entry,
    source_digest,
    split_rows,
    tokenizer_fingerprint,
)
from .errors import DataError, Drop, Location, missing_column_error
from .shapes import (
    Columns,
    Rendered,
    detect_shape,
    parse_weight,
    render_pair,
    special_token_pattern,
)
from .sources import SourceFile, read_records, resolve_files, source_columns
from .tokenize import (
    DROP_REASONS,
    Settings,
    Tally,
    bound_pair,
    check_tokenizer,
    encode_pairs,
    truncate_pair,
)

__all__ = ["PreferenceData", "load_preference_data"]

log = logging.getLogger("preftune.data")
_CHUNK_PAIRS = 512  # pairs per batched tokenizer call


@dataclass
class PreferenceData:
    """Tokenized splits. Rows: prompt_ids, chosen_ids, rejected_ids (list[int]), weight (float32), index (int64)."""

    train: Any  # datasets.Dataset
    eval: Any | None  # datasets.Dataset | None
    drops: dict[str, int]  # reason -> count, both splits together
    rows_read: int  # records read from all files (train + eval), dropped ones included
    fingerprint: str  # the cache key: equal fingerprints mean identical tokenized data
    drops_by_split: dict[str, dict[str, int]] = field(default_factory=dict)
    # field (prompt/chosen/rejected) -> pairs truncated, both splits
    truncations: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, str] = field(default_factory=dict)  # file -> detected shape
    cache_path: str = ""
    cache_hit: bool = False

    def summary(self) -> str:
        dropped = {k: v for k, v in self.drops.items() if v}
        cut = {k: v for k, v in self.truncations.items() if v}
        n_eval = len(self.eval) if self.eval is not None else 0
        return (
            f"{self.rows_read} records read -> {len(self.train)} train / {n_eval} eval pairs; "
            f"dropped {sum(dropped.values())} {dropped or ''}; truncated {cut or 'none'}; "
            f"cache {'hit' if self.cache_hit else 'written'}: {self.cache_path}"
        )


def load_preference_data(cfg: Any, tokenizer: Any, *, seed: int = 0) -> PreferenceData:
    """Load, validate, tokenize and cache preference data described by a DataConfig-like ``cfg``."""
    settings = Settings.from_config(cfg)
    check_tokenizer(tokenizer, settings)
    cols = Columns.from_config(cfg)
    fmt, shape = getattr(cfg, "format", "auto"), getattr(cfg, "shape", "auto")
    fraction = float(getattr(cfg, "eval_fraction", 0.0) or 0.0)
    eval_files = list(getattr(cfg, "eval_files", None) or [])
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {fraction}")
    if fraction > 0 and eval_files:
        raise DataError("set data.eval_files or data.eval_fraction, not both")
    train_srcs = resolve_files(getattr(cfg, "train_files", []), fmt, role="train")
    eval_srcs = resolve_files(eval_files, fmt, role="eval") if eval_files else []

    root = cache_root(getattr(cfg, "cache_dir", None))
    key = cache_key(
        {
            "train": [source_digest(s, root) for s in train_srcs],
            "eval": [source_digest(s, root) for s in eval_srcs],
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "shape": shape,
            "columns": cols.__dict__,
            "settings": {k: v for k, v in settings.__dict__.items() if k != "on_drop"},
            "eval_fraction": fraction,
            "seed": seed if fraction > 0 else None,
        }
    )
    meta = read_entry(root, key)
    hit = meta is not None
    if meta is None:
        with committed_entry(root, key) as (tmp, meta):
            _build(
                tmp, meta, train_srcs, eval_srcs, fraction, seed, cols, shape, settings, tokenizer
            )
        meta = read_entry(root, key)
        if meta is None:  # pragma: no cover - the commit above guarantees an entry
            raise DataError(f"could not write the data cache under {root}")
    elif settings.on_drop == "error" and any(meta["drops"].values()):
        reason = next(k for k, v in meta["drops"].items() if v)
        raise DataError(
            f"{meta['first_drop'].get(reason, 'data')}: pair dropped ({reason}); data.on_drop is 'error' "
            f"({meta['drops'][reason]} such pairs). Fix the records or set data.on_drop to 'count'"
        )
    data = _open(meta, key, hit)
    log.info("preference data: %s", data.summary())
    return data


def _open(meta: dict, key: str, hit: bool) -> PreferenceData:
    import datasets

    entry = Path(meta["path"])
    train = datasets.Dataset.from_file(str(entry / "train.arrow"))
    eval_ = datasets.Dataset.from_file(str(entry / "eval.arrow")) if meta["has_eval"] else None
    return PreferenceData(
        train=train,
        eval=eval_,
        drops=dict(meta["drops"]),
        rows_read=int(meta["rows_read"]),
        fingerprint=key,
        drops_by_split={k: dict(v) for k, v in meta["drops_by_split"].items()},
        truncations=dict(meta["truncations"]),
        shapes=dict(meta["shapes"]),
        cache_path=str(entry),
        cache_hit=hit,
    )


def _build(
    tmp: Path,
    meta: dict,
    train_srcs: list[SourceFile],
    eval_srcs: list[SourceFile],
    fraction: float,
    seed: int,
    cols: Columns,
    shape: str,
    settings: Settings,
    tokenizer: Any,
) -> None:
    shapes: dict[str, str] = {}
    writer = PairWriter(
        tmp / ("all.arrow" if fraction > 0 else "train.arrow"), with_row=fraction > 0
    )
    train = _tokenize_sources(train_srcs, writer, cols, shape, settings, tokenizer, shapes)
    writer.close()
    rows_read, n_train, n_eval = train.rows, writer.count, 0
    total = Tally()
    total.add(train.tally)
    by_split = {"train": train.tally.drops}
    if fraction > 0:
        if rows_read < 2:
            raise DataError(f"data.eval_fraction needs at least 2 records, read {rows_read}")
        n_eval_rows = min(max(1, round(fraction * rows_read)), rows_read - 1)
        eval_rows = np.sort(np.random.default_rng(seed).permutation(rows_read)[:n_eval_rows])
        n_train, n_eval = split_rows(
            tmp / "all.arrow", tmp / "train.arrow", tmp / "eval.arrow", eval_rows
        )
        os.remove(tmp / "all.arrow")
        eval_set = set(eval_rows.tolist())
        by_split = {"train": dict.fromkeys(DROP_REASONS, 0), "eval": dict.fromkeys(DROP_REASONS, 0)}
        for row, reason in train.dropped:
            by_split["eval" if row in eval_set else "train"][reason] += 1
    elif eval_srcs:
        eval_writer = PairWriter(tmp / "eval.arrow")
        evaluated = _tokenize_sources(
            eval_srcs, eval_writer, cols, shape, settings, tokenizer, shapes
        )
        eval_writer.close()
        rows_read, n_eval = rows_read + evaluated.rows, eval_writer.count
        total.add(evaluated.tally)
        by_split["eval"] = evaluated.tally.drops
    if n_train == 0:
        raise DataError(
            f"no training pairs left: {rows_read} records read, drops {_nonzero(total)}"
        )
    if cols.weight and _max_weight(tmp / "train.arrow") <= 0:
        files = ", ".join(s.path for s in train_srcs)
        raise DataError(
            f"{files}: every training pair has weight 0 (field {cols.weight!r}): nothing to learn; "
            "expected at least one weight > 0"
        )
    if (fraction > 0 or eval_srcs) and n_eval == 0:
        raise DataError(f"no eval pairs left: {rows_read} records read, drops {_nonzero(total)}")
    meta.update(
        has_eval=n_eval > 0,
        n_train=n_train,
        n_eval=n_eval,
        rows_read=rows_read,
        drops=total.drops,
        drops_by_split=by_split,
        truncations=total.truncations,
        first_drop=total.first_drop,
        shapes=shapes,
        files={"train": [s.path for s in train_srcs], "eval": [s.path for s in eval_srcs]},
    )


def _max_weight(path: Path) -> float:
    import pyarrow as pa
    import pyarrow.compute as pc

    best = 0.0
    with pa.memory_map(str(path)) as mm:
        for batch in pa.ipc.open_stream(mm):
            top = pc.max(batch.column("weight")).as_py()
            best = max(best, top or 0.0)
    return best


def _nonzero(tally: Tally) -> dict[str, int]:
    return {k: v for k, v in tally.drops.items() if v}


@dataclass
class _Pass:
    rows: int = 0
    tally: Tally = field(default_factory=Tally)
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (record position, reason)


def _tokenize_sources(
    srcs: list[SourceFile],
    writer: PairWriter,
    cols: Columns,
    shape: str,
    settings: Settings,
    tokenizer: Any,
    shapes: dict[str, str],
) -> _Pass:
    state = _Pass()
    pending: list[tuple[Rendered, float, Location, int]] = []
    for src in srcs:
        for rendered, weight, loc in _rendered_records(src, cols, shape, tokenizer, shapes):
            row, state.rows = state.rows, state.rows + 1
            if isinstance(rendered, Drop):
                _drop(state, row, rendered.reason, loc, settings, rendered.detail)
                continue
            if rendered.chosen == rendered.rejected:
                _drop(state, row, "chosen_equals_rejected", loc, settings)
                continue
            pending.append((rendered, weight, loc, row))
            if len(pending) >= _CHUNK_PAIRS:
                _flush(pending, writer, state, settings, tokenizer)
    _flush(pending, writer, state, settings, tokenizer)
    return state


def _drop(
    state: _Pass, row: int, reason: str, loc: Location, settings: Settings, detail: str = ""
) -> None:
    state.tally.drop(reason, loc, settings.on_drop, detail)
    state.dropped.append((row, reason))


def _flush(
    pending: list, writer: PairWriter, state: _Pass, settings: Settings, tokenizer: Any
) -> None:
    if not pending:
        return
    # Over-long texts are cut first, so that a huge record costs no more than max_length allows.
    bounded = [bound_pair(tokenizer, p[0], settings) for p in pending]
    encoded = encode_pairs(tokenizer, bounded, add_eos=settings.add_eos)
    bos = tokenizer.bos_token_id
    for (_, weight, loc, row), (prompt, chosen, rejected) in zip(pending, encoded):
        pair = truncate_pair(prompt, chosen, rejected, settings, state.tally.truncations, bos)
        if isinstance(pair, Drop):
            _drop(state, row, pair.reason, loc, settings, pair.detail)
        else:
            writer.add(*pair, weight, row)
    pending.clear()


def _rendered_records(
    src: SourceFile, cols: Columns, shape: str, tokenizer: Any, shapes: dict[str, str]
) -> Iterator[tuple[Rendered | Drop, float, Location]]:
    columns = source_columns(src)
    records = read_records(src, cols.needed())
    first = next(records, None)
    file_shape = detect_shape(shape, cols, first[0] if first else None, columns, src.path)
    shapes[src.path] = file_shape
    if first is None:
        empty = os.path.isfile(src.path) and os.path.getsize(src.path) == 0
        raise DataError(
            f"{src.path}: {'the file is empty' if empty else 'no records in this file'}; "
            "expected preference records"
        )
    if cols.weight and columns is not None and cols.weight not in columns:
        raise missing_column_error(src.path, cols.weight, columns)
    specials: re.Pattern[str] | None = None
    if file_shape != "standard":
        specials = special_token_pattern(tokenizer)
    weight_seen = False
    for record, loc in itertools.chain([first], records):
        rendered = render_pair(record, file_shape, cols, loc, tokenizer, specials)
        weight = 1.0
        if cols.weight:
            weight_seen = weight_seen or cols.weight in record
            weight = parse_weight(record.get(cols.weight), loc, cols.weight)
        yield rendered, weight, loc
    if cols.weight and not weight_seen:
        raise missing_column_error(f"{src.path} (in every record)", cols.weight, first[0].keys())
