"""The objective of one micro-batch: the loss options, the configured loss, and its reduction over the
accumulation window. The one place where the trainer and the evaluator turn log-probs into a loss;
:func:`window_backward` runs it forward and backward over one optimizer step's micro-batches.

For a micro-batch of an accumulation window with ``N_pairs`` pairs and ``N_tokens`` chosen tokens in total
(over all micro-batches and ranks, docs/FORMULAS.md "Exact accumulation"):

    loss = Σ_i w_i · ℓ_i / N_pairs + Σ_i w_i · t_i / N_tokens + aux · B / N_pairs

with ``ℓ_i`` the pair terms and ``t_i`` the token-level terms (sft / NLL sums) of the configured loss,
``w_i`` the data weights (times WPO's weights when asked), and ``aux`` the model's router load-balancing
term (MoE with ``model.output_router_logits``) weighted by this micro-batch's ``B`` of the window's pairs.

Options, applied before the loss sees the log-probs:

- **LD-DPO** (``loss.ld_alpha = α``; Liu et al. 2024, arXiv 2409.06411, §3): a response's log-prob becomes
  ``prefix + α · (total − prefix)``, the prefix being its first ℓ_s = min(n_w, n_l) tokens. Applied to
  the policy *and* the reference (TRL applies it to the policy only), so that the log-ratios, and the
  loss, start at 0 / ln 2 at the reference as in plain DPO.
- **WPO** (``loss.wpo_weighting``; Zhou et al. 2024, arXiv 2406.11827, §3): each pair's weight is multiplied
  by ``exp(ā_w + ā_l)``, the responses' length-normalised policy log-probs aligned by the collision
  probability (the paper's sampled alignment), detached (:func:`preftune.losses.wpo_weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from preftune.distributed import DistContext
from preftune.distributed.wrap import grad_sync
from preftune.losses import LossOutput, kl_stats, kto, ld_logps, wpo_weights
from preftune.model import Layout, PairBatch, SequenceLogps

if TYPE_CHECKING:
    from preftune.evaluation import StepMetrics

__all__ = ["KTOObjective", "Objective", "window_backward"]

#: ``forward(batch) -> (policy SequenceLogps, ReferenceLogps | None)`` for a micro-batch (on its device).
Forward = Callable[[PairBatch], tuple[SequenceLogps, object]]
#: Sums a tensor over ranks (``DistContext.all_reduce_sum``), or leaves it as is.
Reduce = Callable[[Tensor], Tensor]


def _count(mask: Tensor) -> Tensor:
    return mask.sum().to(torch.float64)


def _zeroed(metrics: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """The same names with nothing in them (a placeholder adds no pair to any mean)."""
    return {k: (total * 0.0, torch.zeros_like(count)) for k, (total, count) in metrics.items()}


@dataclass
class Objective:
    loss_fn: Callable[..., LossOutput]  # compute_loss with names, weights and hyperparameters bound
    ld_alpha: float | None = None
    wpo: bool = False

    @property
    def extras(self) -> tuple[str, ...]:
        """What the log-prob modules must compute beside the sums (``preftune.model.forward.EXTRAS``)."""
        return (("prefix",) if self.ld_alpha is not None else ()) + (
            ("collision",) if self.wpo else ()
        )

    def _ld(self, chosen: Tensor, rejected: Tensor, prefixes) -> tuple[Tensor, Tensor]:
        if self.ld_alpha is None:
            return chosen, rejected
        chosen_prefix, rejected_prefix = prefixes
        if chosen_prefix is None or rejected_prefix is None:
            raise ValueError("loss.ld_alpha needs prefix log-probs from the layout (extras)")
        return (
            ld_logps(chosen_prefix, chosen - chosen_prefix, self.ld_alpha),
            ld_logps(rejected_prefix, rejected - rejected_prefix, self.ld_alpha),
        )

    def prepare(self, micro: Sequence[PairBatch], forward: Forward, reduce: Reduce) -> None:
        """Nothing to compute over the window before the first backward (pair losses)."""
        return None

    def metrics(
        self, out: LossOutput, pol: SequenceLogps, batch: PairBatch
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (sum, count)}`` of the per-pair metrics (docs/FORMULAS.md "Metrics"); zeros for a
        placeholder (every rank must report the same names: their sums are reduced together)."""
        cr, rr = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        cl, rl = pol.chosen_logps.detach(), pol.rejected_logps.detach()
        b = torch.tensor(float(cr.shape[0]), dtype=torch.float64)
        values = {
            "rewards/chosen": cr,
            "rewards/rejected": rr,
            "rewards/margins": cr - rr,
            "rewards/accuracies": (cr > rr).to(cr.dtype),
            "logps/chosen": cl,
            "logps/rejected": rl,
            "logps/chosen_avg": cl / pol.chosen_tokens.clamp(min=1),
            "logps/rejected_avg": rl / pol.rejected_tokens.clamp(min=1),
        }
        metrics = {name: (v.sum(), b) for name, v in values.items()}
        if pol.aux_loss is not None:
            metrics["aux_loss"] = (pol.aux_loss.detach() * b, b)
        return _zeroed(metrics) if batch.placeholder else metrics

    def terms(
        self, out: LossOutput, batch: PairBatch, n_pairs: float, n_tokens: float
    ) -> dict[str, Tensor]:
        """This micro-batch's share of each named part of the loss (``loss/<name>``: the weighted terms of
        a combination, ORPO's odds-ratio and NLL terms), reduced like the loss."""
        w = batch.weights
        pw = w if out.pair_weights is None else out.pair_weights
        return {
            f"loss/{name}": ((pw * pair).sum() / n_pairs + (w * token).sum() / n_tokens).detach()
            for name, (pair, token) in out.parts.items()
        }

    def __call__(
        self,
        pol: SequenceLogps,
        ref,  # preftune.reference.ReferenceLogps | None
        batch: PairBatch,
        n_pairs: float,
        n_tokens: float,
        window: object = None,
    ) -> tuple[Tensor, LossOutput]:
        """``(loss, out)``: this micro-batch's share of the window loss, and the loss's per-pair output."""
        if batch.labels is not None:
            raise ValueError("a pair loss got unpaired rows (labels): use loss.name=kto")
        pc, pr = self._ld(
            pol.chosen_logps,
            pol.rejected_logps,
            (pol.chosen_prefix_logps, pol.rejected_prefix_logps),
        )
        rc = rr = None
        if ref is not None:
            rc, rr = self._ld(
                ref.chosen_logps,
                ref.rejected_logps,
                (ref.chosen_prefix_logps, ref.rejected_prefix_logps),
            )
        out = self.loss_fn(
            pc, pr, rc, rr, chosen_tokens=pol.chosen_tokens, rejected_tokens=pol.rejected_tokens
        )
        if self.wpo:  # WPO weighs the pairs' preference terms, not an added NLL term
            out.pair_weights = batch.weights * wpo_weights(
                pol.chosen_logps,
                pol.rejected_logps,
                pol.chosen_tokens,
                pol.rejected_tokens,
                pol.chosen_log_collision,
                pol.rejected_log_collision,
            ).to(batch.weights.dtype)
        loss = out.reduce(n_pairs, n_tokens, weights=batch.weights)
        if pol.aux_loss is not None:
            loss = loss + pol.aux_loss * (batch.num_pairs / n_pairs)
        return loss, out


