"""Metrics of docs/FORMULAS.md "Metrics", accumulated on device and synced only when read.

:class:`StepMetrics` sums per-pair quantities as tensors during training (no host sync per micro-step) and
sums them over ranks when asked (:meth:`StepMetrics.all_reduce`); :func:`evaluate` runs the loss over an eval
split without gradients. The ``preftune eval`` command's wiring (models and data from paths) is
:mod:`preftune.cli.evaluate`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from preftune.model import Layout

__all__ = ["StepMetrics", "evaluate"]


class StepMetrics:
    """Running sums (and counts) of named metrics since the last read, on the device: no host sync per
    micro-step. The objective says what a micro-batch contributes (:meth:`Objective.metrics`); a metric is
    read as its sum over its count (pairs for the pair metrics, desirable rows for KTO's, ...)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}
        self.terms: dict[str, Tensor] = {}  # named parts of the loss, summed like it
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=self.device)
        self.steps = 0

    def add(
        self,
        loss_contribution: Tensor,
        values: dict[str, tuple[Tensor, Tensor]],
        terms: dict[str, Tensor] | None = None,
    ) -> None:
        """One micro-batch: its share of the window loss (already normalised), ``{name: (sum, count)}``,
        and its share of each named part of the loss (read like the loss: per optimizer step)."""
        self.loss += loss_contribution.detach().double()
        for name, value in (terms or {}).items():
            value = value.detach().double().to(self.device)
            self.terms[name] = self.terms[name] + value if name in self.terms else value.clone()
        for name, (total, count) in values.items():
            total = total.detach().double().to(self.device)
            count = torch.as_tensor(count, dtype=torch.float64, device=self.device)
            if name in self.sums:
                self.sums[name] += total
                self.counts[name] += count
            else:
                self.sums[name], self.counts[name] = total.clone(), count.clone()

    def add_grad_norm(self, grad_norm: Tensor) -> None:
        self.grad_norm += grad_norm.detach().double()
        self.steps += 1

    def packed(self) -> tuple[list[str], Tensor]:
        """``(names, [sums..., counts..., terms..., loss])`` in name order (terms after the metric names):
        what the ranks sum together."""
        names, terms = sorted(self.sums), sorted(self.terms)
        parts = [self.sums[n].view(1) for n in names] + [self.counts[n].view(1) for n in names]
        parts += [self.terms[n].view(1) for n in terms]
        return [*names, *terms], torch.cat([*parts, self.loss.view(1)])

    def all_reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Sum the window sums, counts, terms and loss over ranks (``DistContext.all_reduce_sum``), so that
        the means :meth:`pop` returns are global (the grad norm already is). Every rank has the same metric
        names (the same objective), so the packed tensors line up."""
        names, packed = self.packed()
        self.unpack(names, reduce_sum(packed))

    def unpack(self, names: list[str], packed: Tensor) -> None:
        terms = [n for n in names if n in self.terms]
        names = [n for n in names if n not in self.terms]
        k, t = len(names), len(terms)
        self.sums = {n: packed[i].clone() for i, n in enumerate(names)}
        self.counts = {n: packed[k + i].clone() for i, n in enumerate(names)}
        self.terms = {n: packed[2 * k + i].clone() for i, n in enumerate(terms)}
        self.loss = packed[2 * k + t].clone()

    def pop(self) -> dict[str, float]:
        """Means since the last read (one host sync), then reset. A metric with count 0 is left out."""
        all_names, packed = self.packed()
        values = torch.cat([packed, self.grad_norm.view(1)]).tolist()
        terms = [n for n in all_names if n in self.terms]
        names = [n for n in all_names if n not in self.terms]
        k, t = len(names), len(terms)
        steps = max(self.steps, 1)
        row = {"loss": values[2 * k + t] / steps}
        for i, name in enumerate(terms):
            row[name] = values[2 * k + i] / steps
        for i, name in enumerate(names):
            if values[k + i] > 0:
                row[name] = values[i] / values[k + i]
        if self.steps:
            row["grad_norm"] = values[-1] / self.steps
        self.reset()
        return row


@torch.no_grad()
def evaluate(
    module,
    reference,
    dataset,
    layout: Layout,
    objective,
    *,
    batch_size: int,
    device: torch.device,
    autocast=contextlib.nullcontext,
    split: str = "eval",
) -> dict[str, float]:
    """Loss and pair metrics over a whole split; the loss is reduced exactly as in training.

    ``module`` is ``layout``'s log-prob module around the policy (or a DDP/FSDP wrapper of one);
    ``objective`` a :class:`preftune.objective.Objective` (the loss exactly as in training).
    """
    metrics = StepMetrics(device)
    n = len(dataset)
    micro = [
        layout.collate([dataset[i] for i in range(s, min(s + batch_size, n))])
        for s in range(0, n, batch_size)
    ]
    total_pairs = float(sum(b.num_pairs for b in micro))
    total_tokens = float(max(sum(b.chosen_tokens for b in micro), 1))
    was_training = module.training
    module.eval()

    def forward(batch):
        batch = batch.to(device)
        with autocast():
            return layout.logps(module, batch), reference.logps(batch, split) if reference else None

    try:
        window = objective.prepare(micro, forward, lambda t: t)  # the whole split is one window
        for batch in micro:
            batch = batch.to(device)
            with autocast():
                pol = layout.logps(module, batch)
                ref = reference.logps(batch, split) if reference else None
                loss, out = objective(pol, ref, batch, total_pairs, total_tokens, window)
            metrics.add(
                loss,
                objective.metrics(out, pol, batch),
                objective.terms(out, batch, total_pairs, total_tokens),
            )
    finally:
        module.train(was_training)
    metrics.steps = 1
    row = metrics.pop()
    row.pop("grad_norm", None)
    return row
