"""Alignment via Optimal Transport (AOT): the distributional, sorted-batch losses ``aot`` and ``aot_unpaired``.

Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport" (arXiv 2406.05882),
§3. Instead of asking every pair to prefer its chosen response, AOT asks one distribution to dominate
another in the first order (FSD): every quantile of the first is above the same quantile of the second. In
one dimension the optimal transport plan between two empirical distributions pairs them by rank, so the
quantile comparison is: sort both samples, compare element ``i`` with element ``i``, and put a smooth
surrogate of the 0/1 violation on each difference ``δ_i``; with the logistic surrogate (and TRL's label
smoothing ε) the term is ``−(1−ε) log σ(β δ_i) − ε log σ(−β δ_i)``.

- ``aot`` (paired data): the policy's log-likelihood ratios ``z_θ = logp_θ(y_w) − logp_θ(y_l)`` must
  dominate the reference's ``z_ref = logp_ref(y_w) − logp_ref(y_l)``: ``δ = sort(z_θ) − sort(z_ref)``.
- ``aot_unpaired`` (no pairing needed): the chosen log-ratios ``r_w`` must dominate the rejected ``r_l``:
  ``δ = sort(r_w) − sort(r_l)``; each side is sorted on its own, so which rejected sits beside which chosen
  in the batch does not matter.

Names: TRL calls the paired loss ``aot`` too, and the unpaired one ``aot_pair`` (``aot_unpaired`` in recent
versions); the formulas are the same. With one pair per batch both are exactly DPO (``sigmoid``, with
``cdpo``'s label smoothing).

Batch semantics (the loss couples the pairs of a batch). The sort runs over the pairs of ONE call, i.e.
one micro-batch on one rank, as in the paper's implementation (TRL's ``dpo_loss``). ``losses[i]`` is the term
of the ``i``-th quantile, not of pair ``i`` (per-pair weights such as WPO's do not apply to it); rewards stay
per pair (``β·r``). The trainer's window reduction ``Σ_micro-batches Σ_i losses[i] / N_pairs`` is then the
mean over quantile terms of per-micro-batch sorts: it is NOT the loss of one big batch sorted as a whole,
and it changes with the micro-batch size and the number of ranks (no gather). Larger micro-batches give a
finer quantile estimate. Gradients flow through the sorted values (``torch.sort`` with ``stable=True``, so
ties are broken by position and results are deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.core import LossOutput, _log_ratios, _number, _output, _positive, _upcast

__all__ = ["aot", "aot_unpaired"]


def _smoothed_logistic(delta: Tensor, beta: float, eps: float) -> Tensor:
    z = beta * delta
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _label_smoothing(value, loss: str) -> float:
    eps = _number("label_smoothing", value, loss)
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"{loss}: label_smoothing must be in [0, 0.5], got {eps!r}")
    return eps


def _sorted(x: Tensor) -> Tensor:
    return torch.sort(x, dim=0, stable=True).values


def aot(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Paired AOT: ``−(1−ε) log σ(β δ_i) − ε log σ(−β δ_i)``, ``δ = sort(z_θ) − sort(z_ref)`` over the batch.

    Melnyk et al. 2024 (arXiv 2406.05882), §3, paired setting: ``z = logp(y_w) − logp(y_l)`` for the policy
    and for the reference; the policy's ``z`` must dominate the reference's in the first order. Sorts over
    this call's pairs only (one micro-batch): see :mod:`preftune.losses.transport` for what that means under
    gradient accumulation and data parallelism. ``losses[i]`` is the ``i``-th quantile's term.

    Args:
        beta: β, scale of the logistic surrogate. Default 0.1.
        label_smoothing: ε ∈ [0, 0.5] as in ``cdpo`` (TRL's ``label_smoothing``). Default 0 (the paper's
            logistic loss).
    """
    beta = _positive("beta", beta, "aot")
    eps = _label_smoothing(label_smoothing, "aot")
    r_w, r_l = _log_ratios(
        "aot", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z_policy = _upcast(policy_chosen_logps) - _upcast(policy_rejected_logps)
    z_ref = _upcast(ref_chosen_logps) - _upcast(ref_rejected_logps)
    losses = _smoothed_logistic(_sorted(z_policy) - _sorted(z_ref), beta, eps)
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)


def aot_unpaired(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Unpaired AOT: ``−(1−ε) log σ(β δ_i) − ε log σ(−β δ_i)``, ``δ = sort(r_w) − sort(r_l)`` over the batch.

    Melnyk et al. 2024 (arXiv 2406.05882), §3, unpaired setting: the distribution of the chosen log-ratios
    ``r_w = logp_θ(y_w) − logp_ref(y_w)`` must dominate that of the rejected ``r_l`` in the first order;
    chosen and rejected are sorted separately and matched by rank (TRL's ``aot_pair`` / ``aot_unpaired``).
    Sorts over this call's pairs only (one micro-batch): see :mod:`preftune.losses.transport`.
    ``losses[i]`` is the ``i``-th quantile's term.

    Args:
        beta: β, scale of the logistic surrogate. Default 0.1.
        label_smoothing: ε ∈ [0, 0.5] as in ``cdpo``. Default 0 (the paper's logistic loss).
    """
    beta = _positive("beta", beta, "aot_unpaired")
    eps = _label_smoothing(label_smoothing, "aot_unpaired")
    r_w, r_l = _log_ratios(
        "aot_unpaired",
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
    )
    losses = _smoothed_logistic(_sorted(r_w) - _sorted(r_l), beta, eps)
    return _output(losses, beta * r_w, beta * r_l, chosen_tokens)
