"""MetricsLogger: metrics.jsonl, and the trackers of ``log.report_to`` (TensorBoard, W&B, MLflow, trackio).

Why these shapes:

- ``metrics.jsonl`` is one JSON object per logged step (``{"step", "split", "time", **metrics}``), appended and
  flushed line by line, so a killed run keeps everything it logged and a resumed run continues the same file.
  A resume first calls :meth:`MetricsLogger.truncate_after` to drop the lines the killed run wrote after the
  checkpoint it resumes from (they are logged again, so keeping them would duplicate steps), and a line cut
  in half by the kill is dropped too.
- Metric keys are stored without a split prefix; the ``split`` field says train or eval (``eval/loss`` logged
  with ``split="eval"`` is stored as ``loss``). Trackers get ``<split>/<key>`` (``train/loss``,
  ``eval/loss``), numbers only, at the optimizer step.
- Trackers are checked at construction (library missing: TrackerError, a ConfigError naming the extra),
  started by :meth:`start` (or the first log), given the final report by :meth:`summary` and finished by
  :meth:`close` (failed unless the summary came). What a resume needs to continue the same tracker run
  (W&B id, MLflow run id, trackio name) is a ``split: trackers`` row of metrics.jsonl. On a resume the
  steps the killed process already sent to a continued tracker run are not sent again (a resume is
  bitwise, so they hold the same numbers); TensorBoard rewinds with ``purge_step`` instead.
- A tracker that fails while logging is reported once and then left out: metrics.jsonl has everything.
- Non-main ranks construct the same object and get no-ops, so the trainer needs no ``if rank == 0``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune.tracking import backends
from preftune.tracking._files import METRICS_FILE, _json_default, _scalar, format_line
from preftune.tracking.backends import (
    RunInfo,
    Tracker,
    TrackerError,
    first_line,
    make_tracker,
    resolve_report_to,
)

log = logging.getLogger("preftune.tracking")

TRACKERS_SPLIT = "trackers"


class MetricsLogger:
    """Appends metrics to ``run_dir/metrics.jsonl`` and sends them to the trackers of ``report_to``.

    ``report_to``: any of tensorboard, wandb, mlflow, trackio (default ``[tensorboard]``; ``[]`` or
    ``[none]``: the file only). ``tensorboard`` is the deprecated switch (False drops it, True adds it).
    ``run_name`` defaults to the run folder's name; ``config`` (the resolved config) goes to each tracker.
    The file is opened lazily (after a possible :meth:`truncate_after`) in append mode and flushed after
    every line. ``is_main=False`` makes every method a no-op (other ranks of a distributed run).
    """

    format_line = staticmethod(format_line)

    def __init__(
        self,
        run_dir: str | Path,
        *,
        report_to: Sequence[str] | str | None = None,
        tensorboard: bool | None = None,
        run_name: str | None = None,
        project: str | None = None,
        config: Mapping[str, Any] | None = None,
        is_main: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.report_to = resolve_report_to(report_to, tensorboard)
        self.tensorboard = "tensorboard" in self.report_to
        self.run_name = run_name or self.run_dir.resolve().name
        self.project = project
        self.config = dict(config) if config is not None else None
        self.is_main = is_main
        self._file: Any = None
        self._resume_step: int | None = None  # set by truncate_after
        self._sent_upto: int | None = None  # the last step the killed process logged (a resume)
        self._trackers: list[Tracker] = []
        self._skip_upto: dict[str, int] = {}
        self._started = False
        self._summarized = False
        self._names: tuple[str, ...] = ()
        if not is_main:
            return
        for name in self.report_to:
            if name == "tensorboard" and not backends.library_available(name):
                log.info("log.report_to: tensorboard is not installed; skipped")
                continue
            self._trackers.append(make_tracker(name))  # TrackerError names the extra
        self._names = tuple(t.name for t in self._trackers)

    @classmethod
    def from_config(cls, cfg: Any, *, is_main: bool = True) -> MetricsLogger:
        """The logger a run's Config asks for: ``log.report_to`` / ``run_name`` / ``project``, the run
        folder ``train.output_dir`` and the resolved config for the trackers."""
        from preftune._configio import config_to_dict

        lc = cfg.log
        return cls(
            cfg.train.output_dir,
            report_to=lc.report_to,
            tensorboard=getattr(lc, "tensorboard", None),
            run_name=lc.run_name,
            project=lc.project,
            config=config_to_dict(cfg),
            is_main=is_main,
        )

    @property
    def trackers(self) -> tuple[str, ...]:
        """The trackers this logger runs (none off rank 0; tensorboard left out when not installed)."""
        return self._names

    # -- the run's lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the trackers (idempotent; the first :meth:`log` calls it too). On a resume (after
        ``truncate_after(step > 0)``) each continues the tracker run recorded in metrics.jsonl. A tracker
        that cannot start raises TrackerError, one line, before any training step."""
        if not self.is_main or self._started:
            return
        self._started = True
        previous = self._recorded_trackers() if self._resume_step else {}
        info = RunInfo(
            run_dir=self.run_dir,
            run_name=self.run_name,
            project=self.project,
            config=self.config,
            resume_step=self._resume_step,
        )
        states: dict[str, Any] = {}
        for i, tracker in enumerate(self._trackers):
            state = previous.get(tracker.name)
            try:
                new_state = tracker.start(info, state)
            except Exception as e:
                for started in self._trackers[:i]:
                    self._quietly(started.close, True)
                self._trackers = []
                raise TrackerError(
                    f"log.report_to: {tracker.name} could not start: {first_line(e)}"
                ) from e
            if new_state is not None:
                states[tracker.name] = new_state
            if state is not None and self._sent_upto is not None:
                self._skip_upto[tracker.name] = self._sent_upto
        if states:
            step = self._resume_step or 0
            self._write_row({"step": step, "split": TRACKERS_SPLIT, "time": time.time(), **states})

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Append ``{"step", "split", "time", **metrics}`` (keys without a ``<split>/`` prefix) and send
        the numbers to the trackers as ``<split>/<key>``."""
        if not self.is_main:
            return
        if self._trackers:
            self.start()
        clean = {k.removeprefix(f"{split}/"): _scalar(v) for k, v in metrics.items()}
        self._write_row({"step": int(step), "split": split, "time": time.time(), **clean})
        if not self._trackers:
            return
        values = {
            f"{split}/{k}": v
            for k, v in clean.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if values:
            self._send("log", int(step), values)

    def summary(self, report: Mapping[str, Any]) -> None:
        """Give the trackers the final report (report.json's contents); the run then counts as finished."""
        if not self.is_main:
            return
        self._summarized = True
        if not self._trackers:
            return
        self.start()
        plain = json.loads(json.dumps(dict(report), default=_json_default))
        self._send("summary", None, plain)

    def truncate_after(self, step: int) -> int:
        """Drop lines with ``step`` above the resumed step (and any half-written line); return how many.

        TensorBoard is told the same through ``purge_step``, so its curves do not double back either;
        trackers that continue their run skip the steps the killed process already sent.
        """
        if not self.is_main:
            return 0
        self._resume_step = int(step)
        self._close_file()
        if not self.path.is_file():
            return 0
        kept, dropped, last = [], 0, None
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                row_step = int(row["step"])
            except (ValueError, KeyError, TypeError, IndexError):
                row, row_step = None, None
            if row_step is not None and row.get("split") in ("train", "eval"):
                last = row_step if last is None else max(last, row_step)
            if row_step is not None and row_step <= step:
                kept.append(line + "\n")
            elif line.strip():
                dropped += 1
        self._sent_upto = last
        if dropped:
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)
        return dropped

    def close(self, failed: bool | None = None) -> None:
        """Close the file and finish the trackers: ``failed`` defaults to "no summary was given"."""
        self._close_file()
        if failed is None:
            failed = not self._summarized
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            if self._started:
                self._quietly(tracker.close, failed)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)

    # -- internals --------------------------------------------------------------------------------

    def _send(self, method: str, step: int | None, payload: Mapping[str, Any]) -> None:
        for tracker in list(self._trackers):
            if step is not None and step <= self._skip_upto.get(tracker.name, -1):
                continue  # the killed process sent this step to the same tracker run
            try:
                if step is None:
                    getattr(tracker, method)(payload)
                else:
                    getattr(tracker, method)(step, payload)
            except Exception as e:
                at = f" at step {step}" if step is not None else ""
                log.warning(
                    "log.report_to: %s failed%s (%s); it gets no more metrics (metrics.jsonl has them)",
                    tracker.name, at, first_line(e),
                )  # fmt: skip
                self._trackers.remove(tracker)
                self._quietly(tracker.close, True)

    @staticmethod
    def _quietly(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # finishing a broken tracker must not hide the run's own error
            log.warning("log.report_to: closing a tracker failed (%s)", first_line(e))

    def _recorded_trackers(self) -> dict[str, Any]:
        """The tracker states of the latest ``split: trackers`` row kept in metrics.jsonl."""
        if not self.path.is_file():
            return {}
        found: dict[str, Any] = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("split") == TRACKERS_SPLIT:
                found = {k: v for k, v in row.items() if isinstance(v, dict)}
        return found

    def _write_row(self, row: Mapping[str, Any]) -> None:
        if self._file is None:
            self._open()
        self._file.write(json.dumps(row, default=_json_default) + "\n")
        self._file.flush()

    def _open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:  # a kill mid-line leaves a tail without "\n": cut it
                data = f.read()
                if not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
