"""Log-prob modules: a causal LM and a typed batch -> per-row response log-prob sums and token counts.

Each module does the whole computation inside ``forward`` (decoder, response-only chunked LM head, the MoE
router term) so that DDP and FSDP2 wrappers see every parameter use (FSDP2 must unshard the tied
embedding/LM-head weight around it). Both return ``(logps [2B], n_tokens [2B], aux_loss)``: rows ``0..B-1``
are the chosen responses, ``B..2B-1`` the rejected ones; ``aux_loss`` is the model's own router
load-balancing term (already scaled by ``router_aux_loss_coef``) when its config asks for it, else None.

- :class:`PaddedLogps` reads a :class:`~preftune.model.batches.PaddedBatch`; with ``chunked_head=False``
  (a head the probe could not reproduce) it falls back to the model's full logits.
- :class:`SharedPromptLogps` reads a :class:`~preftune.model.batches.SharedBatch`; the model's attention
  must have been switched to per-segment attention (:func:`preftune.model.layout.prepare_shared`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from preftune.logprobs import (
    chunked_sequence_logps,
    segment_sum,
    selected_token_logps,
    sequence_logps,
)
from preftune.model.arch import (
    accepts_kwarg,
    find_decoder,
    router_aux,
    split_lm_head,
    unwrap_causal_lm,
)
from preftune.model.attention import PLAN_KWARG, SegmentPlan, skip_mask_creation

__all__ = ["PaddedLogps", "SequenceLogps", "SharedPromptLogps", "split_pairs"]


@dataclass
class SequenceLogps:
    """Per-pair response log-prob sums and token counts of one batch."""

    chosen_logps: Tensor  # [B]
    rejected_logps: Tensor  # [B]
    chosen_tokens: Tensor  # [B]
    rejected_tokens: Tensor  # [B]
    aux_loss: Tensor | None = None  # scalar: the model's router term for this batch


def split_pairs(logps: Tensor, n_tokens: Tensor, aux_loss: Tensor | None = None) -> SequenceLogps:
    b = logps.shape[0] // 2
    return SequenceLogps(logps[:b], logps[b:], n_tokens[:b], n_tokens[b:], aux_loss)


class _LogpsModule(nn.Module):
    def __init__(self, model: nn.Module, *, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        lm = unwrap_causal_lm(model)
        decoder = find_decoder(lm)
        self._position_ids = decoder is not None and accepts_kwarg(decoder, "position_ids")
        self._aux = router_aux(lm)

    def _decoder(self) -> nn.Module:
        decoder = find_decoder(self.model)
        assert decoder is not None, "the layout probe admits no model without a decoder"
        return decoder

    def _router_kwargs(self) -> dict:
        return {"output_router_logits": True} if self._aux is not None else {}

    def _aux_loss(self, outputs, attention_mask: Tensor | None) -> Tensor | None:
        if self._aux is None:
            return None
        return self._aux(outputs.router_logits, attention_mask)


class PaddedLogps(_LogpsModule):
    """Two padded rows per pair (``[prompt | response]``)."""

    def __init__(self, model: nn.Module, *, chunk_size: int, chunked_head: bool = True):
        super().__init__(model, chunk_size=chunk_size)
        self.chunked_head = chunked_head

    def forward(
        self,
        input_ids: Tensor,  # [2B, T]
        attention_mask: Tensor,  # [2B, T]
        position_ids: Tensor,  # [2B, T]
        completion_mask: Tensor,  # [2B, T]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        kwargs = {"position_ids": position_ids} if self._position_ids else {}
        kwargs.update(self._router_kwargs())
        if not self.chunked_head:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
            )
            logps, n = sequence_logps(out.logits, input_ids, completion_mask)
            return logps, n, self._aux_loss(out, attention_mask)
        out = self._decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
        )
        head = split_lm_head(self.model)  # per call: FSDP2 swaps parameters
        assert head is not None
        logps, n = chunked_sequence_logps(
            out.last_hidden_state,  # [2B, T, H]
            head.weight,
            input_ids,
            completion_mask,
            lm_head_bias=head.bias,
            logit_scale=head.logit_scale,
            logit_softcap=head.logit_softcap,
            chunk_size=self.chunk_size,
        )
        return logps, n, self._aux_loss(out, attention_mask)


class SharedPromptLogps(_LogpsModule):
    """One ``[P | C | R]`` unit per pair; the prompt runs once."""

    def __init__(self, model: nn.Module, *, chunk_size: int, attention_layers: int):
        super().__init__(model, chunk_size=chunk_size)
        self.attention_layers = attention_layers  # layers that must route the plan (from the probe)
        self.last_routed = 0

    def forward(
        self,
        input_ids: Tensor,  # [rows, T]
        position_ids: Tensor,  # [rows, T]
        segments: Tensor,  # [U, 5]
        score_index: Tensor,  # [N]
        score_labels: Tensor,  # [N]
        score_seq: Tensor,  # [N]
        n_tokens: Tensor,  # [2B]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        rows, length = input_ids.shape
        plan = SegmentPlan(segments.tolist(), rows, length)
        with skip_mask_creation():
            out = self._decoder()(
                input_ids=input_ids,
                attention_mask=None,
                position_ids=position_ids,
                use_cache=False,
                **self._router_kwargs(),
                **{PLAN_KWARG: plan},
            )
        self.last_routed = len(plan.routed)  # read by the setup probe
        if self.last_routed < self.attention_layers:
            raise RuntimeError(
                f"only {len(plan.routed)} of {self.attention_layers} attention layers routed the "
                "shared-prompt plan (the setup probe saw all of them)"
            )
        hidden = out.last_hidden_state  # [rows, T, H]
        head = split_lm_head(self.model)
        assert head is not None
        selected = hidden.reshape(rows * length, -1).index_select(0, score_index.to(hidden.device))
        token_logps = selected_token_logps(
            selected,  # [N, H]
            head.weight,
            score_labels.to(hidden.device),
            lm_head_bias=head.bias,
            logit_scale=head.logit_scale,
            logit_softcap=head.logit_softcap,
            chunk_size=self.chunk_size,
        )
        logps = segment_sum(token_logps, score_seq.to(hidden.device), n_tokens.shape[0])
        aux = None
        if self._aux is not None:
            real = torch.zeros(rows, length, dtype=torch.long, device=hidden.device)  # [rows, T]
            for row, start, a, b, c in plan.segments:
                real[row, start : start + a + b + c] = 1
            aux = self._aux_loss(out, real)
        return logps, n_tokens.to(hidden.device), aux
