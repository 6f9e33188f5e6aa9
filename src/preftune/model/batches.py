"""Typed batches of preference pairs, one class per layout, and the collators that build them.

Examples are dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists, arrays or tensors) and
optionally ``weight`` (default 1.0) and ``index`` (default: position in the batch). Unpaired rows (KTO)
come in the same shape: ``chosen_ids`` is the row's completion, ``rejected_ids`` the completion of another
prompt (its KL row), and ``label`` says whether the completion is desirable.

:class:`PaddedBatch` (:func:`collate_padded`): 2B rows, chosen first (``0..B-1`` = prompt + chosen of pair
``i``), then rejected (``B..2B-1``), padded to the longest row of this batch. ``completion_mask`` is 1 exactly
on the response tokens (EOS included), ``attention_mask`` on the real tokens; ``position_ids`` count 0.. over
a row's real tokens wherever they sit (left padding gives the same positions as right padding).

:class:`SharedBatch` (:func:`collate_shared`): each pair is one unit ``[P | C | R]`` with position ids
``0..P-1, P..P+C-1, P..P+R-1`` (they restart after the prompt), all units back to back in one row by default.
Scoring (the shift of :mod:`preftune.logprobs`): chosen token ``j`` (at ``P+j``) is predicted by the hidden
state at ``P+j-1``; rejected token ``j`` (at ``P+C+j``) by the state at ``P-1`` for ``j = 0`` (the prompt's
last state predicts both responses' first tokens) and at ``P+C+j-1`` otherwise. With ``P = 0`` a response's
first token has no predecessor and is not scored, as in the padded layout.

A *placeholder* batch (``placeholder=True``, weights 0) stands in for an empty share of a batch on one
rank: it takes part in the forward/backward (DDP/FSDP hooks are collectives) and counts no pairs or tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["PaddedBatch", "PairBatch", "SharedBatch", "collate_padded", "collate_shared"]


@dataclass(kw_only=True)
class PairBatch:
    """Fields every layout carries: per-pair weights and dataset indices."""

    weights: Tensor  # [B] float32
    index: Tensor  # [B] int64 (row of the dataset; the precomputed reference looks it up)
    labels: Tensor | None = None  # [B] bool, unpaired rows only (desirable?)
    placeholder: bool = False

    def to(self, device: torch.device | str, non_blocking: bool = False):
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)

    @property
    def num_pairs(self) -> int:
        """Real pairs (a placeholder has none)."""
        return 0 if self.placeholder else int(self.weights.shape[0])

    @property
    def chosen_tokens(self) -> int:
        """Scored chosen tokens, host-side (no device sync); 0 for a placeholder."""
        raise NotImplementedError

    def model_inputs(self) -> dict[str, Tensor]:
        """The tensors the layout's log-prob module takes as keyword arguments."""
        raise NotImplementedError

    def as_placeholder(self):
        """This batch with weight 0, marked as a placeholder."""
        return dataclasses.replace(self, weights=torch.zeros_like(self.weights), placeholder=True)


@dataclass(kw_only=True)
class PaddedBatch(PairBatch):
    input_ids: Tensor  # [2B, T]
    attention_mask: Tensor  # [2B, T]
    completion_mask: Tensor  # [2B, T]
    position_ids: Tensor  # [2B, T]

    @property
    def chosen_tokens(self) -> int:
        b = int(self.weights.shape[0])
        return 0 if self.placeholder else int(self.completion_mask[:b, 1:].sum())

    def model_inputs(self) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "completion_mask": self.completion_mask,
        }


@dataclass(kw_only=True)
class SharedBatch(PairBatch):
    input_ids: Tensor  # [rows, T]
    position_ids: Tensor  # [rows, T]
    segments: Tensor  # [U, 5] (row, start, a, b, c) per unit; CPU, read once per forward
    score_index: Tensor  # [N] flat row * T + t of the hidden state predicting each scored token
    score_labels: Tensor  # [N]
    score_seq: Tensor  # [N] output sequence: pair i chosen is i, rejected B + i
    n_tokens: Tensor  # [2B]

    @property
    def chosen_tokens(self) -> int:
        b = int(self.weights.shape[0])
        return 0 if self.placeholder else int(self.n_tokens[:b].sum())

    def model_inputs(self) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "segments": self.segments,
            "score_index": self.score_index,
            "score_labels": self.score_labels,
            "score_seq": self.score_seq,
            "n_tokens": self.n_tokens,
        }

    def to(self, device: torch.device | str, non_blocking: bool = False):
        moved = super().to(device, non_blocking)
        return dataclasses.replace(moved, segments=self.segments)  # the plan is read on the host


