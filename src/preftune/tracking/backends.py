"""Experiment trackers behind ``log.report_to``: the names, their libraries, and TensorBoard.

Each tracker is a :class:`Tracker` that the :class:`~preftune.tracking.MetricsLogger` drives on rank 0:
``start`` (run name, project, resolved config; on a resume the state it returned last time), ``log`` (numeric
metrics as ``<split>/<key>`` at the optimizer step), ``summary`` (the final report) and ``close``. W&B,
MLflow and trackio live in their own modules and are imported only when named; each is an optional extra,
and a missing library is a :class:`TrackerError` (a ConfigError: the CLI exits 2) before training starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune._configio import ConfigError, suggest

log = logging.getLogger("preftune.tracking")

#: The trackers ``log.report_to`` accepts (besides ``none``), in the order they are started.
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
#: tracker -> (module to import, the preftune extra that installs it)
_LIBRARIES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
DEFAULT_PROJECT = "preftune"


class TrackerError(ConfigError):
    """A tracker named in ``log.report_to`` cannot run (library missing, or its store refused to open)."""


def install_hint(name: str) -> str:
    return f"log.report_to: {name} needs `pip install 'preftune[{_LIBRARIES[name][1]}]'`"


def library_available(name: str) -> bool:
    """Whether the tracker's library is installed (a spec lookup: nothing is imported)."""
    module = _LIBRARIES[name][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_report_to(
    report_to: Sequence[str] | str | None, tensorboard: bool | None = None
) -> tuple[str, ...]:
    """The trackers to run: ``report_to`` checked (known names, ``none`` alone, no repeats), then the
    deprecated ``log.tensorboard`` applied (false drops tensorboard, true adds it). ``None`` is the
    default, ``[tensorboard]``; ``[none]`` and ``[]`` mean metrics.jsonl only."""
    if report_to is None:
        names = ["tensorboard"]
    elif isinstance(report_to, str):
        names = [report_to]
    else:
        names = list(report_to)
    names = [str(n).strip().lower() for n in names]
    for n in names:
        if n not in (*TRACKERS, "none"):
            raise ConfigError(
                f"log.report_to: unknown tracker {n!r}{suggest(n, (*TRACKERS, 'none'))}; "
                f"expected any of {', '.join(TRACKERS)}, or none"
            )
    if "none" in names and len(names) > 1:
        raise ConfigError(f"log.report_to: 'none' stands alone, got {names}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"log.report_to: {repeated[0]} is named twice in {names}")
    chosen = {n for n in names if n != "none"}
    if tensorboard is False:
        chosen.discard("tensorboard")
    elif tensorboard is True:
        chosen.add("tensorboard")
    return tuple(n for n in TRACKERS if n in chosen)


_warned_alias = False


def check_report_to(log_cfg: Any) -> tuple[str, ...]:
    """Validate ``log.report_to`` (and the deprecated ``log.tensorboard``) of a LogConfig and check that
    each named tracker's library is installed; tensorboard, the default, may be absent (it is skipped)."""
    global _warned_alias
    tb = getattr(log_cfg, "tensorboard", None)
    names = resolve_report_to(log_cfg.report_to, tb)
    if tb is not None and not _warned_alias:
        _warned_alias = True
        log.warning(
            "log.tensorboard is deprecated: use log.report_to (this run: [%s])",
            ", ".join(names) or "none",
        )
    for name in names:
        if name != "tensorboard" and not library_available(name):
            raise TrackerError(install_hint(name))
    return names


@dataclass
class RunInfo:
    """What every tracker is started with."""

    run_dir: Path
    run_name: str
    project: str | None = None
    config: Mapping[str, Any] | None = None
    #: the optimizer step the run resumes from (0: a fresh start; None: not said)
    resume_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Tracker:
    """One experiment tracker. ``start`` returns what a resumed run needs to continue the same tracker
    run (stored in metrics.jsonl as a ``split: trackers`` row), or None."""

    name = ""

    def start(self, info: RunInfo, state: Mapping[str, Any] | None) -> dict[str, Any] | None:
        return None

    def log(self, step: int, values: Mapping[str, float]) -> None:
        raise NotImplementedError

    def summary(self, report: Mapping[str, Any]) -> None:
        """Record the final report (report.json's contents)."""

    def close(self, failed: bool) -> None:
        """Finish the tracker run: ``failed`` when the run did not reach its final report."""


class TensorBoardTracker(Tracker):
    """Event files in ``run_dir/tensorboard``; a resume rewinds them with ``purge_step``. Optional: without
    the tensorboard package it is skipped, as it always was (it is the default)."""

    name = "tensorboard"

    def __init__(self) -> None:
        self._writer: Any = None
        self._info: RunInfo | None = None

    def start(self, info: RunInfo, state: Mapping[str, Any] | None) -> None:
        self._info = info
        return None

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            info = self._info
            assert info is not None
            purge = None if info.resume_step is None else info.resume_step + 1
            self._writer = SummaryWriter(
                log_dir=str(info.run_dir / "tensorboard"), purge_step=purge
            )
        for k, v in values.items():
            self._writer.add_scalar(k, v, step)
        self._writer.flush()

    def close(self, failed: bool) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def make_tracker(name: str) -> Tracker:
    """A not yet started tracker; TrackerError (naming the extra) when its library is not installed."""
    if not library_available(name):
        raise TrackerError(install_hint(name))
    if name == "tensorboard":
        return TensorBoardTracker()
    module = importlib.import_module(f"preftune.tracking._{name}")  # imports no tracker library yet
    return module.TRACKER()


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line, for messages that must stay one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
