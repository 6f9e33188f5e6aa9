"""`load_preference_data`: sources -> validated, tokenized, cached train/eval splits.

Pipeline: resolve the sources and their files (mix.py) -> cache key -> (hit) open the cached Arrow files, or
(miss) stream each source's kept records, render (shapes.py), cut over-long texts to what truncation can keep,
tokenize exactly and truncate (tokenize.py) in chunks, write Arrow, split, commit the entry. Rows per source
(records, kept by the mixture, pairs per split, drops) and warnings (plain-text prompts for a tokenizer with a
chat template: the template was not applied) are stored with the entry.

Whole-input errors (`DataError`): a file with no records ("is empty"), and training pairs whose weights are
all 0 (nothing to learn).

Eval split by ``eval_fraction``: ``round(fraction * rows_read)`` records (at least 1) of the training records
(after the mixture's sampling), by
a permutation seeded with ``seed``, go to eval. The split is made on the records as READ (before drops), so
which pair lands in eval depends only on the files and the seed, not on tokenization settings; drops are then
counted per split. Both splits keep file order (shuffling is `batch_indices`' job). ``eval_files`` /
``eval_sources`` and ``eval_fraction > 0`` are exclusive.

Unpaired rows (KTO: ``data.shape: unpaired``, detected, or ``data.unpair``) are built by
`preftune.data.unpaired_load` in the same entry format (a ``label`` column more; the KL row as the rejected
response); their key also holds ``data.unpair`` and the KL partners' seed.
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

from .cache import (
    PairWriter,
    cache_key,
    cache_root,
    committed_entry,
    read_entry,
    split_rows,
    tokenizer_fingerprint,
)
from .entry import Notes, Pass, eval_records, finish
from .errors import DataError, Drop, Location, missing_column_error
from .mix import Picker, Source, plan_sources
from .shapes import (
    Rendered,
    detect_shape,
    parse_weight,
    render_pair,
    special_token_pattern,
)
from .sources import SourceFile, read_records, source_columns
from .tokenize import (
    Settings,
    bound_pair,
    check_tokenizer,
    encode_pairs,
    truncate_pair,
)
from .unpaired_load import build_unpaired, data_kind

__all__ = ["PreferenceData", "load_preference_data"]

log = logging.getLogger("preftune.data")
_CHUNK_PAIRS = 512  # pairs per batched tokenizer call


@dataclass
class PreferenceData:
    """Tokenized splits. Rows: prompt_ids, chosen_ids, rejected_ids (list[int]), weight (float32), index (int64);
    unpaired rows (``unpaired``) also a ``label`` (bool), chosen = the completion, rejected = the KL row's."""

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
    # per source: name, role, records (None: not counted, all kept), selected, train, eval, dropped
    sources: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unpaired: bool = False  # rows of (prompt, completion, label) with KL rows, for KTO
    # unpaired rows: split -> {"desirable": n, "undesirable": n}
    labels: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        dropped = {k: v for k, v in self.drops.items() if v}
        cut = {k: v for k, v in self.truncations.items() if v}
        n_eval = len(self.eval) if self.eval is not None else 0
        mixed = len(self.sources) > 1 or any(x["selected"] != x["records"] for x in self.sources)
        per_source = "; sources " + ", ".join(
            f"{x['name']} {x['selected']}/{x['records']}" for x in self.sources
        )
        what = "pairs"
        if self.unpaired:
            counts = self.labels.get("train", {})
            what = (
                f"unpaired rows ({counts.get('desirable', 0)} desirable, "
                f"{counts.get('undesirable', 0)} undesirable in train)"
            )
        return (
            f"{self.rows_read} records read -> {len(self.train)} train / {n_eval} eval {what}; "
            f"dropped {sum(dropped.values())} {dropped or ''}; truncated {cut or 'none'}"
            f"{per_source if mixed else ''}; "
            f"cache {'hit' if self.cache_hit else 'written'}: {self.cache_path}"
        )


def load_preference_data(
    cfg: Any,
    tokenizer: Any,
    *,
    seed: int = 0,
    warn: bool = True,
    unpaired: bool | None = None,
) -> PreferenceData:
    """Load, validate, tokenize and cache preference data described by a DataConfig-like ``cfg``.

    ``seed`` draws the mixture's samples, the ``eval_fraction`` split and unpaired rows' KL partners;
    ``warn=False`` leaves the warnings in ``PreferenceData.warnings`` unlogged (for a caller that reports
    them itself). ``unpaired``: what the loss trains on, unpaired rows (True: KTO) or pairs (False); a
    `DataError` when the data is the other kind. None: whatever the data is (``data.shape: unpaired``,
    ``data.unpair``, or detected: see `preftune.data.unpaired`)."""
    settings = Settings.from_config(cfg)
    check_tokenizer(tokenizer, settings)
    fraction = float(getattr(cfg, "eval_fraction", 0.0) or 0.0)
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {fraction}")
    train_srcs = plan_sources(cfg, "train")
    eval_srcs = plan_sources(cfg, "eval")
    if fraction > 0 and eval_srcs:
        raise DataError("set data.eval_files / data.eval_sources or data.eval_fraction, not both")

    unpair = bool(getattr(cfg, "unpair", False))
    rows = data_kind(train_srcs + eval_srcs, unpair, unpaired)
    root = cache_root(getattr(cfg, "cache_dir", None))
    parts = {
        "train": [s.key(root, seed) for s in train_srcs],
        "eval": [s.key(root, seed) for s in eval_srcs],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": {k: v for k, v in settings.__dict__.items() if k != "on_drop"},
        "eval_fraction": fraction,
        "seed": seed if fraction > 0 else None,
    }
    if rows:  # how pairs become rows, and the KL partners' seed, decide the content too
        parts["unpaired"] = {"unpair": unpair, "partner_seed": seed}
    key = cache_key(parts)
    meta = read_entry(root, key)
    hit = meta is not None
    if meta is None:
        with committed_entry(root, key) as (tmp, meta):
            if rows:
                build_unpaired(
                    tmp,
                    meta,
                    train_srcs,
                    eval_srcs,
                    fraction,
                    seed,
                    settings,
                    tokenizer,
                    Notes(),
                    unpair,
                )
            else:
                _build(tmp, meta, train_srcs, eval_srcs, fraction, seed, settings, tokenizer)
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
    for line in data.warnings if warn else ():
        log.warning("%s", line)
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
        sources=[dict(x) for x in meta.get("sources", [])],
        warnings=list(meta.get("warnings", [])),
        unpaired="unpaired" in meta,
        labels={k: dict(v) for k, v in meta.get("unpaired", {}).get("labels", {}).items()},
    )


