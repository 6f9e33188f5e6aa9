"""Unpaired rows for KTO (Ethayarajh et al. 2024, arXiv 2402.01306): (prompt, completion, label) records,
their labels, pairs split into rows, and each row's KL partner.

Rows. A record holds a prompt, a completion and a label (columns ``data.prompt_column``,
``data.completion_column``, ``data.label_column``). Selected by ``data.shape: unpaired``, or detected under
``auto`` when a file has the completion and label columns and neither chosen nor rejected. Strings or
messages, decided per file from its first record as for pairs (`preftune.data.shapes`):

- ``standard``: prompt and completion are strings; the text is ``prompt + completion`` as written.
- ``conversational`` (the prompt or the completion is a list / a message): the prompt is a list of messages
  (multi-turn: earlier turns are prompt) or a string (one user message); the completion is the assistant
  turn(s): a list of assistant messages, one message, or a string. Or the completion is a whole
  conversation (it starts before the assistant speaks): the prompt is everything before its trailing
  assistant messages, and a prompt column beside it must agree. Rendered with the chat template exactly as
  pairs are (system and tools columns included).
- ``implicit`` (no prompt column): the completion is a whole conversation, split as above.

Labels (case-insensitive, surrounding spaces ignored): true/false booleans, 1/0 (numbers or text),
"true"/"false", "desirable"/"undesirable", "good"/"bad", "thumbs_up"/"thumbs_down" ("thumbs-up" and
"thumbs up" too). Anything else, a missing label included, is a `DataError` naming file, line and field.

``data.unpair: true`` splits each pair (any pair shape) into a desirable row (prompt, chosen) and an
undesirable row (prompt, rejected), as TRL's ``unpair_preference_dataset`` does; a pair whose chosen equals
its rejected is dropped (``chosen_equals_rejected``: its two rows would contradict each other).

KL partners. KTO's reference point z₀ is estimated from mismatched (prompt, completion) pairs: row i's KL row
is its prompt followed by the completion of another row whose prompt differs. The rule, per split (the eval
split gets its partners within the eval split): draw a permutation of the split's rows from
``numpy.random.default_rng([train.seed, 0x4B4C, split])`` (split 0 train, 1 eval); in that cyclic order, row
i takes the next row whose prompt differs (the rule of `preftune.losses.unpaired.mismatched_indices`, here in
O(n)). So a row is never its own partner, a partner's prompt always differs, and the partners depend only
on the rows, the split and the seed (not on tokenization settings). Prompts are compared as parsed (the
string, or the messages with the system message and tools); a split whose rows all share one prompt
cannot give KL rows and is a `DataError`. Rows refused while reading (bad turns, forged special tokens) take
no part; a row dropped later by truncation still lends its completion to its partner's KL row.

The partner is fixed per dataset row for the whole run. The KTO paper (and TRL) pair rows within each
micro-batch, so a row's KL partner changes with the batch order; fixing it at dataset level instead makes
every KL row an ordinary tokenized row of the cache (its prompt shared with the row's own completion, exactly
as a pair's rejected response), so the precomputed reference holds its log-probs exactly, and it changes
nothing in expectation: either way each KL row is a prompt with the completion of a uniformly random other
row, and z₀ (the mean over the step's KL rows, `preftune.objective.KTOObjective`) estimates the same KL.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .chat import (
    check_prompt_column,
    check_prompt_end,
    messages,
    response,
    show,
)
from .errors import DataError, Location, missing_column_error
from .shapes import SHAPES, Columns, Parsed, _no_chat_columns, _string, _with_columns, parse_pair

__all__ = [
    "LABEL_FORMS",
    "Row",
    "file_kind",
    "kl_partners",
    "parse_label",
    "parse_rows",
    "prompt_key",
    "unpaired_shape",
]

_TRUE = ("true", "1", "desirable", "good", "thumbs_up")
_FALSE = ("false", "0", "undesirable", "bad", "thumbs_down")
LABEL_FORMS = "true/false, 1/0, desirable/undesirable, good/bad, thumbs_up/thumbs_down"
_PARTNER_STREAM = 0x4B4C  # "KL": the partners' own random stream of train.seed


@dataclass(frozen=True)
class Row:
    """One unpaired row, validated: prompt and completion as strings, or messages (``chat``)."""

    prompt: str | list[dict]
    completion: str | list[dict]
    label: bool
    tools: list[dict] | None = None
    fields: tuple[tuple[str, list[dict]], ...] = ()  # message lists as the record names them

    @property
    def chat(self) -> bool:
        return not isinstance(self.prompt, str)


def parse_label(value: Any, loc: Location | str, field: str) -> bool:
    """True for a desirable row, False for an undesirable one (accepted forms: the module docstring)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower().replace("-", "_").replace(" ", "_")
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    got = "nothing (the label is missing)" if value is None else show(value)
    raise DataError(f"{loc}: field {field!r} must be a label ({LABEL_FORMS}), got {got}")