def _ids(x: Any) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _triple(ex: dict, i: int) -> tuple[list[int], list[int], list[int]]:
    try:
        return tuple(_ids(ex[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))  # type: ignore[return-value]
    except KeyError as err:
        raise ValueError(f"example {i} has no {err.args[0]!r} (a tokenized pair)") from None


def _pair_fields(examples: Sequence[dict]) -> dict[str, Tensor]:
    fields = {
        "weights": torch.tensor([float(ex.get("weight", 1.0)) for ex in examples]),
        "index": torch.tensor([int(ex.get("index", i)) for i, ex in enumerate(examples)]),
    }
    if "label" in examples[0]:
        fields["labels"] = torch.tensor([bool(ex["label"]) for ex in examples])
    return fields


def _check(examples: Sequence[dict], pad_token_id: int | None, padding_side: str) -> None:
    if not examples:
        raise ValueError("cannot collate an empty list of pairs")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError(
            "pad_token_id is None: give the tokenizer a pad token (its EOS is a common choice)"
        )


def collate_padded(
    examples: Sequence[dict], pad_token_id: int, *, padding_side: str = "right"
) -> PaddedBatch:
    """Pad B pairs to ``[2B, T]`` (T = the longest row here)."""
    _check(examples, pad_token_id, padding_side)
    triples = [_triple(ex, i) for i, ex in enumerate(examples)]
    seqs = [p + c for p, c, _ in triples] + [p + r for p, _, r in triples]
    prompt_lens = [len(p) for p, _, _ in triples] * 2
    rows, width = len(seqs), max(len(s) for s in seqs)
    input_ids = np.full((rows, width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((rows, width), dtype=np.int64)
    completion_mask = np.zeros((rows, width), dtype=np.int64)
    position_ids = np.zeros((rows, width), dtype=np.int64)
    for i, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        start = 0 if padding_side == "right" else width - len(seq)
        end = start + len(seq)
        input_ids[i, start:end] = seq
        attention_mask[i, start:end] = 1
        completion_mask[i, start + p : end] = 1
        position_ids[i, start:end] = np.arange(len(seq))
    return PaddedBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        completion_mask=torch.from_numpy(completion_mask),
        position_ids=torch.from_numpy(position_ids),
        **_pair_fields(examples),
    )


def collate_shared(
    examples: Sequence[dict],
    pad_token_id: int,
    *,
    pairs_per_row: int | None = None,
    padding_side: str = "right",
) -> SharedBatch:
    """Shared-prompt batch: one ``[P | C | R]`` unit per pair, all in one row (``pairs_per_row=None``) or
    ``pairs_per_row`` pairs per row padded to the longest row."""
    _check(examples, pad_token_id, padding_side)
    if pairs_per_row is not None and (isinstance(pairs_per_row, bool) or pairs_per_row < 1):
        raise ValueError(
            f"pairs_per_row must be None (all in one row) or >= 1, got {pairs_per_row!r}"
        )
    n_pairs = len(examples)
    per_row = n_pairs if pairs_per_row is None else pairs_per_row
    rows: list[dict[str, list]] = []
    n_tokens = [0] * (2 * n_pairs)
    for i, ex in enumerate(examples):
        prompt, chosen, rejected = _triple(ex, i)
        if i % per_row == 0:
            rows.append({"tokens": [], "pos": [], "units": [], "scores": []})
        row = rows[-1]
        p, c, r = len(prompt), len(chosen), len(rejected)
        s = len(row["tokens"])
        row["tokens"] += prompt + chosen + rejected
        row["pos"] += list(range(p + c)) + list(range(p, p + r))
        row["units"].append((s, p, c, r))
        # (position of the predicting hidden state, label, output sequence)
        for j, label in enumerate(chosen):
            if p + j >= 1:
                row["scores"].append((s + p + j - 1, label, i))
                n_tokens[i] += 1
        for j, label in enumerate(rejected):
            pred = (s + p - 1 if p >= 1 else None) if j == 0 else s + p + c + j - 1
            if pred is not None:
                row["scores"].append((pred, label, n_pairs + i))
                n_tokens[n_pairs + i] += 1
    length = max(len(row["tokens"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    segments, score_index, score_labels, score_seq = [], [], [], []
    for r, row in enumerate(rows):
        off = length - len(row["tokens"]) if padding_side == "left" else 0
        input_ids[r, off : off + len(row["tokens"])] = torch.tensor(row["tokens"])
        position_ids[r, off : off + len(row["pos"])] = torch.tensor(row["pos"])
        segments += [(r, off + s, a, b, c) for s, a, b, c in row["units"]]
        for pos, label, seq in row["scores"]:
            score_index.append(r * length + off + pos)
            score_labels.append(label)
            score_seq.append(seq)
    return SharedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segments=torch.tensor(segments, dtype=torch.long).reshape(-1, 5),
        score_index=torch.tensor(score_index, dtype=torch.long),
        score_labels=torch.tensor(score_labels, dtype=torch.long),
        score_seq=torch.tensor(score_seq, dtype=torch.long),
        n_tokens=torch.tensor(n_tokens, dtype=torch.long),
        **_pair_fields(examples),
    )
