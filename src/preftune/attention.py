"""Per-segment attention for prefix-shared and packed rows, routed through transformers' AttentionInterface.

A row holds one or more *units* laid out back to back, each ``[A | B | C]`` (lengths ``a, b, c``):

* ``[A | B]`` is ordinary causal attention (the prompt, then the chosen response);
* ``C`` attends to ``A`` and causally to itself, never to ``B`` (the rejected response after the prompt).

A prefix-shared pair is one unit ``(prompt, chosen, rejected)``; a plain packed sequence is ``(tokens, 0, 0)``
or ``(prompt, response, 0)``. Tokens outside every unit are padding and attend to nothing that matters.

Two exact ways to run it (``mode``):

* ``"segments"`` (default): per unit, one SDPA call with ``is_causal=True`` over ``[A | B]`` (4-D inputs:
  the flash-CPU kernel) and one call of the ``C`` queries against ``[A ; C]`` keys/values with a
  lower-right causal boolean mask. Work is ``O((a+b)^2 / 2 + c (a+c))`` per unit, nothing across units.
* ``"dense"``: one SDPA call per layer with a dense ``[rows, 1, T, T]`` boolean mask (``O(T^2)`` per row,
  no block skipping): simple but slower, kept for comparison (``bench/bench_sharing.py``).

The function is registered as ``"preftune_segments"`` in ``transformers.AttentionInterface``; the model's
``config._attn_implementation`` is switched to it once. Calls that carry no plan (generation, ordinary padded
batches) are delegated to transformers' SDPA attention with the usual SDPA mask (the mask builder registered
under the same name is ``sdpa_mask``), so the model behaves exactly as with ``attn_implementation="sdpa"``.
While a planned forward runs, mask building is skipped (:func:`skip_mask_creation`): HF would otherwise detect
the restarting position ids as packed sequences and build a ``[rows, 1, T, T]`` mask that we ignore.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATTENTION_NAME",
    "PLAN_KWARG",
    "SegmentPlan",
    "register_segment_attention",
    "skip_mask_creation",
]

ATTENTION_NAME = "preftune_segments"
#: Keyword argument carrying the :class:`SegmentPlan` from the decoder call down to every attention layer.
PLAN_KWARG = "preftune_plan"
MODES = ("segments", "dense")

_SKIP_MASK: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "preftune_skip_mask", default=False
)
_REGISTERED = False

# Attention kwargs that may reach us and are harmless when None/False (or, for the ones named, checked below).
_IGNORED_KWARGS = frozenset(
    {"position_ids", "use_cache", "cache", "past_key_values", "output_attentions", "layer_idx"}
)


@dataclass(frozen=True)
class _Piece:
    """A run of query positions ``[start, end)`` of one row and how it attends."""

    start: int
    end: int
    kind: str  # "causal": keys = same span, is_causal; "lower_right": keys = kv spans; "pad": zeros
    kv: tuple[tuple[int, int], ...] = ()

    @property
    def kv_len(self) -> int:
        return sum(e - s for s, e in self.kv)


class SegmentPlan:
    """Attention layout of one batch, shared by all layers of one forward.

    Args:
        segments: rows of ``(row, start, a, b, c)`` (see the module docstring).
        rows, length: the batch's ``[rows, length]`` shape.
        mode: ``"segments"`` or ``"dense"``.
    """

    def __init__(self, segments: list[list[int]], rows: int, length: int, mode: str = "segments"):
        if mode not in MODES:
            raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
        self.rows, self.length, self.mode = rows, length, mode
        self.segments = [tuple(int(x) for x in seg) for seg in segments]
        self.routed: set[int] = set()  # ids of the attention modules that used this plan
        self._masks: dict[tuple, Tensor] = {}
        per_row: list[list[tuple[int, int, int, int]]] = [[] for _ in range(rows)]
        self.max_span = 0
        for seg in self.segments:
            if len(seg) != 5:
                raise ValueError(f"a segment is (row, start, a, b, c), got {seg}")
            row, start, a, b, c = seg
            if not 0 <= row < rows or start < 0 or min(a, b, c) < 0 or start + a + b + c > length:
                raise ValueError(f"segment {seg} does not fit a [{rows}, {length}] batch")
            per_row[row].append((start, a, b, c))
            self.max_span = max(self.max_span, a + b, a + c)
        self.pieces: list[list[_Piece]] = []
        for row, units in enumerate(per_row):
            pieces: list[_Piece] = []
            pos = 0
            for start, a, b, c in sorted(units):
                if start < pos:
                    raise ValueError(f"segments overlap in row {row} at position {start}")
                if start > pos:
                    pieces.append(_Piece(pos, start, "pad"))
                if a + b:
                    pieces.append(_Piece(start, start + a + b, "causal"))
                if c:
                    s = start + a + b
                    if a:
                        kv = ((start, start + a), (s, s + c))
                        pieces.append(_Piece(s, s + c, "lower_right", kv))
                    else:  # no prefix: C attends only to itself
                        pieces.append(_Piece(s, s + c, "causal"))
                pos = start + a + b + c
            if pos < length:
                pieces.append(_Piece(pos, length, "pad"))
            self.pieces.append(pieces)

    def lower_right_mask(self, q_len: int, kv_len: int, device: torch.device) -> Tensor:
        """``[q_len, kv_len]`` boolean: query ``i`` sees keys ``j <= kv_len - q_len + i``."""
        key = ("lr", q_len, kv_len, device)
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
            self._masks[key] = mask
        return mask

    def dense_mask(self, device: torch.device) -> Tensor:
        """``[rows, 1, T, T]`` boolean mask of the whole layout (padding queries see only themselves)."""
        key = ("dense", device)
        mask = self._masks.get(key)
        if mask is not None:
            return mask
        unit = torch.full((self.rows, self.length), -1, dtype=torch.long)
        part = torch.zeros((self.rows, self.length), dtype=torch.long)
        for i, (row, start, a, b, c) in enumerate(self.segments):
            unit[row, start : start + a + b + c] = i
            part[row, start + a : start + a + b] = 1
            part[row, start + a + b : start + a + b + c] = 2
        same = (unit[:, :, None] == unit[:, None, :]) & (unit[:, :, None] >= 0)
        causal = torch.ones(self.length, self.length, dtype=torch.bool).tril()
        skip_b = (part[:, :, None] == 2) & (part[:, None, :] == 1)  # C must not see B
        mask = (same & causal & ~skip_b) | torch.eye(self.length, dtype=torch.bool)
        mask = mask.unsqueeze(1).to(device)
        self._masks[key] = mask
        return mask


def _check_kwargs(plan: SegmentPlan, kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name in _IGNORED_KWARGS or value is None or value is False:
            continue
        if name == "is_causal" and value is True:
            continue
        if name == "sliding_window" and int(value) >= plan.max_span:
            continue  # the window never bites inside any segment
        raise ValueError(
            f"{ATTENTION_NAME} attention cannot reproduce the model's attention argument "
            f"{name}={value!r} (soft-capped, sliding-window shorter than a sequence, sinks, ...): "
            "use the padded two-row path (train.prefix_sharing: false) for this model"
        )


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _planned_attention(
    plan: SegmentPlan, query: Tensor, key: Tensor, value: Tensor, dropout: float, scaling
) -> Tensor:
    """``[rows, T, Hq, Dv]`` attention output of the plan's layout."""
    rows, hq, length, _ = query.shape
    n_rep = hq // key.shape[1]
    gqa = {}
    if n_rep > 1:
        if query.device.type == "cpu":  # CPU SDPA handles GQA in-kernel (faster than repeating K/V)
            gqa = {"enable_gqa": True}
        else:  # CUDA kernels with a mask need repeated K/V
            key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    if (rows, length) != (plan.rows, plan.length):
        raise ValueError(
            f"batch shape [{rows}, {length}] does not match the segment plan [{plan.rows}, {plan.length}]"
        )
    if plan.mode == "dense":
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=plan.dense_mask(query.device),
            dropout_p=dropout,
            scale=scaling,
            **gqa,
        )
        return out.transpose(1, 2).contiguous()
    dv = value.shape[-1]
    row_outs = []
    for r in range(rows):
        q_r, k_r, v_r = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        outs = []
        for p in plan.pieces[r]:
            if p.kind == "pad":
                outs.append(query.new_zeros(1, hq, p.end - p.start, dv))
            elif p.kind == "causal":
                outs.append(
                    F.scaled_dot_product_attention(
                        q_r[:, :, p.start : p.end],
                        k_r[:, :, p.start : p.end],
                        v_r[:, :, p.start : p.end],
                        dropout_p=dropout,
                        is_causal=True,
                        scale=scaling,
                        **gqa,
                    )
                )
            else:
                kk = torch.cat([k_r[:, :, s:e] for s, e in p.kv], dim=2)
                vv = torch.cat([v_r[:, :, s:e] for s, e in p.kv], dim=2)
                mask = plan.lower_right_mask(p.end - p.start, p.kv_len, query.device)
                outs.append(
                    F.scaled_dot_product_attention(
                        q_r[:, :, p.start : p.end],
                        kk,
                        vv,
                        attn_mask=mask,
                        dropout_p=dropout,
                        scale=scaling,
                        **gqa,
                    )
                )
        row_outs.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    out = row_outs[0] if rows == 1 else torch.cat(row_outs, dim=0)
    return out.transpose(1, 2).contiguous()  # [rows, T, Hq, Dv], as HF attention functions return


def segment_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """An ``AttentionInterface`` function: planned per-segment attention, or plain SDPA without a plan."""
    plan = kwargs.pop(PLAN_KWARG, None)
    if plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _check_kwargs(plan, kwargs)
    plan.routed.add(id(module))
    return _planned_attention(plan, query, key, value, dropout, scaling), None


def _segment_mask(*args, **kwargs):
    """Mask builder under our name: none while a planned forward runs, else exactly the SDPA mask."""
    if _SKIP_MASK.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


@contextlib.contextmanager
def skip_mask_creation() -> Iterator[None]:
    """Within: HF's mask builders return None for models switched to :data:`ATTENTION_NAME`."""
    token = _SKIP_MASK.set(True)
    try:
        yield
    finally:
        _SKIP_MASK.reset(token)


def register_segment_attention() -> None:
    """Register :data:`ATTENTION_NAME` with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, segment_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _segment_mask)
    _REGISTERED = True
