"""Log-prob modules: a causal LM and a typed batch -> per-row response log-prob sums and token counts.

Each module does the whole computation inside ``forward`` (decoder, response-only chunked LM head, the MoE
router term) so that DDP and FSDP2 wrappers see every parameter use (FSDP2 must unshard the tied
embedding/LM-head weight around it). Both return ``(logps [2B], n_tokens [2B], aux_loss, extras)``: rows
``0..B-1`` are the chosen responses, ``B..2B-1`` the rejected ones; ``aux_loss`` is the model's own router
load-balancing term (already scaled by ``router_aux_loss_coef``) when its config asks for it, else None.

``extras`` (a dict of ``[2B]`` tensors) holds what the loss options ask for, computed from the same
per-token log-probs (no second forward, no full logits):

- ``"prefix"``: the sum over each response's first ℓ_s = min(n_chosen, n_rejected) scored tokens of its
  pair (LD-DPO's "public" part; the shorter response's prefix is its whole sum);
- ``"collision"``: the sum over the response tokens of ``log Σ_v π(v | ·)²`` (WPO's sampled alignment),
  detached.

- :class:`PaddedLogps` reads a :class:`~preftune.model.batches.PaddedBatch`; with ``chunked_head=False``
  (a head the probe could not reproduce) it falls back to the model's full logits.
- :class:`SharedPromptLogps` reads a :class:`~preftune.model.batches.SharedBatch`; the model's attention
  must have been switched to per-segment attention (:func:`preftune.model.attention.prepare_shared`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from preftune.logprobs import segment_sum, selected_token_logps, token_log_collision
from preftune.model.arch import (
    accepts_kwarg,
    find_decoder,
    router_aux,
    split_lm_head,
    unwrap_causal_lm,
)
from preftune.model.attention import PLAN_KWARG, SegmentPlan, skip_mask_creation

__all__ = ["EXTRAS", "PaddedLogps", "SequenceLogps", "SharedPromptLogps", "split_pairs"]

#: What a log-prob module can compute beside the sums (see the module docstring).
EXTRAS = ("prefix", "collision")


@dataclass
class SequenceLogps:
    """Per-pair response log-prob sums and token counts of one batch."""

    chosen_logps: Tensor  # [B]
    rejected_logps: Tensor  # [B]
    chosen_tokens: Tensor  # [B]
    rejected_tokens: Tensor  # [B]
    aux_loss: Tensor | None = None  # scalar: the model's router term for this batch
    chosen_prefix_logps: Tensor | None = None  # [B] LD-DPO's public part
    rejected_prefix_logps: Tensor | None = None  # [B]
    chosen_log_collision: Tensor | None = None  # [B] WPO's alignment sums (detached)
    rejected_log_collision: Tensor | None = None  # [B]

    def detach(self) -> SequenceLogps:
        return SequenceLogps(
            *(None if v is None else v.detach() for v in vars(self).values())  # type: ignore[arg-type]
        )


def split_pairs(
    logps: Tensor,
    n_tokens: Tensor,
    aux_loss: Tensor | None = None,
    extras: dict[str, Tensor] | None = None,
) -> SequenceLogps:
    b = logps.shape[0] // 2
    extras = extras or {}
    prefix, collision = extras.get("prefix"), extras.get("collision")
    return SequenceLogps(
        logps[:b],
        logps[b:],
        n_tokens[:b],
        n_tokens[b:],
        aux_loss,
        None if prefix is None else prefix[:b],
        None if prefix is None else prefix[b:],
        None if collision is None else collision[:b],
        None if collision is None else collision[b:],
    )


def _prefix_sums(token_logps: Tensor, seq: Tensor, rank: Tensor, n_tokens: Tensor) -> Tensor:
    """``[2B]`` sums over the tokens whose rank within their response is below the pair's ℓ_s."""
    b = n_tokens.shape[0] // 2
    public = torch.minimum(n_tokens[:b], n_tokens[b:]).repeat(2)  # [2B]: ℓ_s of each row's pair
    head = rank < public[seq]  # [N]
    return segment_sum(torch.where(head, token_logps, 0.0), seq, n_tokens.shape[0])


