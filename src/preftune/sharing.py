"""Prefix sharing and padding-free packing: fewer tokens through the model, same log-probs.

Prefix sharing (issue 7, technique 2)
-------------------------------------
A pair ``(prompt, chosen, rejected)`` becomes one sequence ``[P | C | R]`` with position ids
``0..P-1, P..P+C-1, P..P+R-1`` (they restart after the prompt). The chosen tokens attend causally to the
prompt; the rejected tokens attend to the prompt and causally to each other, never to the chosen tokens
(:mod:`preftune.attention`). The prompt runs once instead of twice.

Scoring (the shift, FORMULAS.md "Sequence log-probs"): chosen token ``j`` (at ``P+j``) is predicted by the
hidden state at ``P+j-1``; rejected token ``j`` (at ``P+C+j``) by the hidden state at ``P-1`` for ``j = 0``
(the prompt's last state predicts both responses' first tokens) and at ``P+C+j-1`` otherwise. With ``P = 0``
a response's first token has no predecessor and is not scored, exactly as in the padded two-row layout.

Packing (technique 3)
---------------------
Units are laid out back to back in one row (``pairs_per_row=None``) or ``pairs_per_row`` pairs per row,
padded to the longest row; attention never crosses units. :func:`collate_shared` packs ``[P | C | R]`` pairs;
:func:`collate_packed` packs the two plain sequences ``P + C`` and ``P + R`` of each pair (no sharing).

Batch keys (both collators): ``input_ids [rows, T]``, ``position_ids [rows, T]``, ``segments [U, 5]``
(``row, start, a, b, c`` per unit; CPU tensor, read once per forward), ``score_index [N]`` (flat
``row * T + t`` of the hidden state predicting each scored token), ``score_labels [N]``, ``score_seq [N]``
(output sequence ``0..2B-1``: pair ``i`` chosen is ``i``, rejected ``B + i``), ``n_tokens [2B]``, and, passed
through for the trainer, ``weights [B]`` and ``index [B]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from preftune.attention import (
    ATTENTION_NAME,
    MODES,
    PLAN_KWARG,
    SegmentPlan,
    register_segment_attention,
    skip_mask_creation,
)
from preftune.logprobs import DEFAULT_CHUNK_SIZE, segment_sum, selected_token_logps
from preftune.modeling import SequenceLogps, split_lm_head, split_pairs, unwrap_causal_lm

__all__ = [
    "SHARED_BATCH_KEYS",
    "SharedPrefixLogpsModel",
    "collate_packed",
    "collate_shared",
    "forward_shared_pairs",
    "shared_model_inputs",
]

log = logging.getLogger(__name__)

#: The keys :class:`SharedPrefixLogpsModel` reads from a collated batch.
SHARED_BATCH_KEYS = (
    "input_ids",
    "position_ids",
    "segments",
    "score_index",
    "score_labels",
    "score_seq",
    "n_tokens",
)


def _check_example(ex: dict, i: int) -> tuple[list[int], list[int], list[int]]:
    try:
        prompt, chosen, rejected = (
            list(ex[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")
        )
    except KeyError as err:
        raise ValueError(f"example {i} has no {err.args[0]!r} (a tokenized pair)") from None
    return prompt, chosen, rejected


def _collate(
    examples: Sequence[dict],
    pad_token_id: int,
    *,
    share: bool,
    pairs_per_row: int | None,
    padding_side: str,
) -> dict[str, Tensor]:
    if not examples:
        raise ValueError("cannot collate an empty list of pairs")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pairs_per_row is not None and (isinstance(pairs_per_row, bool) or pairs_per_row < 1):
        raise ValueError(
            f"pairs_per_row must be None (all in one row) or >= 1, got {pairs_per_row!r}"
        )
    n_pairs = len(examples)
    per_row = n_pairs if pairs_per_row is None else pairs_per_row
    # Per row: tokens, positions, and units (start, a, b, c) with scoring entries (pos, label, seq).
    rows_tokens: list[list[int]] = []
    rows_pos: list[list[int]] = []
    rows_units: list[list[tuple[int, int, int, int]]] = []
    rows_scores: list[list[tuple[int, int, int]]] = []
    n_tokens = [0] * (2 * n_pairs)

    def score(scores, seq, pred_positions, labels):
        for pos, label in zip(pred_positions, labels):
            if pos is not None:
                scores.append((pos, label, seq))
                n_tokens[seq] += 1

    for i, ex in enumerate(examples):
        prompt, chosen, rejected = _check_example(ex, i)
        if i % per_row == 0:
            rows_tokens.append([])
            rows_pos.append([])
            rows_units.append([])
            rows_scores.append([])
        tokens, pos, units, scores = rows_tokens[-1], rows_pos[-1], rows_units[-1], rows_scores[-1]
        p, c, r = len(prompt), len(chosen), len(rejected)
        s = len(tokens)
        if share:
            tokens += prompt + chosen + rejected
            pos += list(range(p + c)) + list(range(p, p + r))
            units.append((s, p, c, r))
            score(scores, i, [s + p + j - 1 if p + j >= 1 else None for j in range(c)], chosen)
            rej_pred = [
                (s + p - 1 if p >= 1 else None) if j == 0 else s + p + c + j - 1 for j in range(r)
            ]
            score(scores, n_pairs + i, rej_pred, rejected)
        else:
            for seq, resp in ((i, chosen), (n_pairs + i, rejected)):
                s = len(tokens)
                tokens += prompt + resp
                pos += list(range(p + len(resp)))
                units.append((s, p, len(resp), 0))
                score(
                    scores,
                    seq,
                    [s + p + j - 1 if p + j >= 1 else None for j in range(len(resp))],
                    resp,
                )

    length = max(len(t) for t in rows_tokens)
    n_rows = len(rows_tokens)
    input_ids = torch.full((n_rows, length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, length), dtype=torch.long)
    segments, score_index, score_labels, score_seq = [], [], [], []
    for row, (tokens, pos, units, scores) in enumerate(
        zip(rows_tokens, rows_pos, rows_units, rows_scores)
    ):
        off = length - len(tokens) if padding_side == "left" else 0
        input_ids[row, off : off + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        position_ids[row, off : off + len(tokens)] = torch.tensor(pos, dtype=torch.long)
        segments += [(row, off + s, a, b, c) for s, a, b, c in units]
        for p_, label, seq in scores:
            score_index.append(row * length + off + p_)
            score_labels.append(label)
            score_seq.append(seq)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segments": torch.tensor(segments, dtype=torch.long).reshape(-1, 5),
        "score_index": torch.tensor(score_index, dtype=torch.long),
        "score_labels": torch.tensor(score_labels, dtype=torch.long),
        "score_seq": torch.tensor(score_seq, dtype=torch.long),
        "n_tokens": torch.tensor(n_tokens, dtype=torch.long),
        "weights": torch.tensor([float(ex.get("weight", 1.0)) for ex in examples]),
        "index": torch.tensor([int(ex.get("index", i)) for i, ex in enumerate(examples)]),
    }


def collate_shared(
    examples: Sequence[dict],
    pad_token_id: int,
    *,
    pairs_per_row: int | None = None,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Prefix-shared batch: each pair is one ``[P | C | R]`` unit; all pairs packed in one row by default.

    ``pairs_per_row=1`` gives one padded row per pair. See the module docstring for the keys.
    """
    return _collate(
        examples, pad_token_id, share=True, pairs_per_row=pairs_per_row, padding_side=padding_side
    )


