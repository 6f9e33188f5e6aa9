"""The objective of one micro-batch: the loss options, the configured loss, and its reduction over the
accumulation window. The one place where the trainer and the evaluator turn log-probs into a loss.

For a micro-batch of an accumulation window with ``N_pairs`` pairs and ``N_tokens`` chosen tokens in total
(over all micro-batches and ranks, FORMULAS.md "Exact accumulation"):

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

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from preftune.losses import LossOutput, ld_logps, wpo_weights
from preftune.model import PairBatch, SequenceLogps

__all__ = ["Objective"]


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

    def __call__(
        self,
        pol: SequenceLogps,
        ref,  # preftune.reference.ReferenceLogps | None
        batch: PairBatch,
        n_pairs: float,
        n_tokens: float,
    ) -> tuple[Tensor, LossOutput]:
        """``(loss, out)``: this micro-batch's share of the window loss, and the loss's per-pair output."""
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
        weights = batch.weights
        if self.wpo:
            weights = weights * wpo_weights(
                pol.chosen_logps,
                pol.rejected_logps,
                pol.chosen_tokens,
                pol.rejected_tokens,
                pol.chosen_log_collision,
                pol.rejected_log_collision,
            ).to(weights.dtype)
        loss = out.reduce(n_pairs, n_tokens, weights=weights)
        if pol.aux_loss is not None:
            loss = loss + pol.aux_loss * (batch.num_pairs / n_pairs)
        return loss, out
