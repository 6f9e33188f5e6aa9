"""Collators: tokenized pairs -> model-ready tensors.

Row order (DESIGN.md): for B pairs, 2B sequences, chosen first (``0..B-1`` = prompt + chosen of pair i), then
rejected (``B..2B-1`` = prompt + rejected of pair i).

`collate_pairs` pads to the longest row of THIS batch (no global padding). ``completion_mask`` is 1 exactly on
the response tokens (EOS included), ``attention_mask`` on the real tokens. ``position_ids`` count 0.. over a
row's real tokens wherever they sit (so left padding gives the same positions as right padding); padding
positions hold 0 and are masked out.

`collate_pairs_padding_free` concatenates the 2B sequences into one row ``[1, sum L]`` with ``position_ids``
restarting at 0 per sequence, the boundaries in ``cu_seqlens`` (int32, ``[2B+1]``, as FlashAttention varlen
expects) and ``seq_lens``; there is no padding and no ``attention_mask`` (attention must be per sequence).

Examples are dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists, arrays or tensors), and
optionally ``weight`` (default 1.0) and ``index`` (default: position in the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["collate_pairs", "collate_pairs_padding_free"]


def _ids(x: Any) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _sequences(examples: Sequence[dict]) -> tuple[list[list[int]], list[int]]:
    """The 2B sequences (chosen rows then rejected rows) and their prompt lengths."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    prompts = [_ids(ex["prompt_ids"]) for ex in examples]
    chosen = [p + _ids(ex["chosen_ids"]) for p, ex in zip(prompts, examples)]
    rejected = [p + _ids(ex["rejected_ids"]) for p, ex in zip(prompts, examples)]
    lens = [len(p) for p in prompts]
    return chosen + rejected, lens + lens


def _pair_fields(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    weights = [float(ex.get("weight", 1.0)) for ex in examples]
    index = [int(ex.get("index", i)) for i, ex in enumerate(examples)]
    return {
        "weights": torch.tensor(weights, dtype=torch.float32),
        "index": torch.tensor(index, dtype=torch.int64),
    }


def collate_pairs(
    examples: Sequence[dict], pad_token_id: int, *, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad B pairs to ``[2B, T]`` (T = longest row here): input_ids, attention_mask, completion_mask,
    position_ids (all int64), weights ``[B]`` float32, index ``[B]`` int64."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError(
            "pad_token_id is None: give the tokenizer a pad token (its EOS is a common choice)"
        )
    seqs, prompt_lens = _sequences(examples)
    rows, width = len(seqs), max(len(s) for s in seqs)
    input_ids = np.full((rows, width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((rows, width), dtype=np.int64)
    completion_mask = np.zeros((rows, width), dtype=np.int64)
    position_ids = np.zeros((rows, width), dtype=np.int64)
    for i, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        start = 0 if padding_side == "right" else width - len(seq)
        end = start + len(seq)
        input_ids[i, start:end] = seq  # [L]
        attention_mask[i, start:end] = 1
        completion_mask[i, start + p : end] = 1
        position_ids[i, start:end] = np.arange(len(seq))
    return {
        "input_ids": torch.from_numpy(input_ids),  # [2B, T]
        "attention_mask": torch.from_numpy(attention_mask),  # [2B, T]
        "completion_mask": torch.from_numpy(completion_mask),  # [2B, T]
        "position_ids": torch.from_numpy(position_ids),  # [2B, T]
        **_pair_fields(examples),  # weights [B], index [B]
    }


def collate_pairs_padding_free(
    examples: Sequence[dict], pad_token_id: int | None = None
) -> dict[str, Any]:
    """Pack B pairs into one row ``[1, N]``, N = total tokens: input_ids, completion_mask, position_ids
    (int64), cu_seqlens ``[2B+1]`` int32, seq_lens ``[2B]`` int64, max_seqlen (int), weights, index.
    ``pad_token_id`` is accepted for symmetry with `collate_pairs` and unused (nothing is padded)."""
    seqs, prompt_lens = _sequences(examples)
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    cu = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    input_ids = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(cu[-1]))
    starts = np.repeat(cu[:-1], lens)  # [N] start offset of each token's sequence
    position_ids = np.arange(int(cu[-1]), dtype=np.int64) - starts
    completion_mask = (
        position_ids >= np.repeat(np.array(prompt_lens, dtype=np.int64), lens)
    ).astype(np.int64)
    return {
        "input_ids": torch.from_numpy(input_ids)[None],  # [1, N]
        "completion_mask": torch.from_numpy(completion_mask)[None],  # [1, N]
        "position_ids": torch.from_numpy(position_ids)[None],  # [1, N]
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),  # [2B+1]
        "seq_lens": torch.from_numpy(lens),  # [2B]
        "max_seqlen": int(lens.max()),
        **_pair_fields(examples),  # weights [B], index [B]
    }