@dataclass
class KTOObjective:
    """KTO on unpaired rows (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 8; :mod:`preftune.losses.unpaired`).

    A batch of unpaired rows comes in the pair layout: ``chosen`` is each row's own completion, ``rejected``
    the completion of another prompt (its KL row, fixed per dataset row by the data layer), ``labels`` the
    desirable flags. The reference point z₀ is the mean of ``logp_θ − logp_ref`` over every KL row of the
    optimizer step — all micro-batches of the window, all ranks — computed by :meth:`prepare` in one no-grad
    pass before the first backward and summed over ranks, so that accumulation and data parallelism give
    exactly the z₀ (and gradients) of one big batch. The rows' loss is ``Σ w·ℓ / N_rows`` over the window.
    """

    beta: float  # the hyperparameters: the registry's defaults under the config's (preftune.build)
    desirable_weight: float
    undesirable_weight: float
    extras: tuple[str, ...] = ()

    def prepare(self, micro: Sequence[PairBatch], forward: Forward, reduce: Reduce) -> Tensor:
        """``(Σ (logp_θ − logp_ref), count)`` over the window's KL rows, summed over ranks (float64)."""
        stats = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in micro:  # placeholders run too: sharded forwards are collectives
                pol, ref = forward(batch)
                if ref is None:
                    raise ValueError(
                        "kto needs a reference (reference.strategy copy/precomputed/...)"
                    )
                if not batch.placeholder:
                    stats += kl_stats(pol.rejected_logps, ref.rejected_logps).cpu()
        return reduce(stats)

    def __call__(
        self,
        pol: SequenceLogps,
        ref,
        batch: PairBatch,
        n_pairs: float,
        n_tokens: float,
        window: object = None,
    ):
        if batch.labels is None:
            raise ValueError("kto needs unpaired rows with labels (desirable / undesirable)")
        out = kto(
            pol.chosen_logps,
            ref.chosen_logps,
            batch.labels.bool(),
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            kl_sum_and_count=window,
        )
        loss = (batch.weights * out.losses).sum() / n_pairs
        if pol.aux_loss is not None:
            loss = loss + pol.aux_loss * (batch.num_pairs / n_pairs)
        return loss, out

    def terms(self, out, batch: PairBatch, n_pairs: float, n_tokens: float) -> dict[str, Tensor]:
        return {}  # one term

    def metrics(
        self, out, pol: SequenceLogps, batch: PairBatch
    ) -> dict[str, tuple[Tensor, Tensor]]:
        good = out.desirable
        logps = pol.chosen_logps.detach()
        b = torch.tensor(float(good.shape[0]), dtype=torch.float64)
        metrics = {
            "rewards/desirable": (torch.where(good, out.rewards, 0.0).sum(), _count(good)),
            "rewards/undesirable": (torch.where(~good, out.rewards, 0.0).sum(), _count(~good)),
            "logps/desirable": (torch.where(good, logps, 0.0).sum(), _count(good)),
            "logps/undesirable": (torch.where(~good, logps, 0.0).sum(), _count(~good)),
            "kl": (out.kl.detach() * b, b),
        }
        if pol.aux_loss is not None:
            metrics["aux_loss"] = (pol.aux_loss.detach() * b, b)
        return _zeroed(metrics) if batch.placeholder else metrics


