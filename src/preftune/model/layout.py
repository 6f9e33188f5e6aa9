"""The layout of a run: how a batch of pairs becomes per-pair log-probs, chosen once per run.

One :class:`Layout` object owns the whole path for the policy, every reference strategy, periodic eval,
``preftune eval`` and the bench: ``collate(examples)`` -> a typed batch, ``placeholder(example)`` for a rank
with an empty share, ``module(model)`` -> the log-prob module (which DDP/FSDP may wrap), and
``logps(module, batch)`` -> :class:`~preftune.model.forward.SequenceLogps`. Nothing else looks at a batch's
keys to guess its layout.

:func:`choose_layout` decides from the config and the model, by the setup probe
(:mod:`preftune.model.probe`): the shared prompt where it is proven exact (and wanted), else padded rows;
the chunked LM head where it is proven exact, else full logits. It logs one line saying what was chosen and
why, before any training step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from torch import nn

from preftune.model.arch import unwrap_causal_lm
from preftune.model.attention import prepare_shared, restore_attention
from preftune.model.batches import PairBatch, collate_padded, collate_shared
from preftune.model.forward import PaddedLogps, SequenceLogps, SharedPromptLogps, split_pairs
from preftune.model.loading import ModelError
from preftune.model.probe import ProbeReport, check_deterministic, probe_model

__all__ = [
    "Layout",
    "PaddedLayout",
    "SharedPromptLayout",
    "choose_layout",
]

log = logging.getLogger(__name__)


class Layout:
    """Base: see the module docstring. ``name`` is ``"padded"`` or ``"shared_prompt"``."""

    name = ""

    def __init__(
        self,
        *,
        pad_token_id: int,
        chunk_size: int,
        keep_bytes: int = 0,
        extras: Iterable[str] = (),
    ):
        self.pad_token_id = pad_token_id
        self.chunk_size = chunk_size
        self.keep_bytes = keep_bytes  # logprobs.selected_token_logps: the LM head's kept logits
        self.extras = frozenset(extras)  # what the modules compute beside the sums (forward.EXTRAS)
        # Why this layout (fallback reasons), for the log line and the report.
        self.notes: list[str] = []

    def collate(self, examples: Sequence[dict]) -> PairBatch:
        raise NotImplementedError

    def placeholder(self, example: dict) -> PairBatch:
        """A stand-in for an empty share: ``example`` with weight 0, counting no pairs or tokens."""
        return self.collate([example]).as_placeholder()

    def module(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def logps(module: nn.Module, batch: PairBatch) -> SequenceLogps:
        """Run ``module`` (this layout's log-prob module, or a DDP/FSDP wrapper of one) on ``batch``."""
        return split_pairs(*module(**batch.model_inputs()))

    @property
    def chunked_head(self) -> bool:
        return True

    def describe(self) -> str:
        head = "chunked LM head" if self.chunked_head else "full logits"
        text = f"{self.name.replace('_', ' ')} layout, {head}"
        return f"{text} ({'; '.join(self.notes)})" if self.notes else text

    def facts(self) -> dict:
        """What ``report.json`` records about the layout."""
        return {
            "name": self.name,
            "chunked_head": self.chunked_head,
            "extras": sorted(self.extras),
            "notes": list(self.notes),
        }


class PaddedLayout(Layout):
    """Two padded rows per pair."""

    name = "padded"

    def __init__(
        self,
        *,
        pad_token_id: int,
        chunk_size: int,
        keep_bytes: int = 0,
        chunked_head: bool = True,
        padding_side: str = "right",
        extras: Iterable[str] = (),
    ):
        super().__init__(
            pad_token_id=pad_token_id, chunk_size=chunk_size, keep_bytes=keep_bytes, extras=extras
        )
        self._chunked_head = chunked_head
        self.padding_side = padding_side

    @property
    def chunked_head(self) -> bool:
        return self._chunked_head

    def collate(self, examples: Sequence[dict]) -> PairBatch:
        return collate_padded(examples, self.pad_token_id, padding_side=self.padding_side)

    def module(self, model: nn.Module) -> PaddedLogps:
        return PaddedLogps(
            model,
            chunk_size=self.chunk_size,
            keep_bytes=self.keep_bytes,
            chunked_head=self._chunked_head,
            extras=self.extras,
        )


class SharedPromptLayout(Layout):
    """One ``[P | C | R]`` unit per pair, the prompt computed once."""

    name = "shared_prompt"

    def __init__(
        self,
        *,
        pad_token_id: int,
        chunk_size: int,
        attention_layers: int,
        keep_bytes: int = 0,
        extras: Iterable[str] = (),
    ):
        super().__init__(
            pad_token_id=pad_token_id, chunk_size=chunk_size, keep_bytes=keep_bytes, extras=extras
        )
        self.attention_layers = attention_layers

    def collate(self, examples: Sequence[dict]) -> PairBatch:
        return collate_shared(examples, self.pad_token_id)

    def module(self, model: nn.Module) -> SharedPromptLogps:
        prepare_shared(model)
        return SharedPromptLogps(
            model,
            chunk_size=self.chunk_size,
            keep_bytes=self.keep_bytes,
            attention_layers=self.attention_layers,
            extras=self.extras,
        )


def choose_layout(
    model: nn.Module,
    *others: nn.Module,
    pad_token_id: int,
    chunk_size: int,
    keep_bytes: int = 0,
    prefix_sharing: bool | None = None,
    check_determinism: bool = True,
    extras: Iterable[str] = (),
) -> Layout:
    """The run's layout for ``model`` (and ``others`` that must run it too: a separate reference model).

    ``prefix_sharing``: None = shared where the probe proves it exact for every model, True = required (a
    :class:`ModelError` naming the model and the reason when it is not exact), False = padded rows.
    ``check_determinism``: first require equal training-mode forwards (dropout really off).
    ``extras``: what the log-prob modules compute beside the sums (``forward.EXTRAS``: the loss options).
    ``keep_bytes``: the LM head's kept-softmax budget (:func:`preftune.logprobs.selected_token_logps`).
    """
    if check_determinism:
        check_deterministic(model, chunk_size=chunk_size, pad_token_id=pad_token_id)
    report = None
    for m in (model, *others):
        r = probe_model(
            m,
            try_sharing=prefix_sharing is not False,
            chunk_size=chunk_size,
            pad_token_id=pad_token_id,
        )
        if prefix_sharing and not r.sharing:
            raise ModelError(
                f"train.prefix_sharing: true, but {type(unwrap_causal_lm(m)).__name__} cannot share "
                f"the prompt exactly: {r.sharing_note}; set train.prefix_sharing=null (auto) or false"
            )
        report = r if report is None else _combine(report, r)
    assert report is not None
    if not report.sharing:
        for m in (model, *others):
            restore_attention(m)
    layout = _from_report(
        report,
        pad_token_id=pad_token_id,
        chunk_size=chunk_size,
        keep_bytes=keep_bytes,
        extras=extras,
    )
    if prefix_sharing is False:
        layout.notes.append("train.prefix_sharing=false")
    log.info("layout: %s", layout.describe())
    return layout


def _combine(a: ProbeReport, b: ProbeReport) -> ProbeReport:
    """The layout every model can run: shared only if all share, the split head only if all split."""
    return ProbeReport(
        chunked_head=a.chunked_head and b.chunked_head,
        head_note=a.head_note or b.head_note,
        sharing=a.sharing and b.sharing,
        sharing_note=a.sharing_note or b.sharing_note,
        attention_layers=min(a.attention_layers, b.attention_layers),
        max_error={
            k: max(a.max_error.get(k, 0.0), b.max_error.get(k, 0.0))
            for k in {*a.max_error, *b.max_error}
        },
    )


def _from_report(
    report: ProbeReport,
    *,
    pad_token_id: int,
    chunk_size: int,
    keep_bytes: int,
    extras: Iterable[str],
) -> Layout:
    layout: Layout
    if report.sharing:
        layout = SharedPromptLayout(
            pad_token_id=pad_token_id,
            chunk_size=chunk_size,
            keep_bytes=keep_bytes,
            attention_layers=report.attention_layers,
            extras=extras,
        )
    else:
        layout = PaddedLayout(
            pad_token_id=pad_token_id,
            chunk_size=chunk_size,
            keep_bytes=keep_bytes,
            chunked_head=report.chunked_head,
            extras=extras,
        )
        if report.sharing_note:
            layout.notes.append(f"prompt not shared: {report.sharing_note}")
    if report.head_note:
        layout.notes.append(f"full logits: {report.head_note}")
    return layout
