"""f-divergence DPO (``f_dpo``): DPO with the reverse-KL anchor replaced by another f-divergence.

Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
Constraints" (arXiv 2309.16240), §4: with ``u = π_θ(y|x) / π_ref(y|x)`` and ``ψ = f'`` the loss is
``−log σ(β (ψ(u_w) − ψ(u_l)))``. With ``r = logp_θ − logp_ref`` (so ``u = e^r``):

==============  ====================================  =================================================
f_divergence    ψ(u) = f'(u), up to a constant        computed as (``ψ̃ = ψ − ψ(1)``, zero at ``u = 1``)
==============  ====================================  =================================================
``reverse_kl``  ``log u`` (DPO)                       ``r``: the same expression as ``sigmoid``
``forward_kl``  ``−1/u``                              ``−expm1(−r)`` (capped, below)
``js``          ``log(2u / (1 + u))``                 ``log σ(r) + log 2`` (``logsigmoid``: no overflow)
``alpha``       ``(1 − u^{−α}) / α``, 0 < α < 1       ``−expm1(−α r) / α`` (capped, below)
==============  ====================================  =================================================

Constants cancel in ``ψ(u_w) − ψ(u_l)``, so subtracting ``ψ(1)`` changes no loss value; it makes the logged
rewards ``β·ψ̃(u)`` (the paper's implicit reward, up to the prompt-only constant) zero at the reference.
α → 0 tends to reverse KL and α = 1 is forward KL.

Numerical stability. ``forward_kl`` and ``alpha`` grow like ``e^{−r}`` (``e^{−αr}``) when the policy makes a
response much less likely than the reference; on log-probs of −1e4 that exponent is 1e4. The exponent
``x`` (``−r`` or ``−α r``) goes through a capped ``expm1``: exactly ``expm1(x)`` for ``x ≤ EXP_CAP = 50``
(u ≥ e^{−50}: every value inside the cap is untouched), continued linearly with slope ``e^{50}`` above it,
so values stay finite (≤ ~1e26 on the usual grid) and gradients keep pushing the right way. Using
``expm1`` rather than ``exp`` keeps full precision near ``u = 1``. ``js`` needs no cap.

What TRL does differently: TRL's ``f_divergence_type`` offers ``reverse_kl``, ``js_divergence`` and
``alpha_divergence`` (default α = 1, i.e. forward KL up to a constant). Its α form
``(cap_exp(−α r_l) − cap_exp(−α r_w)) / α`` clamps the exponent at ``log(finfo.max)`` (≈ 88.7 in fp32): values
up to ~3.4e38 that overflow to inf as soon as they are scaled or summed, and zero gradient past the clamp;
``exp`` (not ``expm1``) also loses the small differences near ``u = 1``. Its JS form
``h − (softplus(r_w) − softplus(r_l))`` is the same function, computed with cancellation for large ``r``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.losses.core import LossOutput, _log_ratios, _number, _output, _positive

__all__ = ["EXP_CAP", "F_DIVERGENCES", "f_dpo"]

F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js", "alpha")
EXP_CAP = 50.0  # exponents above this are continued linearly (see the module docstring)


def _expm1_capped(x: Tensor) -> Tensor:
    """``expm1(x)`` for ``x ≤ EXP_CAP``; ``expm1(EXP_CAP) + e^EXP_CAP · (x − EXP_CAP)`` above (C¹, finite)."""
    return torch.expm1(x.clamp(max=EXP_CAP)) + math.exp(EXP_CAP) * (x - EXP_CAP).clamp(min=0.0)


def _psi(r: Tensor, divergence: str, alpha: float) -> Tensor:
    """``ψ̃(e^r) = f'(e^r) − f'(1)`` in a form that is finite for any finite ``r``."""
    if divergence == "reverse_kl":
        return r
    if divergence == "forward_kl":
        return -_expm1_capped(-r)
    if divergence == "js":
        return F.logsigmoid(r) + math.log(2.0)
    return -_expm1_capped(-alpha * r) / alpha


def f_dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """f-DPO: ``−log σ(β (ψ(u_w) − ψ(u_l)))``, ``u = π_θ/π_ref``, ``ψ = f'`` of the chosen divergence.

    Wang et al. 2023, "Beyond Reverse KL" (arXiv 2309.16240), §4. ``reverse_kl`` is DPO and gives exactly
    ``sigmoid``'s values; the other forms and their numerical guards: :mod:`preftune.losses.fdiv`.
    Rewards: ``β·(ψ(u) − ψ(1))`` (zero at the reference; ``β·r`` for reverse KL).

    Args:
        beta: β, strength of the divergence penalty. Default 0.1.
        f_divergence: one of ``reverse_kl`` (DPO), ``forward_kl``, ``js``, ``alpha``. Default ``reverse_kl``.
        f_alpha: α ∈ (0, 1) of the α-divergence, used only with ``f_divergence="alpha"``. Default 0.5.
    """
    beta = _positive("beta", beta, "f_dpo")
    if not isinstance(f_divergence, str) or f_divergence not in F_DIVERGENCES:
        raise ValueError(
            f"f_dpo: f_divergence must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence!r}"
        )
    alpha = _number("f_alpha", f_alpha, "f_dpo")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"f_dpo: f_alpha must be in (0, 1), got {alpha!r}")
    r_w, r_l = _log_ratios(
        "f_dpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if f_divergence == "reverse_kl":  # literally sigmoid's expression, so the values are identical
        losses = -F.logsigmoid(beta * (r_w - r_l))
        return _output(losses, beta * r_w, beta * r_l, chosen_tokens)
    psi_w, psi_l = _psi(r_w, f_divergence, alpha), _psi(r_l, f_divergence, alpha)
    losses = -F.logsigmoid(beta * (psi_w - psi_l))
    return _output(losses, beta * psi_w, beta * psi_l, chosen_tokens)
