"""Live diagnostics: recognise known DPO failure patterns in the metric history and say what to try.

Why: the usual way a preference run fails is silently -- the loss sits at log 2, or both log-probs sink --
and the user finds out after hours. Each rule here is a small pure function of the history (issue 5, "Live
diagnostics"; the notes of docs/FORMULAS.md "Troubleshooting", which correct the seed's table: the loss is log 2 at
initialisation for *every* β, so "raise β when the loss is flat" is not advice given here).

Histories
---------
``train``: one dict per logged train step with the keys of docs/FORMULAS.md "Metrics": ``step``, ``loss``,
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected``, ``grad_norm``, ``learning_rate`` (missing keys make the rules that need them silent).
``eval``: one dict per evaluation with ``step`` (the train step it ran at) and the same keys, either plain
(``loss``) or prefixed (``eval/loss``); :meth:`Diagnostics.observe_eval` strips the prefix.

Every rule (:mod:`~preftune.diagnostics.rules`) returns a :class:`Finding` or None. :class:`Diagnostics`
(:mod:`~preftune.diagnostics.watch`) holds the histories, runs the rules that apply to the run's loss (read
from the loss registry) after each observation and reports each rule once (again only after
``repeat_after`` steps).
"""

from preftune.diagnostics.rules import (
    Finding,
    check_grad_explosion,
    check_likelihood_displacement,
    check_long_warmup,
    check_nonfinite,
    check_overfitting,
    check_stuck_at_log2,
    check_unbounded_margins,
    format_warning,
)
from preftune.diagnostics.watch import Diagnostics, init_loss_for

__all__ = [
    "Diagnostics",
    "Finding",
    "check_grad_explosion",
    "check_likelihood_displacement",
    "check_long_warmup",
    "check_nonfinite",
    "check_overfitting",
    "check_stuck_at_log2",
    "check_unbounded_margins",
    "format_warning",
    "init_loss_for",
]
