"""More losses on the log-ratios against a reference (``r_w``, ``r_l``, ``h = r_w − r_l`` as in
:mod:`~preftune.losses.dpo_family`): the ones that score each response's log-ratio on its own (``bco_pair``,
``nca_pair``, ``sppo_hard``, ``apo_zero``, ``apo_down``) and the alternatives to DPO's logistic loss on ``h``
(``exo_pair``, ``discopop``). Inputs and hyperparameters: :mod:`preftune.losses`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.core import LossOutput, _log_ratios, _number, _output, _positive

__all__ = [
    "apo_down",
    "apo_zero",
    "bco_pair",
    "discopop",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
]


def bco_pair(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """Paired BCO: ``−log σ(β r_w) − log σ(−β r_l)`` (each response classified on its own).

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment".
    (No running reward-mean shift: docs/FORMULAS.md "The DPO family".)

    Args:
        beta: β, scale of the implicit reward. Default 0.1.
    """
    beta = _positive("beta", beta, "bco_pair")
    r_w, r_l = _log_ratios(
        "bco_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = -F.logsigmoid(beta * r_w) - F.logsigmoid(-beta * r_l)
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def nca_pair(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """Paired NCA: ``−log σ(β r_w) − ½ log σ(−β r_w) − ½ log σ(−β r_l)``.

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards".

    Args:
        beta: β, scale of the implicit reward. Default 0.1.
    """
    beta = _positive("beta", beta, "nca_pair")
    r_w, r_l = _log_ratios(
        "nca_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (
        -F.logsigmoid(beta * r_w)
        - 0.5 * F.logsigmoid(-beta * r_w)
        - 0.5 * F.logsigmoid(-beta * r_l)
    )
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def sppo_hard(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """SPPO with hard labels: ``(r_w − 1/(2β))² + (r_l + 1/(2β))²`` (summed log-ratios).

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment".

    Args:
        beta: β; the targets for the chosen/rejected log-ratios are ±1/(2β). Default 0.1.
    """
    beta = _positive("beta", beta, "sppo_hard")
    r_w, r_l = _log_ratios(
        "sppo_hard",
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
    )
    target = 1.0 / (2.0 * beta)
    losses = (r_w - target) ** 2 + (r_l + target) ** 2
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def apo_zero(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """APO-zero: ``(1 − σ(β r_w)) + σ(β r_l)`` (push chosen likelihood up, rejected down).

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", Eq. 7.
    Computed as ``σ(−β r_w) + σ(β r_l)``.

    Args:
        beta: β, scale of the implicit reward. Default 0.1.
    """
    beta = _positive("beta", beta, "apo_zero")
    r_w, r_l = _log_ratios(
        "apo_zero", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.sigmoid(-beta * r_w) + torch.sigmoid(beta * r_l)
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def apo_down(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """APO-down: ``σ(β r_w) + (1 − σ(β h))`` (push both down, rejected more).

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", Eq. 8.
    Computed as ``σ(β r_w) + σ(−β h)``.

    Args:
        beta: β, scale of the implicit reward. Default 0.1.
    """
    beta = _positive("beta", beta, "apo_down")
    r_w, r_l = _log_ratios(
        "apo_down", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.sigmoid(beta * r_w) + torch.sigmoid(-beta * (r_w - r_l))
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def exo_pair(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
    exo_epsilon: float = 1e-3,
) -> LossOutput:
    """Paired EXO: ``σ(βh)(log σ(βh) − log(1−ε)) + σ(−βh)(log σ(−βh) − log ε)``.

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16: the KL
    divergence from the model's pair distribution ``(σ(βh), σ(−βh))`` to the target ``(1−ε, ε)``; zero
    at ``σ(βh) = 1 − ε``. ``log σ`` is computed with ``logsigmoid``.

    Args:
        beta: β, scale of the implicit reward. Default 0.1.
        exo_epsilon: ε ∈ (0, 1), the target probability of the rejected response. Default 1e-3.
    """
    beta = _positive("beta", beta, "exo_pair")
    eps = _number("exo_epsilon", exo_epsilon, "exo_pair")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair: exo_epsilon must be in (0, 1), got {eps!r}")
    r_w, r_l = _log_ratios(
        "exo_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z = beta * (r_w - r_l)
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def discopop(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): ``(1 − m)(−log σ(z)) + m e^{−z}``, ``z = βh``, ``m = σ(z/τ)``.

    Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models". Computed in the stable form ``−log σ(z) · σ(−z/τ) + exp(log σ(z/τ) − z)``.

    Args:
        beta: β, scale of the implicit reward. Default 0.1.
        discopop_tau: τ > 0, temperature of the sigmoid mixing the logistic and exponential losses.
            Default 0.05.
    """
    beta = _positive("beta", beta, "discopop")
    tau = _positive("discopop_tau", discopop_tau, "discopop")
    r_w, r_l = _log_ratios(
        "discopop", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z = beta * (r_w - r_l)
    losses = -F.logsigmoid(z) * torch.sigmoid(-z / tau) + torch.exp(F.logsigmoid(z / tau) - z)
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)