def file_kind(
    forced: str, cols: Columns, first: dict | None, columns: Sequence[str] | None, unpair: bool
) -> str:
    """``"unpaired"`` when a file's records are unpaired rows (forced, or detected), else ``"pairs"``;
    with ``unpair`` a pair file gives rows too (``"unpair"``)."""
    if forced == "unpaired":
        return "unpaired"
    keys = list(columns) if columns is not None else list(first or {})
    rows = (
        cols.completion in keys
        and cols.label in keys
        and cols.chosen not in keys
        and cols.rejected not in keys
    )
    if forced == "auto" and rows:
        return "unpaired"
    return "unpair" if unpair else "pairs"


def unpaired_shape(
    cols: Columns, first: dict | None, columns: Sequence[str] | None, where: Location | str
) -> str:
    """The shape of a file of unpaired rows: implicit without a prompt column, conversational when the
    prompt or the completion of its first record is a list or a message, else standard."""
    keys = list(columns) if columns is not None else list(first or {})
    if first is None and columns is None:
        return "standard"
    for name in (cols.completion, cols.label):
        if name not in keys:
            raise missing_column_error(where, name, keys)
    if cols.prompt not in keys:
        return "implicit"
    values = (first.get(cols.prompt), first.get(cols.completion)) if first is not None else ()
    return (
        "conversational" if any(isinstance(v, (list, tuple, dict)) for v in values) else "standard"
    )


def parse_rows(record: dict, kind: str, shape: str, cols: Columns, loc: Location) -> list[Row]:
    """The rows of one record: one for an unpaired record, two (desirable, undesirable) for a pair of a
    file being unpaired (``kind="unpair"``; ``shape`` is then a pair shape)."""
    if kind == "unpair":
        parsed = parse_pair(record, shape, cols, loc)
        fields = dict(parsed.fields)
        return [
            Row(
                parsed.prompt, parsed.chosen, True, parsed.tools, _fields(fields, cols, cols.chosen)
            ),
            Row(
                parsed.prompt,
                parsed.rejected,
                False,
                parsed.tools,
                _fields(fields, cols, cols.rejected),
            ),
        ]
    label = parse_label(record.get(cols.label), loc, cols.label)
    if shape == "standard":
        _no_chat_columns(record, cols, loc)
        prompt = _string(record, cols.prompt, loc, allow_empty=True)
        return [Row(prompt, _string(record, cols.completion, loc), label)]
    if shape in ("conversational", "implicit"):
        completion = _get(record, cols.completion, loc)
        if _whole(completion):
            conversation = messages(completion, cols.completion, loc)
            k = len(conversation)
            while k > 0 and conversation[k - 1]["role"] == "assistant":
                k -= 1
            if k == 0 or k == len(conversation):
                raise DataError(
                    f"{loc}: field {cols.completion!r} must end with the assistant's turn (the "
                    "completion) after the prompt's turns"
                )
            prompt, msgs = conversation[:k], conversation[k:]
            check_prompt_end(prompt, f"{cols.completion}[:{k}] (the prompt)", loc)
            if shape == "conversational":
                check_prompt_column(record.get(cols.prompt), prompt, cols.prompt, loc)
            fields: tuple = ((cols.completion, conversation),)
        elif shape == "implicit":
            raise DataError(
                f"{loc}: field {cols.completion!r} must be a whole conversation (messages, the prompt "
                f"turns first) when there is no {cols.prompt!r} column; got {show(completion)}"
            )
        else:
            prompt = _prompt(_get(record, cols.prompt, loc), cols.prompt, loc)
            msgs = response(completion, cols.completion, loc)
            fields = ((cols.prompt, prompt), (cols.completion, msgs))
        parsed = _with_columns(Parsed(prompt, msgs, msgs, None, fields), record, cols, loc)
        return [Row(parsed.prompt, msgs, label, parsed.tools, parsed.fields)]
    raise DataError(f"data shape {shape!r} is not one of {', '.join(SHAPES)}")


