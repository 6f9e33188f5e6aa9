"""The trackers of log.report_to, offline: W&B's offline run file, MLflow's file store, trackio's database.

Each test drives a MetricsLogger the way the trainer does (truncate_after, start, train and eval rows,
summary, close) and reads what landed through the tracker's own files: the records of W&B's ``.wandb``
transaction log (W&B's protobuf), ``MlflowClient.get_metric_history``, trackio's SQLite tables. Nothing
touches the network: W&B is offline, MLflow a ``file://`` store, trackio a local folder, telemetry off.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from preftune.tracking import MetricsLogger, read_metrics

CONFIG = {
    "model": {"path": "tiny"},
    "loss": {"name": ["sigmoid"], "beta": 0.1},
    "optim": {"lr": 5e-7, "betas": [0.9, 0.999]},
    "log": {"report_to": ["wandb", "mlflow", "trackio"], "run_name": "tiny-run"},
}
REPORT = {"steps": 4, "final_eval": {"loss": 0.25, "rewards/accuracies": 0.75}, "diagnostics": []}
STEPS = (1, 2, 3, 4)
EVAL_STEPS = (2, 4)


def _train(step: int) -> dict:
    return {"loss": 1.0 / step, "rewards/accuracies": 0.5 + step / 10, "learning_rate": 1e-7 * step}


def _eval(step: int) -> dict:
    return {"eval/loss": 2.0 / step, "eval/rewards/accuracies": step / 8}


def _drive(run_dir, report_to, *, steps=STEPS, resume_from=0, summary=True):
    """What the trainer does with its MetricsLogger; returns the logger (closed)."""
    logger = MetricsLogger(
        run_dir, report_to=report_to, run_name="tiny-run", project="preftune-test", config=CONFIG
    )
    logger.truncate_after(resume_from)
    logger.start()
    for step in steps:
        logger.log(step, _train(step))
        if step in EVAL_STEPS:
            logger.log(step, _eval(step), split="eval")
    if summary:
        logger.summary(REPORT)
    logger.close()
    return logger


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Every tracker offline and quiet, with its files under tmp_path."""
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB__DISABLE_STATS": "true",
        "WANDB__DISABLE_META": "true",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("WANDB_PROJECT", "WANDB_API_KEY", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


# ---------------------------------------------------------------------------------------------------
# W&B: the offline run folder's .wandb file (a LevelDB-style log of wandb_internal_pb2.Record)


def _wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        chunk, pos = data[pos : pos + n], pos + n
        buf = (
            chunk if kind in (1, 2) else buf + chunk
        )  # FULL/FIRST start a record, MIDDLE/LAST extend
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _wandb_run(run_folder: Path) -> dict:
    """The run's records; W&B's service writes the file after ``finish`` returns: wait for the exit."""
    (wandb_file,) = run_folder.glob("run-*.wandb")
    deadline = time.monotonic() + 20
    while True:
        records = _wandb_records(wandb_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"no exit record in {wandb_file}"
        time.sleep(0.05)
    out = {"history": [], "summary": {}, "config": {}, "run": None, "exit": None}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append(
                {_item_key(i): json.loads(i.value_json) for i in rec.history.item}
            )
        elif kind == "summary":
            out["summary"].update(
                {_item_key(i): json.loads(i.value_json) for i in rec.summary.update}
            )
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


def test_wandb_offline_run(offline):
    pytest.importorskip("wandb")
    run_dir = offline / "runs" / "exp1"
    logger = _drive(run_dir, ["wandb"])
    assert logger.trackers == ("wandb",)
    (folder,) = (offline / "wandb-dir" / "wandb").glob("offline-run-*")
    run = _wandb_run(folder)
    assert run["run"].display_name == "tiny-run" and run["run"].project == "preftune-test"
    assert run["config"]["optim"] == CONFIG["optim"] and run["config"]["loss"]["beta"] == 0.1
    by_step = {row["_step"]: row for row in run["history"]}
    assert sorted(by_step) == list(STEPS)
    for step in STEPS:
        assert by_step[step]["train/loss"] == pytest.approx(1.0 / step)
        assert by_step[step]["train/learning_rate"] == pytest.approx(1e-7 * step)
        assert ("eval/loss" in by_step[step]) == (step in EVAL_STEPS)
    assert by_step[4]["eval/loss"] == pytest.approx(0.5)
    assert run["summary"]["report"] == REPORT
    assert run["exit"] == 0
    # The id is on record in metrics.jsonl for a resume.
    (row,) = read_metrics(run_dir, split="trackers")
    assert row["wandb"]["id"] == run["run"].run_id


def test_wandb_resume_continues_the_run(offline, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_DIR")  # W&B's files then go in the run folder
    run_dir = offline / "runs" / "exp2"
    _drive(run_dir, ["wandb"], steps=(1, 2, 3), summary=False)  # killed after step 3...
    _drive(run_dir, ["wandb"], steps=(3, 4), resume_from=2)  # ...resumed from its step-2 checkpoint
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    first, second = (_wandb_run(f) for f in folders)
    assert first["run"].run_id == second["run"].run_id
    assert first["exit"] == 1  # no final report: marked failed
    assert [r["_step"] for r in first["history"]] == [1, 2, 3]
    assert [r["_step"] for r in second["history"]] == [4]  # step 3 was sent by the killed process
    assert second["summary"]["report"] == REPORT and second["exit"] == 0
    assert [r["step"] for r in read_metrics(run_dir, split="train")] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------
# MLflow: a file store, read back through MlflowClient


def _mlflow_run(offline):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(offline / "mlruns").as_uri())
    exp = client.get_experiment_by_name("preftune-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_file_store(offline):
    pytest.importorskip("mlflow")
    run_dir = offline / "runs" / "exp3"
    _drive(run_dir, ["mlflow"])
    client, run = _mlflow_run(offline)
    rid = run.info.run_id
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    assert _history(client, rid, "train/loss") == [(s, pytest.approx(1.0 / s)) for s in STEPS]
    assert _history(client, rid, "eval/loss") == [(s, pytest.approx(2.0 / s)) for s in EVAL_STEPS]
    assert [s for s, _ in _history(client, rid, "train/rewards/accuracies")] == list(STEPS)
    assert run.data.params["optim.lr"] == "5e-07" and run.data.params["loss.name"] == '["sigmoid"]'
    artifacts = {a.path for a in client.list_artifacts(rid)}
    assert {"config.json", "report.json"} <= artifacts
    report = json.loads(
        Path(client.download_artifacts(rid, "report.json", str(offline))).read_text()
    )
    assert report == REPORT
    assert read_metrics(run_dir, split="trackers")[0]["mlflow"]["run_id"] == rid


def test_mlflow_resume_and_failed_status(offline):
    pytest.importorskip("mlflow")
    run_dir = offline / "runs" / "exp4"
    _drive(run_dir, ["mlflow"], steps=(1, 2, 3), summary=False)
    client, run = _mlflow_run(offline)
    assert run.info.status == "FAILED"
    _drive(run_dir, ["mlflow"], steps=(3, 4), resume_from=2)
    client, run = _mlflow_run(offline)  # still one run: continued, not a second one
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run.info.run_id, "train/loss")] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------
# trackio: its SQLite database. trackio reads TRACKIO_DIR when first imported, so it runs in a child.

_TRACKIO_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from test_tracking_backends import _drive
    _drive(sys.argv[1], ["trackio"])
    """
)


def test_trackio_local_database(offline):
    pytest.importorskip("trackio")
    run_dir = offline / "runs" / "exp5"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [sys.executable, "-c", _TRACKIO_CHILD, str(run_dir), str(Path(__file__).parent)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = offline / "trackio" / "preftune-test.db"
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id").fetchall()
        (config,) = con.execute("SELECT config FROM configs WHERE run_name = 'tiny-run'").fetchone()
        artifacts = con.execute("SELECT name, type FROM artifacts").fetchall()
    assert {r[0] for r in rows} == {"tiny-run"}
    train = [(step, json.loads(m)) for _, step, m in rows if "train/loss" in json.loads(m)]
    evals = [(step, json.loads(m)) for _, step, m in rows if "eval/loss" in json.loads(m)]
    assert [s for s, _ in train] == list(STEPS) and [s for s, _ in evals] == list(EVAL_STEPS)
    assert all(m["train/loss"] == pytest.approx(1.0 / s) for s, m in train)
    assert evals[-1][1]["eval/rewards/accuracies"] == pytest.approx(0.5)
    assert json.loads(config)["optim"] == CONFIG["optim"]
    assert ("report", "report") in artifacts
    assert read_metrics(run_dir, split="trackers")[0]["trackio"]["name"] == "tiny-run"


# ---------------------------------------------------------------------------------------------------
# Other ranks send nothing (and need no library)


def test_non_main_rank_starts_no_tracker(offline):
    run_dir = offline / "runs" / "rank1"
    logger = MetricsLogger(run_dir, report_to=["mlflow", "tensorboard"], is_main=False)
    logger.truncate_after(0)
    logger.start()
    logger.log(1, _train(1))
    logger.summary(REPORT)
    logger.close()
    assert logger.trackers == ()
    assert not run_dir.exists() and not (offline / "mlruns").exists()
