"""Per-segment attention for the shared-prompt layout, routed through transformers' AttentionInterface.

A row holds one or more *units* laid out back to back, each ``[A | B | C]`` (lengths ``a, b, c``):

* ``[A | B]`` is ordinary causal attention (the prompt, then the chosen response);
* ``C`` attends to ``A`` and causally to itself, never to ``B`` (the rejected response after the prompt).

Tokens outside every unit are padding; their outputs are zeros and nothing reads them.

Per unit there are two attention calls: the ``[A | B]`` queries against themselves, and the ``C`` queries
against ``[A ; C]``. The mask of a call is written in *logical* positions (the prompt ``0..a-1``, both
responses from ``a``), which is what makes the model-specific terms exact:

* a **sliding window** ``W`` (Mistral, Gemma 2/3, GPT-OSS): key ``k`` is visible from query ``q`` when
  ``k <= q`` and ``q - k < W`` (transformers' ``sliding_window_overlay``), so the rejected tokens see exactly
  the prompt tokens they would see in their own padded row;
* **attention soft-capping** (Gemma 2: ``softcap * tanh(s / softcap)`` on the scores) and **attention sinks**
  (GPT-OSS: one learned logit per head in the softmax denominator, ``s_aux``) run in an eager piece, the
  same arithmetic as the models' own eager attention; everything else runs in SDPA (flash kernels on CPU).

The function is registered in ``transformers.AttentionInterface`` under :func:`attention_name` of the
implementation the model had (``preftune_segments`` over SDPA, ``preftune_segments_eager`` over eager, ...).
Calls that carry no plan (generation, padded batches, a probe) are delegated to that original implementation
with its own mask builder, so the switched model behaves exactly as before for everyone else — sinks and
soft-caps included. While a planned forward runs, mask building is skipped (:func:`skip_mask_creation`): HF
would otherwise read the restarting position ids as packed sequences and build a mask we ignore.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from preftune.model.arch import unwrap_causal_lm

__all__ = [
    "ATTENTION_PREFIX",
    "KERNELS",
    "PLAN_KWARG",
    "SegmentPlan",
    "attention_name",
    "base_implementation",
    "prepare_shared",
    "register_segment_attention",
    "restore_attention",
    "skip_mask_creation",
]

ATTENTION_PREFIX = "preftune_segments"
#: How a planned layer computes the layout (:class:`SegmentPlan`'s ``kernel``).
KERNELS = ("segments", "flex")
#: Keyword argument carrying the :class:`SegmentPlan` from the decoder call down to every attention layer.
PLAN_KWARG = "preftune_plan"

_SKIP_MASK: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "preftune_skip_mask", default=False
)
_REGISTERED: set[str] = set()

# Attention kwargs that carry nothing the planned path must reproduce (caches are off, positions are
# already applied to q/k by the rotary embedding before the call).
_IGNORED_KWARGS = frozenset(
    {
        "position_ids",
        "use_cache",
        "cache",
        "past_key_values",
        "cache_position",
        "output_attentions",
        "layer_idx",
        "is_causal",
    }
)


def attention_name(base: str) -> str:
    """The registered name of per-segment attention over the ``base`` implementation."""
    return ATTENTION_PREFIX if base == "sdpa" else f"{ATTENTION_PREFIX}_{base}"


def base_implementation(name: str | None) -> str | None:
    """The original implementation behind a registered name (None when ``name`` is not ours)."""
    if not name or not name.startswith(ATTENTION_PREFIX):
        return None
    return name[len(ATTENTION_PREFIX) + 1 :] or "sdpa"


@dataclass(frozen=True)
class _Piece:
    """A run of query positions ``[start, end)`` of one row and how it attends.

    ``kind``: ``"self"`` (keys = the same span, causal), ``"after_prefix"`` (the ``C`` queries: keys = the
    prefix span then the same span) or ``"pad"`` (no attention; zeros).
    """

    start: int
    end: int
    kind: str
    prefix: tuple[int, int] = (0, 0)  # the A span for "after_prefix"


class SegmentPlan:
    """Attention layout of one batch, shared by all layers of one forward.

    Args:
        segments: rows of ``(row, start, a, b, c)`` (see the module docstring).
        rows, length: the batch's ``[rows, length]`` shape.
        kernel: ``"segments"`` (per-unit SDPA calls) or ``"flex"`` (one FlexAttention call per layer with a
            block mask built once from the segments: fewer, fused kernel launches on a GPU); ``"auto"``
            picks flex on CUDA and segments elsewhere. Layers FlexAttention cannot reproduce (attention
            sinks, dropout) use the segments path.
    """

    def __init__(self, segments: list[list[int]], rows: int, length: int, kernel: str = "segments"):
        if kernel not in KERNELS:
            raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.rows, self.length = rows, length
        self.segments = [tuple(int(x) for x in seg) for seg in segments]
        self.routed: set[int] = set()  # ids of the attention modules that used this plan
        self._masks: dict[tuple, Tensor] = {}
        per_row: list[list[tuple[int, int, int, int]]] = [[] for _ in range(rows)]
        for seg in self.segments:
            if len(seg) != 5:
                raise ValueError(f"a segment is (row, start, a, b, c), got {seg}")
            row, start, a, b, c = seg
            if not 0 <= row < rows or start < 0 or min(a, b, c) < 0 or start + a + b + c > length:
                raise ValueError(f"segment {seg} does not fit a [{rows}, {length}] batch")
            per_row[row].append((start, a, b, c))
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
                    pieces.append(_Piece(start, start + a + b, "self"))
                if c:
                    s = start + a + b
                    kind = "after_prefix" if a else "self"  # no prefix: C attends only to itself
                    pieces.append(_Piece(s, s + c, kind, (start, start + a)))
                pos = start + a + b + c
            if pos < length:
                pieces.append(_Piece(pos, length, "pad"))
            self.pieces.append(pieces)

    def mask(self, piece: _Piece, window: int | None, device: torch.device) -> Tensor | None:
        """``[q, kv]`` boolean mask of a piece in logical positions; None = plain causal (no window)."""
        q_len = piece.end - piece.start
        a = piece.prefix[1] - piece.prefix[0] if piece.kind == "after_prefix" else 0
        if a == 0 and window is None:
            return None
        key = (q_len, a, window, device)
        mask = self._masks.get(key)
        if mask is None:
            q_pos = torch.arange(a, a + q_len, device=device)  # [q]
            k_pos = torch.arange(a + q_len, device=device)  # [kv]: prefix 0..a-1, then the piece
            distance = q_pos[:, None] - k_pos[None, :]  # [q, kv]
            mask = distance >= 0
            if window is not None:
                mask &= distance < window
            self._masks[key] = mask
        return mask


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _eager_piece(
    q: Tensor,  # [1, Hq, q, D]
    k: Tensor,  # [1, Hq, kv, D] (K/V already repeated for GQA)
    v: Tensor,  # [1, Hq, kv, Dv]
    mask: Tensor,  # [q, kv] bool
    scaling: float,
    softcap: float | None,
    sinks: Tensor | None,  # [Hq]
    dropout: float,
) -> Tensor:
    """Attention as the models' own eager functions compute it (soft-cap, then mask, then sinks)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [1, Hq, q, kv]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
        logits = torch.cat([scores, sink], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)[..., :-1]  # the sink takes mass, contributes no value
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs.to(v.dtype), v)  # [1, Hq, q, Dv]


