"""Losses on the log-ratios against a reference: ``r_w = logp_θ(y_w) − logp_ref(y_w)``, ``r_l`` likewise,
``h = r_w − r_l``; rewards ``β·r``. Inputs and hyperparameters: :mod:`preftune.losses`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.core import LossOutput, _average, _log_ratios, _number, _output, _positive

__all__ = [
    "apo_down",
    "apo_zero",
    "bco_pair",
    "cdpo",
    "discopop",
    "exo_pair",
    "hinge",
    "ipo",
    "nca_pair",
    "robust",
    "sigmoid",
    "sigmoid_norm",
    "sppo_hard",
]


def sigmoid(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """DPO: ``−log σ(β h)`` with ``h = r_w − r_l`` (summed log-ratios).

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model", Eq. 7.

    Args:
        beta: β, strength of the implicit KL penalty to the reference (higher = stay closer). Default 0.1.
    """
    beta = _positive("beta", beta, "sigmoid")
    r_w, r_l = _log_ratios(
        "sigmoid", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = -F.logsigmoid(beta * (r_w - r_l))
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def cdpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> LossOutput:
    """Conservative DPO: ``−(1−ε) log σ(β h) − ε log σ(−β h)``.

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO), Eq. 3.

    Args:
        beta: β as in DPO. Default 0.1.
        label_smoothing: ε ∈ [0, 0.5], the assumed probability that a label is flipped. Default 0.1;
            ε = 0 is DPO.
    """
    beta = _positive("beta", beta, "cdpo")
    eps = _number("label_smoothing", label_smoothing, "cdpo")
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"cdpo: label_smoothing must be in [0, 0.5], got {eps!r}")
    r_w, r_l = _log_ratios(
        "cdpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z = beta * (r_w - r_l)
    losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def robust(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> LossOutput:
    """Robust DPO (rDPO): ``[−(1−ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)``.

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback".
    An unbiased estimate of the DPO loss under preference flips with rate ε (it can be negative).

    Args:
        beta: β as in DPO. Default 0.1.
        label_smoothing: ε ∈ [0, 0.5), the known flip rate. Default 0.1; ε = 0 is DPO.
    """
    beta = _positive("beta", beta, "robust")
    eps = _number("label_smoothing", label_smoothing, "robust")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust: label_smoothing must be in [0, 0.5), got {eps!r}")
    r_w, r_l = _log_ratios(
        "robust", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z = beta * (r_w - r_l)
    losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def hinge(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """SLiC / RSO hinge: ``max(0, 1 − β h)``.

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"; Liu et al. 2023,
    "Statistical Rejection Sampling Improves Preference Optimization".

    Args:
        beta: β; the hinge margin on ``h`` is 1/β. Default 0.1.
    """
    beta = _positive("beta", beta, "hinge")
    r_w, r_l = _log_ratios(
        "hinge", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.relu(1.0 - beta * (r_w - r_l))
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """IPO: ``(r_w / n_w − r_l / n_l − 1/(2β))²`` on per-token averaged log-ratios.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    Eq. 17. Minimised where the averaged log-ratio difference equals 1/(2β).

    Args:
        beta: β, IPO's regularisation τ: the target gap is 1/(2β) nats per token (β = 0.1 → 5). Default
            0.1 (as TRL); needs a sweep.
    """
    beta = _positive("beta", beta, "ipo")
    r_w, r_l = _log_ratios(
        "ipo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    avg_w = _average(r_w, chosen_tokens)  # r_w / max(n_w, 1)
    avg_l = _average(r_l, rejected_tokens)
    losses = (avg_w - avg_l - 1.0 / (2.0 * beta)) ** 2
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def sigmoid_norm(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 5.0,
) -> LossOutput:
    """Length-normalised DPO: ``−log σ(β (r_w / n_w − r_l / n_l))`` on per-token averaged log-ratios.

    Lambert et al. 2024, "Tülu 3" (arXiv 2411.15124), length-normalised DPO objective of the preference-
    tuning section; the "DPO w/ LN" ablation of Meng et al. 2024, SimPO (arXiv 2405.14734). ``n`` is
    clamped at 1 (an empty response counts as one token). Rewards are the normalised ``β·r/n``, so the
    logged margin is the argument of σ (as open-instruct's ``dpo_norm``). TRL has no such loss type.

    Args:
        beta: β on per-token log-ratios; per-token margins are ~n times smaller than summed ones, so
            β is much larger than DPO's. Default 5.0 (Tülu 3's setting).
    """
    beta = _positive("beta", beta, "sigmoid_norm")
    r_w, r_l = _log_ratios(
        "sigmoid_norm",
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
    )
    avg_w = _average(r_w, chosen_tokens)  # r_w / max(n_w, 1)
    avg_l = _average(r_l, rejected_tokens)
    losses = -F.logsigmoid(beta * (avg_w - avg_l))
    return _output(losses, beta * avg_w, beta * avg_l, chosen_tokens)


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