def prompt_key(row: Row) -> bytes:
    """What makes two prompts the same: the string, or the messages with the tools (a digest)."""
    body = row.prompt if not row.chat else [row.prompt, row.tools]
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).digest()


def kl_partners(keys: Sequence[Any], seed: int, split: int = 0) -> np.ndarray:
    """``partner[i]``: the row whose completion row i's KL row takes (see the module docstring).

    ``keys``: one hashable prompt identity per row. Needs two distinct prompts (the caller says where)."""
    n = len(keys)
    ids: dict[Any, int] = {}
    codes = np.fromiter((ids.setdefault(k, len(ids)) for k in keys), dtype=np.int64, count=n)
    if len(ids) < 2:
        raise ValueError("KL partners need at least two distinct prompts")
    perm = np.random.default_rng([int(seed), _PARTNER_STREAM, int(split)]).permutation(n)
    ring = np.concatenate([codes[perm], codes[perm]])
    changes = (
        np.flatnonzero(ring[1:] != ring[:-1]) + 1
    )  # positions whose prompt differs from the last
    # the next position after k, cyclically, whose prompt differs from position k's
    nxt = changes[np.searchsorted(changes, np.arange(n), side="right")]
    partner = np.empty(n, dtype=np.int64)
    partner[perm] = perm[nxt % n]
    return partner


def weight_advice(
    desirable: int, undesirable: int, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> dict[str, Any]:
    """The KTO paper's weighting rule (§4.2): keep ``λ_D n_D / (λ_U n_U)`` in [1, 4/3]. Returns the ratio
    with the given weights and, when it is outside, the range of one weight that brings it in (the other
    kept at 1): ``{"ratio", "ok", "key", "low", "high"}``."""
    from preftune.losses.unpaired import kto_weight_ratio

    ratio = kto_weight_ratio(desirable, undesirable, desirable_weight, undesirable_weight)
    out: dict[str, Any] = {"ratio": ratio, "ok": 1.0 <= ratio <= 4 / 3, "key": None}
    if out["ok"] or desirable == 0 or undesirable == 0:
        return out
    if desirable <= undesirable:  # raise λ_D: λ_D ∈ [n_U / n_D, 4/3 · n_U / n_D]
        low = undesirable / desirable
        out.update(key="desirable_weight", low=low, high=4 / 3 * low)
    else:  # raise λ_U: λ_U ∈ [3/4 · n_D / n_U, n_D / n_U]
        high = desirable / undesirable
        out.update(key="undesirable_weight", low=0.75 * high, high=high)
    return out


def ratio_text(desirable: int, undesirable: int) -> str:
    """``1:10`` / ``3:1`` / ``1:1.5``: the desirable:undesirable imbalance, the smaller side as 1."""
    if desirable == 0 or undesirable == 0:
        return f"{desirable}:{undesirable}"

    def num(x: float) -> str:
        return f"{x:.0f}" if math.isclose(x, round(x), rel_tol=0, abs_tol=0.05) else f"{x:.1f}"

    if desirable <= undesirable:
        return f"1:{num(undesirable / desirable)}"
    return f"{num(desirable / undesirable)}:1"


# ------------------------------------------------------------------------------------------- helpers


def _get(record: dict, name: str, loc: Location) -> Any:
    if name not in record:
        raise missing_column_error(loc, name, record.keys())
    return record[name]


def _whole(value: Any) -> bool:
    """A list of messages that starts before the assistant speaks."""
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and isinstance(value[0], dict)
        and value[0].get("role") not in (None, "assistant")
    )


def _prompt(value: Any, field: str, loc: Location) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{loc}: field {field!r} is empty; expected the user's message")
        value = [{"role": "user", "content": value}]
    prompt = messages(value, field, loc)
    if not prompt:
        raise DataError(f"{loc}: field {field!r} is an empty list; expected at least one message")
    check_prompt_end(prompt, field, loc)
    return prompt


def _fields(fields: dict, cols: Columns, response_field: str) -> tuple:
    """A pair's message fields for one of its rows: the prompt's (and system's) and this response's."""
    return tuple(
        (k, v)
        for k, v in fields.items()
        if k not in (cols.chosen, cols.rejected) or k == response_field
    )
