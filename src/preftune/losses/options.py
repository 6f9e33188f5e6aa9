"""Per-loss options as pure functions: WPO pair weights and LD-DPO length-desensitised log-probs.

WPO (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", arXiv 2406.11827, §3)
re-weights each pair of off-policy data by how likely the current policy is to generate it:
``w = w(y_w) · w(y_l)``, detached, applied as ``out.reduce(weights=w)``. A response's weight is its
length-normalised probability, ``w(y) = exp(ā(y))``, ``ā = logp / max(n, 1)`` (the paper's starting point),
or, with the paper's *sampled* weight alignment (its default), each token's probability is divided by the
policy's collision probability ``Σ_v π_θ(v | x, y_<t)²``, the expected probability of a sampled token, so
that an on-policy sample weighs about 1 and the peakedness of the policy cancels out:
``log w(y) = (Σ_t [log π_θ(y_t | …) − log Σ_v π_θ(v | …)²]) / max(n, 1)``. TRL's ``use_weighting`` computes
the same aligned weight (and cites the paper's Eq. 2) but clamps the pair weight at 1 and divides by the
raw token count (NaN for an empty response); this one does not clamp.

LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization", arXiv 2409.06411, §3)
splits a pair's longer response at ℓ_s = min(n_w, n_l), the shorter one's length ("public" length): its
log-prob becomes ``Σ_{t ≤ ℓ_s} log π(y_t) + α Σ_{t > ℓ_s} log π(y_t)``, 0 ≤ α ≤ 1 (α = 1 is DPO); the shorter
response is unchanged (its tail is empty). TRL applies this to the policy's log-probs only
(``not is_ref_model``); applied to both policy and reference, a pair's log-ratio is still 0 at the
reference. Which of the two the paper's equation prescribes is the trainer's decision (see the report).
"""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.losses.core import _average, _number, _upcast

__all__ = ["ld_logps", "ld_split", "public_tokens", "wpo_weights"]


def wpo_weights(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    chosen_log_collision: Tensor | None = None,
    rejected_log_collision: Tensor | None = None,
) -> Tensor:
    """WPO pair weights ``exp(ā_w + ā_l)``, detached (Zhou et al. 2024, arXiv 2406.11827, §3).

    Computed in log space: ``ā = (logp − c) / max(n, 1)`` and one ``exp`` of the sum, which is ≤ 1 without
    alignment (``ā ≤ 0``) and ≤ V² with it (``−c/n ≤ log V``): never overflows.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed response log-probs of the POLICY.
        chosen_tokens, rejected_tokens: ``[B]`` response token counts.
        chosen_log_collision, rejected_log_collision: ``[B]`` sums over the same response tokens of
            ``log Σ_v π_θ(v | x, y_<t)²`` (per position ``logsumexp(2·logits) − 2·logsumexp(logits)``),
            for the paper's sampled alignment; both or neither (None: plain length-normalised weights).

    Returns:
        ``[B]`` detached weights, for ``LossOutput.reduce(weights=...)``.
    """
    if (chosen_log_collision is None) != (rejected_log_collision is None):
        raise ValueError(
            "wpo_weights: pass both chosen_log_collision and rejected_log_collision, or neither"
        )
    with torch.no_grad():
        chosen, rejected = _upcast(policy_chosen_logps), _upcast(policy_rejected_logps)
        if chosen_log_collision is not None and rejected_log_collision is not None:
            chosen = chosen - _upcast(chosen_log_collision)
            rejected = rejected - _upcast(rejected_log_collision)
        return torch.exp(_average(chosen, chosen_tokens) + _average(rejected, rejected_tokens))


def public_tokens(chosen_tokens: Tensor, rejected_tokens: Tensor) -> Tensor:
    """LD-DPO's public length ℓ_s = min(n_w, n_l) of each pair, ``[B]``."""
    return torch.minimum(chosen_tokens, rejected_tokens)


def ld_split(token_logps: Tensor, response_mask: Tensor, public: Tensor) -> tuple[Tensor, Tensor]:
    """``(prefix, tail)`` sums of per-token log-probs: a response's first ``public`` tokens, and the rest.

    Args:
        token_logps: ``[R, T]`` per-token log-probs of the labels, already aligned with ``response_mask``
            (the shifted labels' positions, as :mod:`preftune.logprobs` produces them).
        response_mask: ``[R, T]`` bool, True on response tokens (prompt and padding False).
        public: ``[R]`` ℓ_s of the pair each row belongs to (:func:`public_tokens`).

    ``prefix + tail`` is the usual summed log-prob. Counts positions within the response (not the sequence).
    """
    mask = response_mask.bool()
    position = torch.cumsum(mask.long(), dim=-1)  # 1-based index within the response
    head = mask & (position <= public.unsqueeze(-1))
    zero = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    prefix = torch.where(head, token_logps, zero).sum(-1)
    tail = torch.where(mask & ~head, token_logps, zero).sum(-1)
    return prefix, tail


def ld_logps(prefix_logps: Tensor, tail_logps: Tensor, alpha: float) -> Tensor:
    """LD-DPO log-prob ``prefix + α · tail`` (Liu et al. 2024, arXiv 2409.06411, §3).

    Args:
        prefix_logps: ``[B]`` sums over each response's first ℓ_s = min(n_w, n_l) tokens.
        tail_logps: ``[B]`` sums over the remaining tokens (0 for the shorter response of a pair).
        alpha: α ∈ [0, 1], the weight of the tail beyond the public length; 1 gives back the plain sum.
    """
    alpha = _number("ld_alpha", alpha, "ld_logps")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_logps: ld_alpha must be in [0, 1], got {alpha!r}")
    return _upcast(prefix_logps) + alpha * _upcast(tail_logps)