def window_backward(
    model,
    reference,
    micro: list[PairBatch],
    objective: Objective | KTOObjective,
    *,
    layout: Layout,
    device,
    autocast,
    dist: DistContext,
    metrics: StepMetrics | None = None,
) -> int:
    """Forward and backward over one window of micro-batches; gradients equal one big batch's (the MoE
    router term excepted: a load-balancing loss is a product of batch means, so it is taken per micro-batch).

    Each micro-batch loss is ``Σ w·pair_losses / N_pairs + Σ w·token_losses / N_tokens`` with the window's
    totals over all ranks (docs/FORMULAS.md "Exact accumulation"), known before the first backward, plus the
    model's router term (MoE, when asked) weighted by the micro-batch's share of the pairs. Returns the
    window's pair count. A placeholder micro-batch (weight 0, an empty share on this rank) takes part in the
    forward/backward (DDP/FSDP hooks are collectives) but adds nothing to the totals, the gradient or the
    metrics.
    """
    totals = dist.all_reduce_sum(
        torch.tensor(
            [sum(b.num_pairs for b in micro), sum(b.chosen_tokens for b in micro)],
            dtype=torch.float64,
        )
    )
    n_pairs, n_tokens = float(totals[0]), max(float(totals[1]), 1.0)

    def forward(batch):
        batch = batch.to(device, non_blocking=True)
        with autocast():
            return layout.logps(model, batch), reference.logps(batch) if reference else None

    # What the objective needs from the whole window before any backward (KTO's z₀; pairs: nothing).
    window = objective.prepare(micro, forward, dist.all_reduce_sum)
    for i, batch in enumerate(micro):
        batch = batch.to(device, non_blocking=True)
        with grad_sync(dist, model, sync=i == len(micro) - 1), autocast():
            pol = layout.logps(model, batch)
            ref = reference.logps(batch) if reference else None
            loss, out = objective(pol, ref, batch, n_pairs, n_tokens, window)
            # x world_size: DDP/FSDP average gradients over ranks while our totals already span them.
            (loss * dist.world_size).backward()
        if metrics is not None:  # a placeholder adds zeros (the same names on every rank)
            metrics.add(
                loss.detach(),
                objective.metrics(out, pol, batch),
                objective.terms(out, batch, n_pairs, n_tokens),
            )
    return int(n_pairs)
