"""trackio: one trackio run per preftune run, in a local database (``$TRACKIO_DIR``, read when trackio is
first imported; default ``~/.cache/huggingface/trackio``), continued by name on a resume.

Project: ``log.project``, else preftune. The config goes to the run's config, the metrics at their
optimizer step (``train/...``, ``eval/...``), the final report as the artifact ``report`` (report.json).
trackio's own start and finish banners are swallowed for one log line; ``trackio show --project NAME``
opens its dashboard.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from preftune.tracking.backends import DEFAULT_PROJECT, RunInfo, Tracker, log


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self) -> None:
        self.run: Any = None

    def start(self, info: RunInfo, state: Mapping[str, Any] | None) -> dict[str, Any]:
        import trackio

        project = (state or {}).get("project") or info.project or DEFAULT_PROJECT
        name = (state or {}).get("name") or info.run_name
        with contextlib.redirect_stdout(io.StringIO()):
            self.run = trackio.init(
                project=project,
                name=name,
                config=dict(info.config) if info.config else None,
                resume="allow" if state else "never",
                embed=False,
            )
        from trackio.utils import TRACKIO_DIR

        log.info(
            "trackio: run %s in project %s (%s); view with `trackio show --project %s`",
            self.run.name, project, TRACKIO_DIR, project,
        )  # fmt: skip
        return {"project": project, "name": self.run.name}

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def summary(self, report: Mapping[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "report.json"
            path.write_text(json.dumps(dict(report), indent=2), encoding="utf-8")
            self.run.log_artifact(path, name="report", type="report")

    def close(self, failed: bool) -> None:
        if self.run is not None:
            from trackio import context_vars

            with contextlib.redirect_stdout(io.StringIO()):
                self.run.finish()
            # As trackio.finish() does, so that trackio does not finish it again at exit.
            if context_vars.current_run.get() is self.run:
                context_vars.current_run.set(None)
            self.run = None


TRACKER = TrackioTracker
