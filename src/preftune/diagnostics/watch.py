"""The watcher the trainer calls: :class:`Diagnostics` holds the metric histories, decides from the loss
registry which rules apply to the run's loss (:attr:`LossSpec.init_loss`, :attr:`LossSpec.unbounded_margin`),
runs the rules of :mod:`preftune.diagnostics.rules` after each observation and reports each finding once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from preftune.diagnostics.rules import (
    Finding,
    check_grad_explosion,
    check_likelihood_displacement,
    check_long_warmup,
    check_nonfinite,
    check_overfitting,
    check_stuck_at_log2,
    check_unbounded_margins,
)
from preftune.losses import LOSSES, UNPAIRED_LOSSES, LossSpec

__all__ = ["Diagnostics", "init_loss_for"]


def _spec(name: str) -> LossSpec | None:
    """The registry's entry for a loss name (pair or unpaired), None for a name it does not know."""
    return LOSSES.get(name) or UNPAIRED_LOSSES.get(name)


def init_loss_for(
    names: Sequence[str] | str, weights: Sequence[float] | None = None
) -> float | None:
    """The loss at initialisation when every term states it (``LossSpec.init_loss``: log 2 per pair for the
    sigmoid family), weighted like the combination; else None.

    ``[sigmoid]`` → log 2; ``[cdpo]`` with weight 2 → 2 log 2; anything with an ``sft`` term, IPO, SimPO, ...
    → None (their initial value depends on the data or on β), which switches the log-2 rule off.
    """
    names = [names] if isinstance(names, str) else list(names)
    specs = [_spec(n) for n in names]
    if not names or any(s is None or s.init_loss is None for s in specs):
        return None
    weights = list(weights) if weights is not None else [1.0] * len(names)
    return sum(s.init_loss * w for s, w in zip(specs, weights))


class Diagnostics:
    """Holds the metric histories, runs the rules after each observation, reports each finding once.

    ``loss_names``/``loss_weights`` decide which rules apply, as the loss registry says: the stuck-at-init
    rule when every term states its initial loss (the sigmoid family), the unbounded-margins rule when a term's
    optimum is an infinite margin (``sigmoid``); ``init_loss`` overrides the derived initial loss. A rule that has
    fired stays quiet for ``repeat_after`` steps (None: for the rest of the run), so a stuck run prints one
    warning, not one per log line.
    """

    def __init__(
        self,
        *,
        loss_names: Sequence[str] = ("sigmoid",),
        loss_weights: Sequence[float] | None = None,
        warmup_steps: int = 0,
        init_loss: float | None = None,
        repeat_after: int | None = None,
        max_history: int = 2000,
    ) -> None:
        self.loss_names = [loss_names] if isinstance(loss_names, str) else list(loss_names)
        self.init_loss = (
            init_loss if init_loss is not None else init_loss_for(self.loss_names, loss_weights)
        )
        self.unbounded_margin = any(
            (spec := _spec(n)) is not None and spec.unbounded_margin for n in self.loss_names
        )
        self.warmup_steps = warmup_steps
        self.repeat_after = repeat_after
        self.max_history = max_history
        self.train: list[dict[str, Any]] = []
        self.eval: list[dict[str, Any]] = []
        self.findings: list[Finding] = []
        self._last_fired: dict[str, int] = {}

    def observe_train(self, metrics: Mapping[str, Any], step: int | None = None) -> list[Finding]:
        """Record one logged train step; return the findings that are new at this step.

        The optimizer step comes from ``step``, else ``metrics["step"]``; pass it -- without either the
        count of logged rows stands in, which makes ``warmup_steps`` and ``repeat_after`` count log lines.
        """
        row = dict(metrics)
        if step is not None:
            row["step"] = step
        elif "step" not in row:
            row["step"] = (self.train[-1]["step"] + 1) if self.train else 1
        self._append(self.train, row)
        t = self.train
        return self._emit(
            [
                check_nonfinite(t),
                check_grad_explosion(t),
                check_stuck_at_log2(t, init_loss=self.init_loss, warmup_steps=self.warmup_steps),
                check_likelihood_displacement(t),
                check_unbounded_margins(t) if self.unbounded_margin else None,
            ]
        )

    def observe_setup(self, total_steps: int) -> list[Finding]:
        """Findings about the run's settings, before the first step (a warm-up too long for the run)."""
        return self._emit([check_long_warmup(self.warmup_steps, total_steps)])

    def observe_eval(self, metrics: Mapping[str, Any], step: int | None = None) -> list[Finding]:
        """Record one evaluation (keys plain or ``eval/``-prefixed); return new findings.

        Without ``step`` (or ``metrics["step"]``) the eval is dated at the last observed train step.
        """
        row = {k.removeprefix("eval/"): v for k, v in metrics.items()}
        if step is not None:
            row["step"] = step
        elif "step" not in row:
            row["step"] = self.train[-1]["step"] if self.train else 0
        self._append(self.eval, row)
        return self._emit([check_overfitting(self.train, self.eval)])

    def observe(
        self, split: str, metrics: Mapping[str, Any], step: int | None = None
    ) -> list[Finding]:
        """:meth:`observe_train` (``split="train"``) or :meth:`observe_eval` (any other split)."""
        if split == "train":
            return self.observe_train(metrics, step=step)
        return self.observe_eval(metrics, step=step)

    def report(self) -> list[dict[str, Any]]:
        """All findings so far as JSON-ready dicts, for the run folder's report."""
        return [f.to_dict() for f in self.findings]

    def _append(self, history: list[dict[str, Any]], row: dict[str, Any]) -> None:
        history.append(row)
        if len(history) > self.max_history:
            del history[: len(history) - self.max_history]

    def _emit(self, candidates: list[Finding | None]) -> list[Finding]:
        new = []
        for f in candidates:
            if f is None:
                continue
            last = self._last_fired.get(f.rule)
            if last is not None and (
                self.repeat_after is None or f.step - last < self.repeat_after
            ):
                continue
            self._last_fired[f.rule] = f.step
            self.findings.append(f)
            new.append(f)
        return new