def _planned_attention(
    plan: SegmentPlan,
    query: Tensor,  # [rows, Hq, T, D]
    key: Tensor,  # [rows, Hkv, T, D]
    value: Tensor,  # [rows, Hkv, T, Dv]
    *,
    dropout: float,
    scaling: float | None,
    window: int | None,
    softcap: float | None,
    sinks: Tensor | None,
) -> Tensor:
    """``[rows, T, Hq, Dv]`` attention output of the plan's layout."""
    rows, hq, length, d = query.shape
    if (rows, length) != (plan.rows, plan.length):
        raise ValueError(
            f"batch shape [{rows}, {length}] does not match the segment plan [{plan.rows}, {plan.length}]"
        )
    scaling = d**-0.5 if scaling is None else scaling
    if plan.kernel == "flex" and sinks is None and not dropout:
        from preftune.model.flex import flex_attention

        return flex_attention(
            plan, query, key, value, scaling=scaling, window=window, softcap=softcap
        )
    eager = softcap is not None or sinks is not None
    n_rep = hq // key.shape[1]
    gqa = {}
    if n_rep > 1:
        if query.device.type == "cpu" and not eager:  # CPU SDPA does GQA in-kernel (faster)
            gqa = {"enable_gqa": True}
        else:  # CUDA kernels with a mask, and the eager path, need repeated K/V
            key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    dv = value.shape[-1]
    row_outs = []
    for r in range(rows):
        q_r, k_r, v_r = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        outs = []
        for p in plan.pieces[r]:
            if p.kind == "pad":
                outs.append(query.new_zeros(1, hq, p.end - p.start, dv))
                continue
            q = q_r[:, :, p.start : p.end]
            if p.kind == "after_prefix":
                a0, a1 = p.prefix
                k = torch.cat([k_r[:, :, a0:a1], k_r[:, :, p.start : p.end]], dim=2)
                v = torch.cat([v_r[:, :, a0:a1], v_r[:, :, p.start : p.end]], dim=2)
            else:
                k, v = k_r[:, :, p.start : p.end], v_r[:, :, p.start : p.end]
            mask = plan.mask(p, window, query.device)
            if eager:
                if mask is None:
                    mask = plan.mask(p, length + 1, query.device)  # causal (a window never bites)
                outs.append(_eager_piece(q, k, v, mask, scaling, softcap, sinks, dropout))
            else:
                outs.append(
                    F.scaled_dot_product_attention(
                        q,
                        k,
                        v,
                        attn_mask=mask,
                        dropout_p=dropout,
                        is_causal=mask is None,
                        scale=scaling,
                        **gqa,
                    )
                )
        row_outs.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    out = row_outs[0] if rows == 1 else torch.cat(row_outs, dim=0)
    return out.transpose(1, 2).contiguous()  # [rows, T, Hq, Dv], as HF attention functions return


