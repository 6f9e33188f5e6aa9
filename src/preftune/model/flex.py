"""The shared-prompt layout in one FlexAttention call per layer (``SegmentPlan(kernel="flex")``).

On a GPU, the per-unit SDPA calls of :mod:`preftune.model.attention` cost a kernel launch each; FlexAttention
runs the whole ``[rows, T]`` layout in one fused call with a block mask built once per batch from the
segments (and shared by every layer), skipping the blocks no query sees. The mask is the segments path's,
in logical positions (sliding windows included); attention soft-caps are a ``score_mod``. Sinks and dropout
are not expressible here: those layers use the segments path. Chosen automatically on CUDA; proven equal to
the padded layout on CPU, where FlexAttention runs unfused (tests/test_model_attention.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["block_mask", "flex_attention"]


def block_mask(plan, window: int | None, device: torch.device):
    """FlexAttention's block mask of ``plan``'s layout (a :class:`preftune.model.attention.SegmentPlan`,
    not imported: attention.py imports this module), built once per plan, window and device.

    In logical positions, as the segments path: key k is visible from query q when both are in the same
    unit, k's logical position is at most q's (and within the window), and k is in the prompt or in q's
    own response (the rejected response never sees the chosen one, nor the chosen the rejected).
    Padding queries see only themselves (their outputs are never read).
    """
    key = ("flex", window, device)
    mask = plan._masks.get(key)
    if mask is not None:
        return mask
    from torch.nn.attention.flex_attention import create_block_mask

    unit = torch.full((plan.rows, plan.length), -1, dtype=torch.long)
    part = torch.zeros((plan.rows, plan.length), dtype=torch.long)
    lpos = torch.zeros((plan.rows, plan.length), dtype=torch.long)
    for i, (row, start, a, b, c) in enumerate(plan.segments):
        unit[row, start : start + a + b + c] = i
        part[row, start + a : start + a + b] = 1
        part[row, start + a + b : start + a + b + c] = 2
        lpos[row, start : start + a + b] = torch.arange(a + b)
        lpos[row, start + a + b : start + a + b + c] = torch.arange(a, a + c)
    unit, part, lpos = unit.to(device), part.to(device), lpos.to(device)

    def visible(b, h, q, kv):
        distance = lpos[b, q] - lpos[b, kv]
        seen = (unit[b, q] == unit[b, kv]) & (unit[b, q] >= 0) & (distance >= 0)
        seen = seen & ((part[b, kv] == 0) | (part[b, kv] == part[b, q]))
        if window is not None:
            seen = seen & (distance < window)
        return seen | (q == kv)

    mask = create_block_mask(
        visible, B=plan.rows, H=None, Q_LEN=plan.length, KV_LEN=plan.length, device=device
    )
    plan._masks[key] = mask
    return mask


def flex_attention(
    plan,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scaling: float,
    window: int | None,
    softcap: float | None,
) -> Tensor:
    """``[rows, T, Hq, Dv]``: the whole layout in one FlexAttention call (soft-cap as a score_mod)."""
    flex = _compiled() if query.device.type == "cuda" else _eager()

    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, q, kv):
            return torch.tanh(score / softcap) * softcap

    out = flex(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=block_mask(plan, window, query.device),
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous()


_COMPILED = None


def _eager():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _compiled():
    """FlexAttention compiled once (dynamic shapes: batches differ in length): without compilation it runs
    an unfused reference that materialises the whole score matrix."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_eager(), dynamic=True)
    return _COMPILED
