"""The DPO loss family as pure functions of per-pair log-probs (spec: FORMULAS.md, "Losses").

Inputs
------
Every loss takes the same per-pair tensors, all ``[B]``:

- ``policy_chosen_logps``, ``policy_rejected_logps``: **sums** of the policy's log-probs over the response
  tokens (EOS included, prompt and padding excluded), as returned by :mod:`preftune.logprobs`;
- ``ref_chosen_logps``, ``ref_rejected_logps``: the same for the frozen reference (``None`` for the
  reference-free losses ``simpo``, ``orpo`` and for ``sft``);
- ``chosen_tokens``, ``rejected_tokens`` (keyword-only): response token counts ``n`` (int64).

Each loss applies the length normalisation its paper asks for itself (``ipo``: per-token averaged log-ratios;
``simpo``/``orpo``: ``ā = logp / max(n, 1)``). All maths runs in fp32 (float64 inputs stay float64), using
``logsigmoid``/``softplus`` forms that stay finite for log-probs from -1e4 to -1e-9 and margins of ±1e3.

Output and reduction
--------------------
A loss returns a :class:`LossOutput`: per-pair ``losses`` (reduced as a mean over pairs), per-pair
``token_losses`` (a SUM over the chosen tokens of a token-level term, e.g. the NLL of ``sft``/``orpo``, reduced
by the total number of chosen tokens) and detached rewards. ``out.reduce()`` gives the batch loss; a trainer
that accumulates gradients passes window totals: ``out.reduce(num_pairs=N_pairs, num_tokens=N_tokens)``.

Rewards (detached, for logging): ``β·(logp_θ − logp_ref)`` for the losses with a reference, ``β·ā`` for
``simpo``/``orpo``; ``sft`` alone reports ``β·(logp_θ − logp_ref)`` when reference log-probs are given, else the
average log-prob ``ā`` (unscaled).

Hyperparameters (keyword arguments; defaults from FORMULAS.md "Defaults")
-------------------------------------------------------------------------
=====================  ======================================================  =====================
name                   meaning                                                 default
=====================  ======================================================  =====================
``beta``               β, the inverse temperature / KL strength (IPO's τ)      0.1; ``simpo`` 2.0
``label_smoothing``    ε, the assumed preference-flip rate (``cdpo``,          0.1
                       ``robust``); ε = 0 gives ``sigmoid``
``gamma_beta_ratio``   γ/β, SimPO's target margin as a fraction of β           0.5
``orpo_lambda``        λ, weight of ORPO's odds-ratio term (NLL has weight 1)  0.1
``exo_epsilon``        ε of EXO's target distribution, 0 < ε < 1               1e-3
``discopop_tau``       τ, DiscoPOP's modulation temperature                    0.05
=====================  ======================================================  =====================

Combinations
------------
``compute_loss(["sigmoid", "sft"], ..., weights=[1.0, 0.2], beta=0.1)`` is the weighted sum of the terms
(RPO): ``losses`` and ``token_losses`` are each summed with the weights. A hyperparameter goes to every term
that accepts it (``beta`` above goes to both), and one that no term accepts is an error. The combination's
rewards come from the first term that defines rewards, i.e. the first term other than ``sft`` (``sft``'s own
rewards are used only when every term is ``sft``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "LossOutput",
    "LossSpec",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "cdpo",
    "compute_loss",
    "discopop",
    "exo_pair",
    "hinge",
    "ipo",
    "nca_pair",
    "orpo",
    "robust",
    "sft",
    "sigmoid",
    "simpo",
    "sppo_hard",
]


@dataclass
class LossOutput:
    """Per-pair loss terms and detached rewards; the caller reduces (see :meth:`reduce`)."""

    losses: Tensor  # [B] per-pair terms, reduced as a mean over pairs
    token_losses: (
        Tensor  # [B] per-pair SUM of token-level terms (sft / ORPO NLL), reduced by total tokens
    )
    chosen_rewards: Tensor  # [B] detached
    rejected_rewards: Tensor  # [B] detached
    chosen_tokens: Tensor  # [B] response token counts of the chosen responses

    def reduce(
        self, num_pairs: int | Tensor | None = None, num_tokens: int | Tensor | None = None
    ) -> Tensor:
        """``losses.sum() / num_pairs + token_losses.sum() / num_tokens`` (a scalar).

        Defaults are this batch's pair count and its total chosen tokens (each at least 1). For exact
        gradient accumulation pass the totals over the whole accumulation window (and all ranks).
        """
        if num_pairs is None:
            num_pairs = max(self.losses.shape[0], 1)
        if num_tokens is None:
            num_tokens = self.chosen_tokens.sum().clamp(min=1)
        return self.losses.sum() / num_pairs + self.token_losses.sum() / num_tokens


@dataclass(frozen=True)
class LossSpec:
    """Registry entry: how to call a loss and what it needs."""

    fn: Callable[..., LossOutput]
    needs_reference: (
        bool  # needs ref_chosen_logps / ref_rejected_logps (a reference model or a cache)
    )
    defaults: Mapping[str, float]  # the hyperparameters it accepts, with their defaults
    uses: str  # "sums" or "averages" (length-normalised log-probs, computed inside the loss)
    description: str
    defines_rewards: bool = field(
        default=True
    )  # False for sft: a combination takes rewards elsewhere


# ----------------------------------------------------------------------------- helpers
def _upcast(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _number(name: str, value, loss: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{loss}: hyperparameter {name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{loss}: hyperparameter {name} must be finite, got {value!r}")
    return value


def _positive(name: str, value, loss: str) -> float:
    value = _number(name, value, loss)
    if value <= 0:
        raise ValueError(f"{loss}: hyperparameter {name} must be > 0, got {value!r}")
    return value


def _non_negative(name: str, value, loss: str) -> float:
    value = _number(name, value, loss)
    if value < 0:
        raise ValueError(f"{loss}: hyperparameter {name} must be >= 0, got {value!r}")
    return value


def _log_ratios(
    loss: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``r_w = logp_θ(y_w) − logp_ref(y_w)``, ``r_l`` likewise (fp32)."""
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(
            f"loss {loss!r} needs reference log-probs: pass ref_chosen_logps and ref_rejected_logps "
            "(or use a reference-free loss: simpo, orpo)"
        )
    return (
        _upcast(policy_chosen) - _upcast(ref_chosen),
        _upcast(policy_rejected) - _upcast(ref_rejected),
    )