def _delegate(module: nn.Module, base: str):
    """The model's original attention function for calls without a plan."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base != "eager" and base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"{type(module).__name__}: no eager attention function to delegate to from {ATTENTION_PREFIX}"
        )
    return eager


def segment_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    base: str = "sdpa",
    **kwargs,
) -> tuple[Tensor, None]:
    """An ``AttentionInterface`` function: planned per-segment attention, or the base implementation."""
    plan = kwargs.pop(PLAN_KWARG, None)
    if plan is None:
        fn = _delegate(module, base)
        return fn(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    window = kwargs.pop("sliding_window", None)
    softcap = kwargs.pop("softcap", None)
    sinks = kwargs.pop("s_aux", None)
    for name, value_ in kwargs.items():
        if name in _IGNORED_KWARGS or value_ is None or value_ is False:
            continue
        raise ValueError(
            f"{ATTENTION_PREFIX} cannot reproduce the attention argument {name}={value_!r} "
            f"of {type(module).__name__}"
        )
    plan.routed.add(id(module))
    out = _planned_attention(
        plan,
        query,
        key,
        value,
        dropout=dropout,
        scaling=scaling,
        window=None if window is None else int(window),
        softcap=None if softcap is None else float(softcap),
        sinks=sinks,
    )
    return out, None


def _segment_mask(*args, base: str, **kwargs):
    """Mask builder under our names: none while a planned forward runs, else the base's own mask."""
    if _SKIP_MASK.get():
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base, sdpa_mask)
    return fn(*args, **kwargs)


@contextlib.contextmanager
def skip_mask_creation() -> Iterator[None]:
    """Within: HF's mask builders return None for models switched to per-segment attention."""
    token = _SKIP_MASK.set(True)
    try:
        yield
    finally:
        _SKIP_MASK.reset(token)


def register_segment_attention(base: str = "sdpa") -> str:
    """Register per-segment attention over ``base`` with transformers (idempotent); its name."""
    name = attention_name(base)
    if name in _REGISTERED:
        return name
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, functools.partial(segment_attention_forward, base=base))
    AttentionMaskInterface.register(name, functools.partial(_segment_mask, base=base))
    _REGISTERED.add(name)
    return name


def prepare_shared(model: nn.Module) -> str:
    """Switch the model's attention to per-segment routing over its current implementation; that base."""
    lm = unwrap_causal_lm(model)
    current = lm.config._attn_implementation or "eager"
    base = base_implementation(current) or current
    name = register_segment_attention(base)
    if current != name:
        lm.set_attn_implementation(name)
        if lm.config._attn_implementation != name:
            raise ValueError(
                f"{type(lm).__name__} does not route attention through transformers' AttentionInterface"
            )
    return base


def restore_attention(model: nn.Module) -> None:
    """Undo :func:`prepare_shared`: the model's attention back to the implementation it had."""
    lm = unwrap_causal_lm(model)
    base = base_implementation(lm.config._attn_implementation)
    if base is not None:
        lm.set_attn_implementation(base)