def collate_packed(
    examples: Sequence[dict],
    pad_token_id: int,
    *,
    pairs_per_row: int | None = None,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Padding-free packed batch without sharing: the sequences ``P + C`` and ``P + R`` of every pair, back
    to back (all in one row by default), each attending only to itself. Same keys as :func:`collate_shared`.
    """
    return _collate(
        examples, pad_token_id, share=False, pairs_per_row=pairs_per_row, padding_side=padding_side
    )


def _refuse(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"prefix sharing / packing cannot route the attention of {type(model).__name__}: {why}. "
        "Set train.prefix_sharing: false to use the padded two-row path (SequenceLogpsModel)."
    )


class SharedPrefixLogpsModel(nn.Module):
    """forward(batch from :func:`collate_shared` / :func:`collate_packed`) -> ``(logps [2B], n_tokens [2B])``.

    Same output contract as :class:`preftune.modeling.SequenceLogpsModel` (chosen rows first, then rejected),
    so :func:`preftune.modeling.split_pairs` applies. The whole computation (decoder, response-only chunked
    LM head) runs inside ``forward`` so DDP/FSDP wrappers see every parameter use.

    The model's attention is switched once to :data:`preftune.attention.ATTENTION_NAME`, which behaves as
    SDPA for ordinary calls (padded batches, generation) and runs per-segment attention when a plan is given.
    Raises ValueError for models it cannot route: no ``config._attn_implementation`` switch, encoder-decoders,
    attention soft-capping, an LM head that cannot be split off, or (at the first forward) attention layers
    that do not go through transformers' AttentionInterface.

    Args:
        model: a transformers ``*ForCausalLM`` (or a PEFT wrapper of one).
        chunk_size: response tokens per LM-head chunk.
        attention: ``"segments"`` (per-segment SDPA, default: fastest measured) or ``"dense"`` (one SDPA call
            with a dense boolean mask per layer; ``O(T^2)`` memory and time per row).
    """

    shared_layout = True  # batches come from collate_shared / collate_packed

    def __init__(
        self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE, *, attention: str = "segments"
    ):
        super().__init__()
        if attention not in MODES:
            raise ValueError(f"attention must be one of {MODES}, got {attention!r}")
        self.model = model
        self.chunk_size = chunk_size
        self.attention = attention
        lm = unwrap_causal_lm(model)
        config = getattr(lm, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            raise _refuse(lm, "it has no config._attn_implementation switch")
        if getattr(config, "is_encoder_decoder", False):
            raise _refuse(lm, "encoder-decoder models are not supported")
        for name in ("attn_logit_softcapping", "attention_logit_softcapping"):
            if getattr(config, name, None) is not None:
                raise _refuse(
                    lm, f"config.{name} (attention soft-capping) is not reproduced by SDPA"
                )
        if not hasattr(lm, getattr(lm, "base_model_prefix", "") or "\0"):
            raise _refuse(lm, "no decoder found under its base_model_prefix")
        if split_lm_head(model) is None:
            raise _refuse(lm, "its LM head cannot be split off for response-only scoring")
        if not callable(getattr(lm, "set_attn_implementation", None)):
            raise _refuse(lm, "it has no set_attn_implementation()")
        register_segment_attention()
        if config._attn_implementation != ATTENTION_NAME:
            previous = config._attn_implementation
            lm.set_attn_implementation(ATTENTION_NAME)
            if config._attn_implementation != ATTENTION_NAME:
                raise _refuse(lm, "it does not follow transformers' AttentionInterface")
            log.info("attention of %s: %s -> %s", type(lm).__name__, previous, ATTENTION_NAME)
        self.num_layers = getattr(config, "num_hidden_layers", None)
        self.uses_chunked_head = True  # same flag as SequenceLogpsModel (the trainer reports it)

    def forward(
        self,
        input_ids: Tensor,  # [rows, T]
        position_ids: Tensor,  # [rows, T]
        segments: Tensor,  # [U, 5]
        score_index: Tensor,  # [N]
        score_labels: Tensor,  # [N]
        score_seq: Tensor,  # [N]
        n_tokens: Tensor,  # [2B]
        weights: Tensor | None = None,  # unused; accepted so that module(**batch) works
        index: Tensor | None = None,  # unused
    ) -> tuple[Tensor, Tensor]:
        lm = unwrap_causal_lm(self.model)
        rows, length = input_ids.shape
        plan = SegmentPlan(segments.tolist(), rows, length, self.attention)
        decoder = getattr(lm, lm.base_model_prefix)
        with skip_mask_creation():
            hidden = decoder(
                input_ids=input_ids,
                attention_mask=None,
                position_ids=position_ids,
                use_cache=False,
                **{PLAN_KWARG: plan},
            ).last_hidden_state  # [rows, T, H]
        expected = self.num_layers or 1
        if len(plan.routed) < expected:
            raise _refuse(
                lm,
                f"only {len(plan.routed)} of {expected} layers called the attention interface "
                "(attention implemented outside transformers' AttentionInterface, or non-attention layers)",
            )
        head = split_lm_head(self.model)
        assert head is not None
        selected = hidden.reshape(rows * length, -1).index_select(0, score_index.to(hidden.device))
        token_logps = selected_token_logps(
            selected,
            head.weight,
            score_labels.to(hidden.device),
            lm_head_bias=head.bias,
            logit_scale=head.logit_scale,
            logit_softcap=head.logit_softcap,
            chunk_size=self.chunk_size,
        )
        logps = segment_sum(token_logps, score_seq.to(hidden.device), n_tokens.shape[0])
        return logps, n_tokens.to(hidden.device)


def shared_model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of a shared/packed batch that :class:`SharedPrefixLogpsModel` takes."""
    return {key: batch[key] for key in SHARED_BATCH_KEYS}


def forward_shared_pairs(module: nn.Module, batch: dict[str, Tensor]) -> SequenceLogps:
    """Like :func:`preftune.modeling.forward_pairs` for a shared/packed batch (module may be DDP/FSDP-wrapped)."""
    return split_pairs(*module(**shared_model_inputs(batch)))
