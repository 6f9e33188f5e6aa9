"""Losses on the log-ratios against a reference: ``r_w = logp_θ(y_w) − logp_ref(y_w)``, ``r_l`` likewise,
``h = r_w − r_l``; rewards ``β·r``. Inputs and hyperparameters: :mod:`preftune.losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.core import LossOutput, _average, _log_ratios, _number, _output, _positive

__all__ = [
    "cdpo",
    "hinge",
    "ipo",
    "robust",
    "sigmoid",
    "sigmoid_norm",
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