class _LogpsModule(nn.Module):
    def __init__(
        self, model: nn.Module, *, chunk_size: int, keep_bytes: int = 0, extras: Iterable[str] = ()
    ):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.keep_bytes = keep_bytes
        self.extras = frozenset(extras)
        unknown = self.extras - set(EXTRAS)
        if unknown:
            raise ValueError(f"unknown log-prob extras {sorted(unknown)}; known: {EXTRAS}")
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

    def _scored(
        self, hidden: Tensor, labels: Tensor, seq: Tensor, rank: Tensor, n_tokens: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Sums per output row (and the extras) from the hidden states of the scored positions."""
        head = split_lm_head(self.model)  # per call: FSDP2 swaps parameters
        assert head is not None
        kwargs = {
            "lm_head_bias": head.bias,
            "logit_scale": head.logit_scale,
            "logit_softcap": head.logit_softcap,
            "chunk_size": self.chunk_size,
        }
        token_logps = selected_token_logps(
            hidden, head.weight, labels, keep_bytes=self.keep_bytes, **kwargs
        )  # [N]
        rows = n_tokens.shape[0]
        extras = {}
        if "prefix" in self.extras:
            extras["prefix"] = _prefix_sums(token_logps, seq, rank, n_tokens)
        if "collision" in self.extras:
            collision = token_log_collision(hidden.detach(), head.weight.detach(), **kwargs)
            extras["collision"] = segment_sum(collision, seq, rows)
        return segment_sum(token_logps, seq, rows), extras


class PaddedLogps(_LogpsModule):
    """Two padded rows per pair (``[prompt | response]``)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        chunk_size: int,
        keep_bytes: int = 0,
        chunked_head: bool = True,
        extras: Iterable[str] = (),
    ):
        super().__init__(model, chunk_size=chunk_size, keep_bytes=keep_bytes, extras=extras)
        self.chunked_head = chunked_head

    def forward(
        self,
        input_ids: Tensor,  # [2B, T]
        attention_mask: Tensor,  # [2B, T]
        position_ids: Tensor,  # [2B, T]
        completion_mask: Tensor,  # [2B, T]
    ) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
        kwargs = {"position_ids": position_ids} if self._position_ids else {}
        kwargs.update(self._router_kwargs())
        mask = completion_mask[:, 1:].bool()  # [2B, T-1], shifted with the labels
        n_tokens = mask.sum(-1, dtype=torch.int64)  # [2B]
        rows, cols = mask.nonzero(as_tuple=True)  # response predictions only
        labels = input_ids[rows, cols + 1]  # [N]: position t predicts token t+1
        rank = (mask.long().cumsum(-1) - 1)[rows, cols]  # [N] index within its response
        call = self.model if not self.chunked_head else self._decoder()
        out = call(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        if self.chunked_head:
            hidden = out.last_hidden_state[rows, cols]  # [N, H]
            logps, extras = self._scored(hidden, labels, rows, rank, n_tokens)
        else:  # the model's own logits (a head the probe could not split), only at scored rows
            logits = out.logits[rows, cols].float()  # [N, V]
            log_z = torch.logsumexp(logits, dim=-1)
            token_logps = logits.gather(1, labels.unsqueeze(1)).squeeze(1) - log_z
            logps = segment_sum(token_logps, rows, n_tokens.shape[0])
            extras = {}
            if "prefix" in self.extras:
                extras["prefix"] = _prefix_sums(token_logps, rows, rank, n_tokens)
            if "collision" in self.extras:
                collision = (torch.logsumexp(2 * logits, dim=-1) - 2 * log_z).detach()
                extras["collision"] = segment_sum(collision, rows, n_tokens.shape[0])
        return logps, n_tokens, self._aux_loss(out, attention_mask), extras


class SharedPromptLogps(_LogpsModule):
    """One ``[P | C | R]`` unit per pair; the prompt runs once."""

    def __init__(
        self,
        model: nn.Module,
        *,
        chunk_size: int,
        attention_layers: int,
        keep_bytes: int = 0,
        extras: Iterable[str] = (),
        kernel: str = "auto",
    ):
        super().__init__(model, chunk_size=chunk_size, keep_bytes=keep_bytes, extras=extras)
        self.attention_layers = attention_layers  # layers that must route the plan (from the probe)
        self.kernel = kernel  # "auto" | "segments" | "flex" (preftune.model.attention.KERNELS)
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
    ) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
        rows, length = input_ids.shape
        kernel = self.kernel
        if kernel == "auto":  # one fused kernel per layer on a GPU; per-unit SDPA calls on a CPU
            kernel = "flex" if input_ids.device.type == "cuda" else "segments"
        plan = SegmentPlan(segments.tolist(), rows, length, kernel)
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
                f"only {self.last_routed} of {self.attention_layers} attention layers routed the "
                "shared-prompt plan (the setup probe saw all of them)"
            )
        hidden = out.last_hidden_state  # [rows, T, H]
        device = hidden.device
        seq, n_tokens = score_seq.to(device), n_tokens.to(device)
        selected = hidden.reshape(rows * length, -1).index_select(0, score_index.to(device))
        rank = None
        if "prefix" in self.extras:  # each response's scores are contiguous and in order
            n = seq.shape[0]
            first = torch.full((n_tokens.shape[0],), n, dtype=torch.long, device=device)
            first.scatter_reduce_(0, seq, torch.arange(n, device=device), reduce="amin")
            rank = torch.arange(n, device=device) - first[seq]  # [N]
        logps, extras = self._scored(selected, score_labels.to(device), seq, rank, n_tokens)
        aux = None
        if self._aux is not None:
            real = torch.zeros(rows, length, dtype=torch.long, device=device)  # [rows, T]
            for row, start, a, b, c in plan.segments:
                real[row, start : start + a + b + c] = 1
            aux = self._aux_loss(out, real)
        return logps, n_tokens, aux, extras
