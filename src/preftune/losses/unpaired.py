"""Losses on unpaired feedback: KTO on (prompt, completion, desirable?) rows, and its KL reference point.

KTO does not fit the pair signature of :data:`~preftune.losses.LOSSES` (one completion per row, a label, and
a batch-level KL estimate), so it has its own entry point :func:`kto` and registry :data:`UNPAIRED_LOSSES`.

KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306,
Eq. 8), per row with ``r = logp_θ(y|x) − logp_ref(y|x)`` (summed over completion tokens):

- desirable:   ``λ_D · (1 − σ(β (r − z₀)))``
- undesirable: ``λ_U · (1 − σ(β (z₀ − r)))``

computed as ``λ_D σ(β (z₀ − r))`` and ``λ_U σ(β (r − z₀))`` (``1 − σ(x) = σ(−x)``: finite for any margin).
The reference point ``z₀`` estimates ``KL(π_θ ‖ π_ref)`` from MISMATCHED pairs (x_i, y_j), j ≠ i (completions
unrelated to the prompt, §4): ``z₀ = max(0, mean over the KL rows of (logp_θ(y_j|x_i) − logp_ref(y_j|x_i)))``,
detached (no gradient flows through it), as in the paper.

What z₀ averages over (exact under accumulation and across ranks). :func:`kl_stats` turns a micro-batch's KL
rows into ``(Σ (logp_θ − logp_ref), count)`` in float64; sums of these add up. The trainer sums them over
the whole accumulation window and all ranks (one ``all_reduce(SUM)`` of a 2-vector) BEFORE the backward
passes and gives the total to every micro-batch as ``kl_sum_and_count``: z₀ is then the mean over every KL
row of the optimizer step, identical however the window is split into micro-batches and ranks (tested).
Without ``kl_sum_and_count``, z₀ is the mean over this call's KL rows (the paper's per-batch estimate). With
no KL row at all (count 0) z₀ = 0.

Mismatched pairs: :func:`mismatched_indices` pairs prompt i with completion (i+1) mod n, never with itself.
Peer code has got this wrong: reversing the completion list pairs the middle row with itself when n is odd
(the original HALOs code), and TRL rotates by one inside chunks of ``per_device_train_batch_size`` rows, so
a chunk of one row (a short last chunk) pairs a row with itself. TRL averages z₀ per micro-batch and then
over ranks as a mean of per-rank means (not exact for unequal sizes) and never over the accumulation window.

Weights (§4.2): keep ``λ_D n_D / (λ_U n_U)`` in [1, 4/3], where n_D, n_U count desirable and undesirable
rows (:func:`kto_weight_ratio`); e.g. with 1:10 data raise λ_D to about 10–13 (or lower λ_U).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from preftune.losses.core import LossSpec, _positive, _upcast, hyperparameters

__all__ = [
    "UNPAIRED_LOSSES",
    "KTOOutput",
    "kl_stats",
    "kto",
    "kto_weight_ratio",
    "mismatched_indices",
]


@dataclass
class KTOOutput:
    """Per-row KTO terms, detached rewards and the z₀ used; the caller reduces (see :meth:`reduce`)."""

    losses: Tensor  # [B] weighted per-row terms, reduced as a mean over rows
    rewards: Tensor  # [B] detached β·(logp_θ − logp_ref)
    desirable: Tensor  # [B] bool labels
    kl: Tensor  # scalar, detached: z₀ (clamped at 0) in the losses' dtype

    def reduce(self, num_rows: int | float | Tensor | None = None) -> Tensor:
        """``Σ losses / num_rows``; default this batch's row count (at least 1). For exact accumulation
        pass the number of rows of the whole window and all ranks."""
        if num_rows is None:
            num_rows = max(self.losses.shape[0], 1)
        return self.losses.sum() / num_rows


def mismatched_indices(
    n: int, prompt_ids: Sequence | Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """KL rows for a batch of ``n`` rows: ``(prompt_index, completion_index)``, never the same row.

    Row i's prompt is paired with completion ``(i + 1) mod n``. With ``prompt_ids`` (one id per row; rows of
    a pair "unpaired" on the fly share their prompt), row i takes the first row after it, cyclically, whose
    prompt differs, so no KL row is a genuine completion of its prompt; a row for which no such row exists is
    left out. ``n ≤ 1`` (or a single distinct prompt) gives no KL row: z₀ then comes from the rest of the
    window / the other ranks via ``kl_sum_and_count``, or is 0 when the whole step has no KL row.
    """
    if n < 0:
        raise ValueError(f"mismatched_indices: n must be >= 0, got {n}")
    if n <= 1:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    rows = torch.arange(n)
    if prompt_ids is None:
        return rows, (rows + 1) % n
    ids = list(prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else prompt_ids)
    if len(ids) != n:
        raise ValueError(f"mismatched_indices: {len(ids)} prompt_ids for n = {n} rows")
    prompts, completions = [], []
    for i in range(n):
        j = next((j % n for j in range(i + 1, i + n) if ids[j % n] != ids[i]), None)
        if j is not None:
            prompts.append(i)
            completions.append(j)
    return torch.tensor(prompts, dtype=torch.long), torch.tensor(completions, dtype=torch.long)


def kl_stats(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> Tensor:
    """``[Σ (logp_θ − logp_ref), count]`` over KL rows: a detached float64 2-vector that adds up exactly
    (up to float64 rounding) over micro-batches and ranks; ``all_reduce(SUM)`` it, then pass it to :func:`kto`
    as ``kl_sum_and_count``."""
    if kl_policy_logps.shape != kl_ref_logps.shape or kl_policy_logps.dim() != 1:
        raise ValueError(
            "kl_policy_logps and kl_ref_logps must be 1-D tensors of the same shape; got "
            f"{tuple(kl_policy_logps.shape)} and {tuple(kl_ref_logps.shape)}"
        )
    diff = kl_policy_logps.detach().double() - kl_ref_logps.detach().double()
    return torch.stack([diff.sum(), diff.new_tensor(float(diff.numel()))])


def _reference_point(kl_sum_and_count, dtype: torch.dtype, device) -> Tensor:
    total, count = (torch.as_tensor(v, dtype=torch.float64).detach() for v in kl_sum_and_count)
    mean = total / count.clamp(min=1.0)  # count 0 → total is 0 too, so z₀ = 0
    return mean.clamp(min=0.0).to(dtype=dtype, device=device)


def kto(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_policy_logps: Tensor | None = None,
    kl_ref_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl_sum_and_count: Sequence | Tensor | None = None,
) -> KTOOutput:
    """KTO: ``λ_D (1 − σ(β (r − z₀)))`` for desirable rows, ``λ_U (1 − σ(β (z₀ − r)))`` for undesirable.

    Ethayarajh et al. 2024 (arXiv 2402.01306), Eq. 8. ``r = logp_θ − logp_ref`` (per-row sums over
    completion tokens); ``z₀`` is the detached, clamped KL estimate (:mod:`preftune.losses.unpaired`).

    Args:
        policy_logps, ref_logps: ``[B]`` summed completion log-probs of the rows.
        desirable: ``[B]`` bool, True for desirable (thumbs-up) rows.
        kl_policy_logps, kl_ref_logps: ``[K]`` summed log-probs of this batch's mismatched KL rows
            (:func:`mismatched_indices`); K may be 0. Give these OR ``kl_sum_and_count``, not both.
        beta: β, scale of the implicit reward. Default 0.1.
        desirable_weight: λ_D > 0. Default 1.0.
        undesirable_weight: λ_U > 0. Default 1.0 (§4.2: keep λ_D n_D / (λ_U n_U) in [1, 4/3]).
        kl_sum_and_count: ``(Σ (logp_θ − logp_ref), count)`` over the KL rows of the whole accumulation
            window and all ranks (:func:`kl_stats`, summed), for a z₀ exact under accumulation.

    Returns:
        :class:`KTOOutput` with per-row ``losses``, rewards ``β·r`` and ``kl`` = z₀.
    """
    beta = _positive("beta", beta, "kto")
    w_d = _positive("desirable_weight", desirable_weight, "kto")
    w_u = _positive("undesirable_weight", undesirable_weight, "kto")
    if policy_logps.dim() != 1 or policy_logps.shape != ref_logps.shape:
        raise ValueError(
            "kto: policy_logps and ref_logps must be 1-D tensors of the same shape [B]; got "
            f"{tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}"
        )
    if desirable.dtype != torch.bool or desirable.shape != policy_logps.shape:
        raise ValueError(
            f"kto: desirable must be a bool tensor of shape {tuple(policy_logps.shape)}, got "
            f"{desirable.dtype} {tuple(desirable.shape)}"
        )
    has_rows = kl_policy_logps is not None or kl_ref_logps is not None
    if has_rows == (kl_sum_and_count is not None):
        raise ValueError(
            "kto: give the KL rows (kl_policy_logps and kl_ref_logps) or kl_sum_and_count, exactly one"
        )
    if has_rows:
        if kl_policy_logps is None or kl_ref_logps is None:
            raise ValueError("kto: pass both kl_policy_logps and kl_ref_logps")
        kl_sum_and_count = kl_stats(kl_policy_logps, kl_ref_logps)
    r = _upcast(policy_logps) - _upcast(ref_logps)
    z0 = _reference_point(kl_sum_and_count, r.dtype, r.device)
    losses = torch.where(
        desirable,
        w_d * torch.sigmoid(beta * (z0 - r)),  # λ_D (1 − σ(β (r − z₀)))
        w_u * torch.sigmoid(beta * (r - z0)),  # λ_U (1 − σ(β (z₀ − r)))
    )
    return KTOOutput(losses=losses, rewards=(beta * r).detach(), desirable=desirable, kl=z0)


def kto_weight_ratio(
    num_desirable: int,
    num_undesirable: int,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> float:
    """``λ_D n_D / (λ_U n_U)``; the KTO paper (§4.2) recommends keeping it in [1, 4/3] (inf if n_U = 0)."""
    if num_undesirable == 0:
        return float("inf")
    return desirable_weight * num_desirable / (undesirable_weight * num_undesirable)


UNPAIRED_LOSSES: dict[str, LossSpec] = {
    "kto": LossSpec(
        kto,
        True,
        hyperparameters(kto),  # its keyword defaults, stated once in the signature
        "sums",
        "KTO: prospect-theoretic loss on unpaired desirable/undesirable rows, KL reference point",
    ),
}