def _build(
    tmp: Path,
    meta: dict,
    train_srcs: list[Source],
    eval_srcs: list[Source],
    fraction: float,
    seed: int,
    settings: Settings,
    tokenizer: Any,
) -> None:
    notes = Notes()
    writer = PairWriter(
        tmp / ("all.arrow" if fraction > 0 else "train.arrow"), with_row=fraction > 0
    )
    train = _tokenize_sources(train_srcs, writer, settings, tokenizer, seed, notes)
    writer.close()
    n_train, n_eval = writer.count, 0
    eval_set: set[int] = set()
    evaluated = Pass()
    if fraction > 0:
        eval_rows = eval_records(train.rows, fraction, seed)
        n_train, n_eval = split_rows(
            tmp / "all.arrow", tmp / "train.arrow", tmp / "eval.arrow", eval_rows
        )
        os.remove(tmp / "all.arrow")
        eval_set = set(eval_rows.tolist())
    elif eval_srcs:
        eval_writer = PairWriter(tmp / "eval.arrow")
        evaluated = _tokenize_sources(eval_srcs, eval_writer, settings, tokenizer, seed, notes)
        eval_writer.close()
        n_eval = eval_writer.count
    srcs, counts = (train_srcs, eval_srcs), (n_train, n_eval)
    finish(tmp, meta, (train, evaluated), srcs, eval_set, fraction, counts, notes, tokenizer)


def _tokenize_sources(
    srcs: list[Source],
    writer: PairWriter,
    settings: Settings,
    tokenizer: Any,
    seed: int,
    notes: Notes,
) -> Pass:
    state = Pass()
    pending: list[tuple[Rendered, float, Location, int]] = []
    for source in srcs:
        available, positions = source.positions(seed)
        pick, start = Picker(positions), state.rows
        for src in source.files:
            records = _rendered_records(src, source, tokenizer, notes, pick)
            for rendered, weight, loc in records:
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
        state.spans.append((source.name, start, state.rows, available))
    _flush(pending, writer, state, settings, tokenizer)
    return state


def _drop(
    state: Pass, row: int, reason: str, loc: Location, settings: Settings, detail: str = ""
) -> None:
    state.tally.drop(reason, loc, settings.on_drop, detail)
    state.dropped.append((row, reason))


def _flush(
    pending: list, writer: PairWriter, state: Pass, settings: Settings, tokenizer: Any
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
            state.written.append(row)
    pending.clear()


def _rendered_records(
    src: SourceFile, source: Source, tokenizer: Any, notes: Notes, pick: Picker
) -> Iterator[tuple[Rendered | Drop, float, Location]]:
    """The kept records of one file, rendered (``pick`` says which; shape detected from its first)."""
    cols = source.cols
    columns = source_columns(src)
    records = read_records(src, [*cols.needed(), *cols.optional()])
    first = next(records, None)
    file_shape = detect_shape(source.shape, cols, first[0] if first else None, columns, src.name)
    notes.shapes[src.name] = file_shape
    if first is None:
        empty = os.path.isfile(src.path) and os.path.getsize(src.path) == 0
        raise DataError(
            f"{src.name}: {'the file is empty' if empty else 'no records in this file'}; "
            "expected preference records"
        )
    if cols.weight and columns is not None and cols.weight not in columns:
        raise missing_column_error(src.name, cols.weight, columns)
    specials: re.Pattern[str] | None = special_token_pattern(tokenizer)
    plain = notes.plain.setdefault(source.name, [0, 0])
    weight_seen = kept = False
    for record, loc in itertools.chain([first], records):
        if not pick():
            continue
        kept = True
        rendered = render_pair(record, file_shape, cols, loc, tokenizer, specials)
        if isinstance(rendered, Rendered) and not rendered.chat:
            plain[1] += 1
            if specials is None or not specials.search(rendered.prompt):
                plain[0] += 1  # no chat markup at all: not a pre-rendered chat prompt
        weight = 1.0
        if cols.weight:
            weight_seen = weight_seen or cols.weight in record
            weight = parse_weight(record.get(cols.weight), loc, cols.weight)
        yield rendered, weight, loc
    if cols.weight and not weight_seen and kept:
        raise missing_column_error(f"{src.name} (in every record)", cols.weight, first[0].keys())
