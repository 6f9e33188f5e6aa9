"""Loading unpaired rows (KTO; the rows, labels and KL partners are defined in `preftune.data.unpaired`).

Called by `preftune.data.load` when the data is unpaired; the result has the pairs' layout, so every layout,
the precomputed reference and batching work unchanged. Each tokenized row:
``prompt_ids``, ``chosen_ids`` (the row's own completion), ``rejected_ids`` (the completion of its KL
partner, after the row's prompt), ``label`` (bool: desirable), ``weight``, ``index``.

Steps (all inside the cache entry's staging folder):

1. read: each kept record of each source becomes its row(s), validated; forged special tokens are counted
   drops, as for pairs. The rows are spilled to an Arrow file (prompt, completion and tools as JSON text),
   so that memory holds a prompt digest per row, not the texts.
2. split: ``eval_fraction`` sends records (both rows of an unpaired pair together) to eval with the same
   seeded draw as pairs; ``eval_files`` / ``eval_sources`` rows are eval rows.
3. partners: per split, `kl_partners` (seeded by ``train.seed``; eval separately).
4. tokenize: row i and its KL row as one pair, ``Rendered(prompt_i, completion_i, completion_j)`` through the
   pairs' `encode_pairs`: ``prompt_ids`` is the common prefix of both tokenizations within the prompt, so
   ``prompt_ids + chosen_ids`` is exactly the tokenization of prompt_i + completion_i and ``prompt_ids +
   rejected_ids`` of prompt_i + completion_j (a straddling token belongs to the completion). Messages: both
   conversations are rendered with the chat template (``prompt_i + completion_j`` as one conversation).
   Truncation as for pairs (`truncate_row`: prompt left by default, completions right); a row whose prompt
   fills ``max_length`` or whose completion has no tokens is a counted drop.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .cache import PairWriter
from .chat import forged_turn, render_chat
from .entry import Notes, Pass, eval_records, finish
from .errors import DataError, Drop, Location, missing_column_error
from .mix import Picker, Source
from .shapes import Rendered, detect_shape, parse_weight, special_token_pattern
from .sources import SourceFile, read_records, source_columns
from .tokenize import (
    UNPAIRED_TRUNCATED_FIELDS,
    Settings,
    Tally,
    bound_pair,
    encode_pairs,
    truncate_row,
)
from .unpaired import (
    Row,
    file_kind,
    kl_partners,
    parse_rows,
    prompt_key,
    unpaired_shape,
)

__all__ = ["build_unpaired", "data_kind", "source_kind"]

_CHUNK_ROWS = 512
_SPILL = pa.schema(
    [
        ("prompt", pa.large_string()),  # JSON
        ("completion", pa.large_string()),  # JSON
        ("tools", pa.large_string()),  # JSON or null
        ("label", pa.bool_()),
        ("weight", pa.float64()),
        ("loc", pa.string()),
        ("record", pa.int64()),
    ]
)
_SPLITS = ("train", "eval")


def source_kind(source: Source, unpair: bool) -> str:
    """``"unpaired"``, ``"unpair"`` (pairs to split into rows) or ``"pairs"``, from the first file with a
    record (its columns, or its first record)."""
    kind = "unpair" if unpair else "pairs"
    for src in source.files:
        columns = source_columns(src)
        first = None
        if columns is None:
            record = next(read_records(src), None)
            if record is None:
                continue
            first = record[0]
        return file_kind(source.shape, source.cols, first, columns, unpair)
    return kind


def data_kind(srcs: list[Source], unpair: bool, wanted: bool | None) -> bool:
    """Whether the data is unpaired rows, checked against what the loss trains on (``wanted``: True for
    unpaired rows, False for pairs, None for either)."""
    kinds = [(s, source_kind(s, unpair)) for s in srcs]
    rows = any(kind != "pairs" for _, kind in kinds)
    pairs = next((s for s, kind in kinds if kind == "pairs"), None)
    if wanted is True and pairs is not None:
        raise DataError(
            f"{pairs.name}: holds pairs (chosen / rejected), but the loss (kto) trains on unpaired rows "
            "(prompt, completion, label); set data.unpair=true to split each pair into a desirable "
            "and an undesirable row"
        )
    if wanted is False and rows:
        unpaired = next(s for s, kind in kinds if kind != "pairs")
        why = "data.unpair is true" if unpair else "it holds unpaired rows (completion, label)"
        raise DataError(
            f"{unpaired.name}: {why}, but the loss trains on pairs; use loss.name=kto for unpaired "
            "rows, or give pairs (prompt, chosen, rejected)"
        )
    return rows


@dataclass
class _Spill:
    """The rows read so far: texts on disk, a prompt digest, chat flag, pass and record position here."""

    writer: Any
    keys: list[bytes] = field(default_factory=list)
    chat: list[bool] = field(default_factory=list)
    role: list[int] = field(default_factory=list)  # 0: train pass, 1: eval pass
    record: list[int] = field(default_factory=list)
    cols: dict[str, list] = field(default_factory=lambda: {n: [] for n in _SPILL.names})

    def add(self, row: Row, weight: float, loc: str, record: int, role: int) -> None:
        self.keys.append(prompt_key(row))
        self.chat.append(row.chat)
        self.role.append(role)
        self.record.append(record)
        values = (
            json.dumps(row.prompt),
            json.dumps(row.completion),
            None if row.tools is None else json.dumps(row.tools),
            row.label,
            weight,
            loc,
            record,
        )
        for name, value in zip(_SPILL.names, values):
            self.cols[name].append(value)
        if len(self.cols["record"]) >= 1024:
            self.flush()

    def flush(self) -> None:
        if self.cols["record"]:
            self.writer.write_batch(pa.record_batch(self.cols, schema=_SPILL))
            self.cols = {n: [] for n in _SPILL.names}


def build_unpaired(
    tmp: Path,
    meta: dict,
    train_srcs: list[Source],
    eval_srcs: list[Source],
    fraction: float,
    seed: int,
    settings: Settings,
    tokenizer: Any,
    notes: Notes,
    unpair: bool,
) -> None:
    """Write ``train.arrow`` (and ``eval.arrow``) of unpaired rows into ``tmp`` and fill ``meta``."""
    spill_path = tmp / "rows.arrow"
    with pa.OSFile(str(spill_path), "wb") as sink, pa.ipc.new_file(sink, _SPILL) as writer:
        spill = _Spill(writer)
        train = _read(train_srcs, 0, spill, settings, tokenizer, seed, notes, unpair)
        evaluated = _read(eval_srcs, 1, spill, settings, tokenizer, seed, notes, unpair)
        spill.flush()
    eval_set: set[int] = set()
    split = np.asarray(spill.role, dtype=np.int64)
    if fraction > 0:
        eval_rows = eval_records(train.rows, fraction, seed)
        eval_set = set(eval_rows.tolist())
        split = np.isin(np.asarray(spill.record, dtype=np.int64), eval_rows).astype(np.int64)
    counts = [0, 0]
    with pa.memory_map(str(spill_path)) as mm:
        table = pa.ipc.open_file(mm).read_all()
        for s, name in enumerate(("train", "eval")):
            if s == 1 and not (fraction > 0 or eval_srcs):
                continue
            idx = np.flatnonzero(split == s)
            partner = _partners(idx, spill, s, seed, train_srcs if s == 0 else eval_srcs, name)
            writer = PairWriter(tmp / f"{name}.arrow", labels=True)
            for start in range(0, len(idx), _CHUNK_ROWS):
                chunk = idx[start : start + _CHUNK_ROWS]
                partners = partner[start : start + _CHUNK_ROWS]
                passes = (train, evaluated)
                _tokenize(table, chunk, partners, spill, passes, writer, settings, tokenizer)
            writer.close()
            counts[s] = writer.count
        del table
    os.remove(spill_path)
    srcs = (train_srcs, eval_srcs)
    n = (counts[0], counts[1])
    finish(tmp, meta, (train, evaluated), srcs, eval_set, fraction, n, notes, tokenizer, "rows")
    labels = {
        name: _labels(tmp / f"{name}.arrow") for name, n in zip(("train", "eval"), counts) if n
    }
    meta["unpaired"] = {"unpair": unpair, "labels": labels}


def _pass() -> Pass:
    return Pass(tally=Tally(truncations=dict.fromkeys(UNPAIRED_TRUNCATED_FIELDS, 0)))


def _labels(path: Path) -> dict[str, int]:
    """Desirable and undesirable rows of a written split."""
    import pyarrow.compute as pc

    good = total = 0
    with pa.memory_map(str(path)) as mm:
        for batch in pa.ipc.open_stream(mm):
            good += int(pc.sum(batch.column("label")).as_py() or 0)
            total += batch.num_rows
    return {"desirable": good, "undesirable": total - good}


def _read(
    srcs: list[Source],
    role: int,
    spill: _Spill,
    settings: Settings,
    tokenizer: Any,
    seed: int,
    notes: Notes,
    unpair: bool,
) -> Pass:
    state = _pass()
    specials = special_token_pattern(tokenizer)
    for source in srcs:
        available, positions = source.positions(seed)
        pick, start = Picker(positions), state.rows
        for src in source.files:
            for rows, weight, loc in _file_rows(src, source, notes, pick, unpair, specials):
                record, state.rows = state.rows, state.rows + 1
                if isinstance(rows, Drop):
                    state.tally.drop(rows.reason, loc, settings.on_drop, rows.detail)
                    state.dropped.append((record, rows.reason))
                    continue
                for row in rows:
                    forged = None
                    if row.chat:
                        tools = (source.cols.tools or "tools", row.tools) if row.tools else None
                        forged = forged_turn(specials, row.fields, tools)
                    if forged is not None:
                        state.tally.drop(forged.reason, loc, settings.on_drop, forged.detail)
                        state.dropped.append((record, forged.reason))
                    else:
                        spill.add(row, weight, str(loc), record, role)
        state.spans.append((source.name, start, state.rows, available))
    return state


def _file_rows(
    src: SourceFile, source: Source, notes: Notes, pick: Picker, unpair: bool, specials: Any
) -> Iterator[tuple[list[Row] | Drop, float, Location]]:
    """``(rows | Drop, weight, location)`` for each kept record of one file."""
    cols = source.cols
    columns = source_columns(src)
    wanted = [cols.prompt, cols.completion, cols.label, cols.chosen, cols.rejected]
    records = read_records(
        src, [*wanted, *([cols.weight] if cols.weight else []), *cols.optional()]
    )
    first = next(records, None)
    if first is None:
        empty = os.path.isfile(src.path) and os.path.getsize(src.path) == 0
        raise DataError(
            f"{src.name}: {'the file is empty' if empty else 'no records in this file'}; "
            "expected unpaired rows (prompt, completion, label) or pairs"
        )
    kind = file_kind(source.shape, cols, first[0], columns, unpair)
    if kind == "pairs":
        raise DataError(
            f"{src.name}: holds pairs ({cols.chosen!r} / {cols.rejected!r}), but the data is unpaired "
            f"rows (prompt, {cols.completion!r}, {cols.label!r}); set data.unpair=true to split each "
            "pair into a desirable and an undesirable row"
        )
    if kind == "unpaired":
        shape = unpaired_shape(cols, first[0], columns, src.name)
        notes.shapes[src.name] = f"unpaired {shape}"
        notes.rows.add(source.name)
    else:
        forced = source.shape if source.shape != "unpaired" else "auto"
        shape = detect_shape(forced, cols, first[0], columns, src.name)
        notes.shapes[src.name] = f"{shape} pairs, unpaired"
    if cols.weight and columns is not None and cols.weight not in columns:
        raise missing_column_error(src.name, cols.weight, columns)
    plain = notes.plain.setdefault(source.name, [0, 0])
    weight_seen = kept = False
    for record, loc in itertools.chain([first], records):
        if not pick():
            continue
        kept = True
        rows = parse_rows(record, kind, shape, cols, loc)
        weight = 1.0
        if cols.weight:
            weight_seen = weight_seen or cols.weight in record
            weight = parse_weight(record.get(cols.weight), loc, cols.weight)
        if kind == "unpair" and rows[0].completion == rows[1].completion:
            yield Drop("chosen_equals_rejected", "both responses are the same"), weight, loc
            continue
        if not rows[0].chat:
            plain[1] += 1
            if specials is None or not specials.search(rows[0].prompt):
                plain[0] += 1
        yield rows, weight, loc
    if cols.weight and not weight_seen and kept:
        raise missing_column_error(f"{src.name} (in every record)", cols.weight, first[0].keys())


def _partners(idx: np.ndarray, spill: _Spill, split: int, seed: int, srcs, name: str) -> np.ndarray:
    """Spill positions of the KL partners of the rows ``idx`` of one split."""
    if len(idx) == 0:
        return idx
    files = ", ".join(f.name for s in srcs for f in s.files) or "the training files"
    chat = {spill.chat[i] for i in idx}
    if len(chat) > 1:
        raise DataError(
            f"{files}: the {name} rows mix plain-text and message (chat template) prompts; a KL row "
            "puts one row's completion after another row's prompt, so give every source the same "
            "shape (strings, or messages)"
        )
    keys = [spill.keys[i] for i in idx]
    try:
        return idx[kl_partners(keys, seed, split)]
    except ValueError:
        raise DataError(
            f"{files}: all {len(idx)} {name} rows have the same prompt; KTO's KL rows pair a prompt "
            "with the completion of a row with another prompt, so at least 2 distinct prompts are "
            f"needed in the {name} split"
        ) from None


def _tokenize(
    table: pa.Table,
    chunk: np.ndarray,
    partner: np.ndarray,
    spill: _Spill,
    passes: tuple[Pass, Pass],
    writer: PairWriter,
    settings: Settings,
    tokenizer: Any,
) -> None:
    own = table.take(pa.array(chunk)).to_pylist()
    kl = table.column("completion").take(pa.array(partner)).to_pylist()
    rendered = []
    for row, kl_json in zip(own, kl):
        prompt, completion = json.loads(row["prompt"]), json.loads(row["completion"])
        kl_completion = json.loads(kl_json)
        if isinstance(prompt, str):
            rendered.append(Rendered(prompt, completion, kl_completion, chat=False))
            continue
        tools = None if row["tools"] is None else json.loads(row["tools"])
        texts = render_chat(tokenizer, prompt, completion, kl_completion, row["loc"], tools)
        rendered.append(Rendered(*texts, chat=True))
    bounded = [bound_pair(tokenizer, r, settings) for r in rendered]
    encoded = encode_pairs(tokenizer, bounded, add_eos=settings.add_eos)
    bos = tokenizer.bos_token_id
    for i, row, ids in zip(chunk, own, encoded):
        state = passes[spill.role[i]]
        out = truncate_row(*ids, settings, state.tally.truncations, bos)
        if isinstance(out, Drop):
            state.tally.drop(out.reason, row["loc"], settings.on_drop, out.detail)
            state.dropped.append((row["record"], out.reason))
            continue
        writer.add(*out, row["weight"], label=row["label"])
        state.written.append(row["record"])
