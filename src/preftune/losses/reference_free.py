"""Losses that need no reference: ``simpo`` and ``orpo`` on length averages ``ā = logp / max(n, 1)``, and the
``sft`` (NLL) term added to other losses (RPO, CPO). Inputs and hyperparameters: :mod:`preftune.losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.core import (
    LossOutput,
    _average,
    _log1mexp,
    _log_ratios,
    _non_negative,
    _output,
    _positive,
    _upcast,
)

__all__ = ["orpo", "sft", "simpo"]


def simpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
) -> LossOutput:
    """SimPO (reference-free): ``−log σ(β (ā_w − ā_l) − γ)`` with ``γ = gamma_beta_ratio · β``.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward".
    ``ā = logp / max(n, 1)``; reference log-probs, if given, are ignored.

    Args:
        beta: β, scale of the length-averaged reward. Default 2.0 (paper: 2.0–2.5, up to 10).
        gamma_beta_ratio: γ/β ≥ 0, the target reward margin as a fraction of β. Default 0.5 (range 0–1).
    """
    beta = _positive("beta", beta, "simpo")
    ratio = _non_negative("gamma_beta_ratio", gamma_beta_ratio, "simpo")
    avg_w = _average(policy_chosen_logps, chosen_tokens)
    avg_l = _average(policy_rejected_logps, rejected_tokens)
    losses = -F.logsigmoid(beta * (avg_w - avg_l) - ratio * beta)
    return _output(losses, beta * avg_w, beta * avg_l, chosen_tokens)


def orpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
    orpo_lambda: float = 0.1,
) -> LossOutput:
    """ORPO (reference-free): ``NLL(y_w) + λ · (−log σ(log_odds))``.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model".
    ``log_odds = (ā_w − ā_l) − (log1mexp(ā_w) − log1mexp(ā_l))`` is the log odds ratio of the
    length-averaged probabilities, computed in fp32 with a stable ``log1mexp``. The NLL term (weight 1) is
    returned as ``token_losses = −logp(y_w)`` (a sum), so the reduction makes it a token mean over the
    batch's chosen tokens; ``losses`` holds ``λ · (−log σ(log_odds))``.

    Args:
        beta: β, used only for the logged rewards ``β·ā``. Default 0.1.
        orpo_lambda: λ ≥ 0, the weight of the odds-ratio term. Default 0.1.
    """
    beta = _positive("beta", beta, "orpo")
    lam = _non_negative("orpo_lambda", orpo_lambda, "orpo")
    avg_w = _average(policy_chosen_logps, chosen_tokens)
    avg_l = _average(policy_rejected_logps, rejected_tokens)
    log_odds = (avg_w - avg_l) - (_log1mexp(avg_w) - _log1mexp(avg_l))
    losses = lam * -F.logsigmoid(log_odds)
    token_losses = -_upcast(policy_chosen_logps)
    return _output(losses, beta * avg_w, beta * avg_l, chosen_tokens, token_losses)


def sft(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """SFT / NLL term: token-mean negative log-likelihood of the chosen responses.

    Used as an added term: ``[sigmoid, sft]`` with weights ``[1, α]`` is RPO (Pang et al. 2024), and CPO
    adds it too. Returned as ``token_losses = −logp(y_w)`` (a per-pair sum; the reduction divides by the
    total chosen tokens) and ``losses = 0``.

    Args:
        beta: β, used only for the logged rewards when reference log-probs are given
            (``β·(logp_θ − logp_ref)``); without them the rewards are the averages ``ā``. Default 0.1.
    """
    beta = _positive("beta", beta, "sft")
    token_losses = -_upcast(policy_chosen_logps)
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        r_w, r_l = _log_ratios(
            "sft", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
        )
        chosen_rewards, rejected_rewards = beta * r_w, beta * r_l
    else:
        chosen_rewards = _average(policy_chosen_logps, chosen_tokens)
        rejected_rewards = _average(policy_rejected_logps, rejected_tokens)
    return _output(
        torch.zeros_like(token_losses),
        chosen_rewards,
        rejected_rewards,
        chosen_tokens,
        token_losses,
    )