def _average(logps: Tensor, tokens: Tensor) -> Tensor:
    """``ā = logp / max(n, 1)`` in fp32."""
    logps = _upcast(logps)
    return logps / tokens.clamp(min=1).to(logps.dtype)


def _output(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_tokens: Tensor,
    token_losses: Tensor | None = None,
) -> LossOutput:
    return LossOutput(
        losses=losses,
        token_losses=torch.zeros_like(losses) if token_losses is None else token_losses,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        chosen_tokens=chosen_tokens,
    )


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 − e^a)`` for ``a < 0`` (FORMULAS.md): ``log(−expm1(a))`` above −ln 2, ``log1p(−exp(a))`` below.

    The input is clamped inside each branch, so the branch that ``torch.where`` discards has finite
    gradients too (no NaN at ``a ≈ 0``). ``a`` is also kept ≤ −1e-20, which only matters at ``a = 0``
    (an empty or certain response), where the true value is −inf.
    """
    near_zero = torch.log(-torch.expm1(a.clamp(min=-math.log(2.0), max=-1e-20)))
    far = torch.log1p(-torch.exp(a.clamp(max=-math.log(2.0))))
    return torch.where(a > -math.log(2.0), near_zero, far)


# ----------------------------------------------------------------------------- losses
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
    avg_w = r_w / chosen_tokens.clamp(min=1).to(r_w.dtype)
    avg_l = r_l / rejected_tokens.clamp(min=1).to(r_l.dtype)
    losses = (avg_w - avg_l - 1.0 / (2.0 * beta)) ** 2
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


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
    (No running reward-mean shift: FORMULAS.md's form.)

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


# ----------------------------------------------------------------------------- registry
_BETA = {"beta": 0.1}
_SFT_SPEC = LossSpec(
    sft, False, dict(_BETA), "sums", "token-mean NLL of the chosen responses", defines_rewards=False
)

LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid, True, dict(_BETA), "sums", "DPO: -log σ(βh)"),
    "cdpo": LossSpec(
        cdpo,
        True,
        {"beta": 0.1, "label_smoothing": 0.1},
        "sums",
        "conservative DPO (label smoothing ε)",
    ),
    "robust": LossSpec(
        robust,
        True,
        {"beta": 0.1, "label_smoothing": 0.1},
        "sums",
        "robust DPO, unbiased under flip rate ε",
    ),
    "hinge": LossSpec(hinge, True, dict(_BETA), "sums", "SLiC/RSO hinge: max(0, 1 - βh)"),
    "ipo": LossSpec(ipo, True, dict(_BETA), "averages", "IPO on per-token averaged log-ratios"),
    "simpo": LossSpec(
        simpo,
        False,
        {"beta": 2.0, "gamma_beta_ratio": 0.5},
        "averages",
        "SimPO: reference-free, length-averaged, target margin γ",
    ),
    "orpo": LossSpec(
        orpo,
        False,
        {"beta": 0.1, "orpo_lambda": 0.1},
        "averages",
        "ORPO: NLL + λ·odds-ratio term, reference-free",
    ),
    "bco_pair": LossSpec(bco_pair, True, dict(_BETA), "sums", "paired binary classifier loss"),
    "nca_pair": LossSpec(nca_pair, True, dict(_BETA), "sums", "paired noise-contrastive alignment"),
    "sppo_hard": LossSpec(sppo_hard, True, dict(_BETA), "sums", "SPPO, hard labels: ±1/(2β)"),
    "apo_zero": LossSpec(apo_zero, True, dict(_BETA), "sums", "APO-zero: chosen up, rejected down"),
    "apo_down": LossSpec(apo_down, True, dict(_BETA), "sums", "APO-down: both down, rejected more"),
    "exo_pair": LossSpec(
        exo_pair,
        True,
        {"beta": 0.1, "exo_epsilon": 1e-3},
        "sums",
        "EXO: KL to the (1-ε, ε) target",
    ),
    "discopop": LossSpec(
        discopop,
        True,
        {"beta": 0.1, "discopop_tau": 0.05},
        "sums",
        "DiscoPOP: log-ratio modulated logistic/exponential loss",
    ),
    "sft": _SFT_SPEC,
    "nll": _SFT_SPEC,  # FORMULAS.md's other name for sft
}


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_pair_tensors(tensors: Mapping[str, Tensor | None]) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1 or any(len(s) != 1 for s in shapes.values()):
        detail = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(
            f"all per-pair inputs must be 1-D tensors of the same shape [B]; got {detail}"
        )


def compute_loss(
    name: str | Sequence[str],
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    weights: Sequence[float] | None = None,
    **hparams,
) -> LossOutput:
    """The one entry point: a loss of :data:`LOSSES`, or a weighted sum of several.

    Args:
        name: a loss name (``"sigmoid"``) or a list of names (``["sigmoid", "sft"]``).
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]`` SUMS of
            response-token log-probs (reference ones may be ``None`` for reference-free losses).
        chosen_tokens, rejected_tokens: ``[B]`` response token counts.
        weights: one weight per name (default all 1.0); ``losses`` and ``token_losses`` are weighted sums.
        **hparams: hyperparameters (module docstring), each routed to every term that accepts it.

    Returns:
        :class:`LossOutput`; rewards come from the first term that defines them (not ``sft``).

    Raises:
        ValueError: unknown loss or hyperparameter (with a suggestion), a reference-needing loss without
            reference log-probs, wrong number of weights, out-of-range hyperparameters, shape mismatches.
    """
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("compute_loss needs at least one loss name")
    for n in names:
        if n not in LOSSES:
            raise ValueError(
                f"unknown loss {n!r}{_suggest(n, LOSSES)} Known losses: {', '.join(LOSSES)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"a loss may appear only once in a combination, got {names}")
    if weights is None:
        weights = [1.0] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(
            f"got {len(weights)} weights for {len(names)} losses {names}; give one weight per loss"
        )
    for w in weights:
        if (
            isinstance(w, bool)
            or not isinstance(w, (int, float))
            or not (math.isfinite(w) and w >= 0)
        ):
            raise ValueError(f"loss weights must be finite numbers >= 0, got {weights}")

    specs = [LOSSES[n] for n in names]
    accepted = set().union(*(spec.defaults for spec in specs))
    for key in hparams:
        if key not in accepted:
            owners = [n for n, s in LOSSES.items() if key in s.defaults]
            hint = f" (it is a hyperparameter of {', '.join(owners)})" if owners else ""
            raise ValueError(
                f"unknown hyperparameter {key!r} for loss {' + '.join(names)}{hint}"
                f"{_suggest(key, accepted)} Accepted: {', '.join(sorted(accepted))}"
            )
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    for n, spec in zip(names, specs):
        if spec.needs_reference and ref_chosen_logps is None:
            raise ValueError(
                f"loss {n!r} needs reference log-probs: pass ref_chosen_logps and ref_rejected_logps "
                "(or use a reference-free loss: simpo, orpo)"
            )
    _check_pair_tensors(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
            "chosen_tokens": chosen_tokens,
            "rejected_tokens": rejected_tokens,
        }
    )

    outputs = []
    for spec in specs:
        kwargs = {k: v for k, v in hparams.items() if k in spec.defaults}
        outputs.append(
            spec.fn(
                policy_chosen_logps,
                policy_rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                chosen_tokens=chosen_tokens,
                rejected_tokens=rejected_tokens,
                **kwargs,
            )
        )
    if len(outputs) == 1 and weights[0] == 1.0:
        return outputs[0]
    rewards_from = next(
        (o for o, s in zip(outputs, specs) if s.defines_rewards),
        outputs[0],
    )
    return LossOutput(
        losses=sum(w * o.losses for w, o in zip(weights, outputs)),
        token_losses=sum(w * o.token_losses for w, o in zip(weights, outputs)),
        chosen_rewards=rewards_from.chosen_rewards,
        rejected_rewards=rewards_from.rejected_rewards,
        chosen_tokens=chosen_tokens,
    )
