"""MLflow: one MLflow run per preftune run (continued by id on a resume), through ``MlflowClient``.

Store: MLflow's own tracking URI (``MLFLOW_TRACKING_URI``; a server, ``sqlite:///mlflow.db``, or a local
``file://`` folder, which MLflow 3 accepts only with ``MLFLOW_ALLOW_FILE_STORE=true``). Experiment:
``log.project``, else ``$MLFLOW_EXPERIMENT_NAME``, else preftune. The resolved config goes in twice: as
params (flattened ``optim.lr``, ...) and as the artifact ``config.json``; the metrics at their optimizer
step (``train/...``, ``eval/...``); the final report as the artifact ``report.json``. The client is used
directly (no ``mlflow.start_run``), so no global active run is touched.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from preftune.tracking.backends import DEFAULT_PROJECT, RunInfo, Tracker, log

_BATCH = 100  # params (and metrics) per log_batch call: MLflow's limit for params
_PARAM_CHARS = 6000  # MLflow's longest param value


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested sections -> dotted keys; lists and other values as their JSON text."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:_PARAM_CHARS]
    return out


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, info: RunInfo, state: Mapping[str, Any] | None) -> dict[str, Any]:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        uri = self.client.tracking_uri
        if state and state.get("run_id") and state.get("tracking_uri") == uri:
            try:
                self.client.get_run(state["run_id"])
                self.run_id = state["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            except Exception as e:  # deleted meanwhile: a new run, said once
                log.warning("mlflow: run %s not found (%s); starting a new run", state["run_id"], e)
        resumed = self.run_id is not None
        if not resumed:
            name = info.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            run = self.client.create_run(
                exp_id,
                run_name=info.run_name,
                tags={"preftune.run_dir": str(info.run_dir.resolve())},
            )
            self.run_id = run.info.run_id
        if info.config:
            # Params cannot change once set: a resume (possibly with forced changes) writes only the
            # artifact, which it replaces.
            if not resumed:
                from mlflow.entities import Param

                params = [Param(k, v) for k, v in flatten(info.config).items()]
                for i in range(0, len(params), _BATCH):
                    self.client.log_batch(self.run_id, params=params[i : i + _BATCH])
            self.client.log_dict(self.run_id, dict(info.config), "config.json")
        return {"run_id": self.run_id, "tracking_uri": uri}

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH])

    def summary(self, report: Mapping[str, Any]) -> None:
        self.client.log_dict(self.run_id, dict(report), "report.json")

    def close(self, failed: bool) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
            self.run_id = None


TRACKER = MlflowTracker
