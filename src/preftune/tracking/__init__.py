"""What the user sees: metrics.jsonl, the trackers of ``log.report_to``, a progress bar, curve plots and
atomic JSON files.

- :mod:`~preftune.tracking.logger`: :class:`MetricsLogger` (metrics.jsonl, resume truncation, and the
  trackers on rank 0);
- :mod:`~preftune.tracking.backends`: the ``log.report_to`` names, their extras, TensorBoard; W&B, MLflow
  and trackio in ``_wandb``, ``_mlflow``, ``_trackio`` (each imported only when named);
- :mod:`~preftune.tracking.progress`: :class:`ProgressBar`; :mod:`~preftune.tracking.plots`: :func:`plot_run`;
- :mod:`~preftune.tracking._files`: :func:`write_json`, :func:`read_metrics`, :func:`format_line`.
"""

from __future__ import annotations

from preftune.tracking._files import (
    METRICS_FILE,
    TOKENS_PER_S,
    format_line,
    read_metrics,
    write_json,
)
from preftune.tracking.backends import (
    TRACKERS,
    TrackerError,
    check_report_to,
    resolve_report_to,
)
from preftune.tracking.logger import MetricsLogger
from preftune.tracking.plots import plot_run
from preftune.tracking.progress import ProgressBar

__all__ = [
    "METRICS_FILE",
    "TOKENS_PER_S",
    "TRACKERS",
    "MetricsLogger",
    "ProgressBar",
    "TrackerError",
    "check_report_to",
    "format_line",
    "plot_run",
    "read_metrics",
    "resolve_report_to",
    "write_json",
]
