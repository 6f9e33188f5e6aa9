"""Weights & Biases: one W&B run per preftune run, continued by id on a resume.

Project: ``log.project``, else ``$WANDB_PROJECT``, else preftune. Files: ``$WANDB_DIR`` when set, else the
run folder (``RUN/wandb/``). Offline mode, entity, API key and the rest are W&B's own settings
(``WANDB_MODE=offline``, ``WANDB_ENTITY``, ...). The config goes to the run's config, the metrics to its
history at the optimizer step (``train/...``, ``eval/...``), the final report to its summary as ``report``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from preftune.tracking.backends import DEFAULT_PROJECT, RunInfo, Tracker


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self) -> None:
        self.run: Any = None

    def start(self, info: RunInfo, state: Mapping[str, Any] | None) -> dict[str, Any]:
        import wandb

        directory = os.environ.get("WANDB_DIR") or str(info.run_dir)
        os.makedirs(directory, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if state and state.get("id"):
            kwargs.update(id=state["id"], resume="allow")
        self.run = wandb.init(
            project=info.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=info.run_name,
            dir=directory,
            settings=wandb.Settings(reinit="create_new"),  # never finishes a run the caller holds
            **kwargs,
        )
        if info.config:
            # Through update, so that a resume with (forced) changed settings records the new values.
            self.run.config.update(dict(info.config), allow_val_change=True)
        return {"id": self.run.id, "project": self.run.project}

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def summary(self, report: Mapping[str, Any]) -> None:
        self.run.summary["report"] = dict(report)

    def close(self, failed: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


TRACKER = WandbTracker
