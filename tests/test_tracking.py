"""Tracking: metrics.jsonl round trip and resume truncation, TensorBoard events, plots, atomic JSON, ranks;
log.report_to (names, the deprecated log.tensorboard, missing extras) and the tracker protocol with a fake
tracker (the real W&B / MLflow / trackio runs are in test_tracking_backends.py)."""

from __future__ import annotations

import json
import logging
import math
import struct
import zlib
from pathlib import Path

import pytest
import torch

from preftune.config import ConfigError, config_from_dict, load_config, validate
from preftune.tracking import (
    TRACKERS,
    MetricsLogger,
    ProgressBar,
    TrackerError,
    backends,
    check_report_to,
    format_line,
    plot_run,
    read_metrics,
    resolve_report_to,
    write_json,
)
from preftune.tracking.backends import Tracker


def _metrics(i: int) -> dict:
    return {
        "loss": math.log(2) * math.exp(-i / 10),
        "rewards/chosen": 0.01 * i,
        "rewards/rejected": -0.03 * i,
        "rewards/margins": 0.04 * i,
        "rewards/accuracies": min(1.0, 0.5 + 0.02 * i),
        "logps/chosen": -50 + 0.1 * i,
        "logps/rejected": -55 - 0.5 * i,
        "grad_norm": 1.0 + 0.01 * i,
        "learning_rate": 5e-7 * min(1.0, i / 5),
        "tokens_per_s": 1234.5,
    }


def _write_run(run_dir, n=20, eval_every=5):
    with MetricsLogger(run_dir, report_to=[]) as logger:
        for i in range(1, n + 1):
            logger.log(i, _metrics(i))
            if eval_every and i % eval_every == 0:
                m = _metrics(i)
                ev = {
                    f"eval/{k}": m[k] + 0.01 for k in m if k not in ("grad_norm", "learning_rate")
                }
                logger.log(i, ev, split="eval")


def test_jsonl_round_trip(tmp_path):
    _write_run(tmp_path, n=10)
    rows = read_metrics(tmp_path)
    assert len(rows) == 12
    train = read_metrics(tmp_path, split="train")
    assert [r["step"] for r in train] == list(range(1, 11))
    assert {k: v for k, v in train[2].items() if k not in ("step", "split", "time")} == _metrics(3)
    ev = read_metrics(tmp_path, split="eval")
    assert [r["step"] for r in ev] == [5, 10]
    assert "loss" in ev[0] and "eval/loss" not in ev[0]  # split prefix stripped, split field set
    assert all(isinstance(r["time"], float) for r in rows)


def test_tensor_values_and_append_on_resume(tmp_path):
    with MetricsLogger(tmp_path, report_to=[]) as logger:
        logger.log(1, {"loss": torch.tensor(0.5), "rewards/accuracies": torch.tensor(1.0)})
    with MetricsLogger(tmp_path, report_to=[]) as logger:  # a later process appends
        logger.log(2, {"loss": 0.25})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, 0.25)]


def test_truncate_after_drops_lines_of_the_killed_run(tmp_path):
    _write_run(tmp_path, n=10)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "split": "train", "lo')  # a line cut in half by SIGKILL
    logger = MetricsLogger(tmp_path, report_to=[])
    assert logger.truncate_after(6) == 6  # train 7..10, eval 10, and the broken line
    logger.log(7, {"loss": 0.1})
    logger.close()
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in rows] == [
        *[(i, "train") for i in range(1, 6)],
        (5, "eval"),
        (6, "train"),
        (7, "train"),
    ]
    assert MetricsLogger(tmp_path, report_to=[]).truncate_after(100) == 0


def test_half_line_is_cut_before_appending(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2'
    )
    with MetricsLogger(tmp_path, report_to=[]) as logger:
        logger.log(2, {"loss": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_non_main_rank_writes_nothing(tmp_path):
    run = tmp_path / "run"
    logger = MetricsLogger(run, report_to=["tensorboard"], is_main=False)
    logger.log(1, _metrics(1))
    assert logger.truncate_after(0) == 0
    logger.close()
    assert not run.exists()


def test_non_main_rank_shows_no_bar_and_prints_nothing(capsys):
    bar = ProgressBar(total=5, enabled=True, is_main=False)
    bar.update(1, loss=0.5)
    bar.set_postfix(_metrics(1))
    bar.write("a log line")
    bar.close()
    assert capsys.readouterr() == ("", "")


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path) as logger:  # the default: [tensorboard]
        assert logger.trackers == ("tensorboard",)
        logger.log(1, _metrics(1))
        logger.log(1, {"loss": 0.7}, split="eval")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/rewards/accuracies", "eval/loss"} <= set(tags)
    assert acc.Scalars("train/loss")[0].step == 1


@pytest.mark.parametrize(
    "kwargs", [{"report_to": []}, {"report_to": ["none"]}, {"tensorboard": False}]
)
def test_tensorboard_disabled_writes_no_events(tmp_path, kwargs):
    with MetricsLogger(tmp_path, **kwargs) as logger:  # tensorboard=False: the deprecated switch
        logger.log(1, _metrics(1))
        assert logger.trackers == ()
    assert not (tmp_path / "tensorboard").exists()


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]  # IHDR intact
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("n,eval_every", [(40, 10), (40, 0), (1, 0), (1, 1)])
def test_plot_run(tmp_path, n, eval_every):
    _write_run(tmp_path, n=n, eval_every=eval_every)
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    w, h = _png_size(out)
    assert w > 800 and h > 400 and out.stat().st_size > 10_000
    assert not list(tmp_path.glob(".*tmp*"))


def test_plot_run_custom_path_and_empty_run(tmp_path):
    _write_run(tmp_path, n=3)
    out = plot_run(tmp_path, tmp_path / "plots" / "run.png")
    assert out.is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metrics"):
        plot_run(empty)


def test_format_line():
    line = format_line(120, _metrics(10))
    assert line.startswith("step 120 | loss 0.2550 | acc 0.70 | margin 0.4 | logps c -49.0 r -60.0")
    assert "grad 1.1" in line and "lr 5.00e-07" in line and line.endswith("1234 tok/s")
    assert format_line(3, {"eval/loss": float("nan")}) == "step 3 | loss nan"
    assert MetricsLogger.format_line(1, {"loss": 1.0}) == "step 1 | loss 1.0000"


def test_progress_bar(capsys):
    """What the user sees: the step count and the picked, formatted metrics on the bar (stderr), log lines
    on stdout."""
    bar = ProgressBar(total=10, initial=2, enabled=True)
    bar.update(1)
    bar.update(1, loss=0.69312, acc=0.5, margin=0.0123, tok_s=1500.4)
    shown = capsys.readouterr().err.split("\r")[-1]
    assert "4/10" in shown and "loss=0.6931, acc=0.50, margin=0.0123, tok/s=1500" in shown
    bar.set_postfix(_metrics(10))
    shown = capsys.readouterr().err.split("\r")[-1]
    assert "loss=0.2550, acc=0.70, margin=0.4, tok/s=1234" in shown
    bar.write("a log line")
    bar.close()
    assert "a log line" in capsys.readouterr().out
    quiet = ProgressBar(total=3, enabled=False)
    quiet.update(1, loss=0.5)
    quiet.write("still printed")
    quiet.close()
    assert "still printed" in capsys.readouterr().out


def test_write_json_atomic(tmp_path):
    path = write_json(
        tmp_path / "sub" / "report.json", {"a": 1, "p": Path("x"), "t": torch.tensor(2.5)}
    )
    assert json.loads(path.read_text()) == {"a": 1, "p": "x", "t": 2.5}
    write_json(path, [1, 2])
    assert json.loads(path.read_text()) == [1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == [1, 2]  # the old file survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


# ---------------------------------------------------------------------------------------------------
# log.report_to


@pytest.mark.parametrize(
    "report_to,tensorboard,want",
    [
        (None, None, ("tensorboard",)),
        (["none"], None, ()),
        ([], None, ()),
        ("none", None, ()),
        (["trackio", "WandB", "mlflow", "tensorboard"], None, TRACKERS),  # any order, any case
        (["tensorboard", "mlflow"], False, ("mlflow",)),  # the deprecated switch drops it...
        (["none"], True, ("tensorboard",)),  # ...or adds it
    ],
)
def test_resolve_report_to(report_to, tensorboard, want):
    assert resolve_report_to(report_to, tensorboard) == want


@pytest.mark.parametrize(
    "report_to,message",
    [
        (
            ["tensorbord"],
            "log.report_to: unknown tracker 'tensorbord' (did you mean 'tensorboard'?)",
        ),
        (["wandb", "none"], "log.report_to: 'none' stands alone"),
        (["mlflow", "mlflow"], "log.report_to: mlflow is named twice"),
    ],
)
def test_resolve_report_to_errors(report_to, message):
    with pytest.raises(ConfigError) as e:
        resolve_report_to(report_to)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_config_report_to_and_the_deprecated_switch(caplog, monkeypatch):
    cfg = load_config(None)
    assert cfg.log.report_to == ["tensorboard"] and cfg.log.tensorboard is None
    assert cfg.log.run_name is None and cfg.log.project is None
    cfg = load_config(None, ["log.report_to=[none]", "log.run_name=b005", "log.project=dpo"])
    assert cfg.log.report_to == ["none"]
    assert (cfg.log.run_name, cfg.log.project) == ("b005", "dpo")
    assert load_config(None, ["log.report_to=[]"]).log.report_to == []
    # An old config's `log.tensorboard: false` still works, with a deprecation warning.
    monkeypatch.setattr(backends, "_warned_alias", False)
    with caplog.at_level(logging.WARNING, logger="preftune.tracking"):
        old = config_from_dict({"log": {"tensorboard": False}})
        validate(old)
    assert "log.tensorboard is deprecated: use log.report_to" in caplog.text
    logger = MetricsLogger.from_config(old)
    assert logger.trackers == () and logger.run_name == Path(old.train.output_dir).name
    with pytest.raises(ConfigError, match="unknown tracker 'tb'"):
        load_config(None, ["log.report_to=[tb]"])


@pytest.mark.parametrize("name", ["wandb", "mlflow", "trackio"])
def test_missing_library_is_one_line_naming_the_extra(tmp_path, monkeypatch, name):
    real = backends.library_available
    monkeypatch.setattr(backends, "library_available", lambda n: n != name and real(n))
    want = f"log.report_to: {name} needs `pip install 'preftune[{name}]'`"
    with pytest.raises(TrackerError) as e:  # at loading, before any model loads
        load_config(None, [f"log.report_to=[{name}]"])
    assert str(e.value) == want and isinstance(e.value, ConfigError)
    with pytest.raises(TrackerError) as e:  # and at construction, before a step
        MetricsLogger(tmp_path, report_to=[name])
    assert str(e.value) == want
    MetricsLogger(tmp_path, report_to=[name], is_main=False)  # other ranks need no library
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_library_exits_2_from_the_cli(tmp_path, monkeypatch, capsys):
    from preftune.cli import main

    monkeypatch.setattr(backends, "library_available", lambda n: n == "tensorboard")
    config = tmp_path / "run.yaml"
    config.write_text("log:\n  report_to: [tensorboard, wandb]\n")
    assert main(["train", str(config), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "preftune: error: log.report_to: wandb needs `pip install 'preftune[wandb]'`"


def test_tensorboard_missing_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "library_available", lambda n: False)
    assert check_report_to(load_config(None).log) == ("tensorboard",)  # the default stays usable
    with MetricsLogger(tmp_path, report_to=["tensorboard"]) as logger:
        logger.log(1, {"loss": 1.0})
        assert logger.trackers == ()
    assert not (tmp_path / "tensorboard").exists()


class FakeTracker(Tracker):
    """Records every call; ``fail_at`` makes log (or start) raise."""

    name = "fake"

    def __init__(self, calls: list, fail_at: int | str | None = None) -> None:
        self.calls, self.fail_at = calls, fail_at

    def start(self, info, state):
        self.calls.append(
            ("start", info.run_name, info.resume_step, dict(info.config or {}), state)
        )
        if self.fail_at == "start":
            raise RuntimeError("store refused\nsecond line")
        return {"id": f"run-{len(self.calls)}"}

    def log(self, step, values):
        if step == self.fail_at:
            raise OSError("connection reset")
        self.calls.append(("log", step, dict(values)))

    def summary(self, report):
        self.calls.append(("summary", report))

    def close(self, failed):
        self.calls.append(("close", failed))


def _with_fakes(run_dir, *fakes, **kwargs) -> MetricsLogger:
    logger = MetricsLogger(run_dir, report_to=[], config={"optim": {"lr": 1e-6}}, **kwargs)
    logger._trackers = list(fakes)
    return logger


def test_tracker_protocol(tmp_path):
    calls: list = []
    run = tmp_path / "my-run"
    logger = _with_fakes(run, FakeTracker(calls))
    logger.truncate_after(0)
    logger.log(1, {"loss": torch.tensor(0.5), "note": "text", "flag": True})  # starts lazily
    logger.log(1, {"eval/loss": 0.7}, split="eval")
    logger.log(1, {"changes": [{"key": "x"}]}, split="resume")  # nothing numeric: nothing sent
    logger.summary({"steps": 1, "path": Path("final")})
    logger.close()
    assert calls == [
        ("start", "my-run", 0, {"optim": {"lr": 1e-6}}, None),
        ("log", 1, {"train/loss": 0.5, "train/flag": 1}),  # numbers only, as <split>/<key>
        ("log", 1, {"eval/loss": 0.7}),
        ("summary", {"steps": 1, "path": "final"}),  # JSON-plain
        ("close", False),  # the summary came: finished
    ]
    (row,) = read_metrics(run, split="trackers")
    assert row["step"] == 0 and row["fake"] == {"id": "run-1"}
    assert [r["split"] for r in read_metrics(run)] == ["trackers", "train", "eval", "resume"]


def test_tracker_resume_continues_and_skips_steps_already_sent(tmp_path):
    calls: list = []
    first = _with_fakes(tmp_path, FakeTracker(calls))
    first.truncate_after(0)
    first.start()
    for step in (1, 2, 3):
        first.log(step, {"loss": 1.0 / step})
    first.close()  # killed after step 3, no report
    assert calls[-1] == ("close", True)
    calls.clear()
    second = _with_fakes(tmp_path, FakeTracker(calls), run_name="renamed")
    assert second.truncate_after(2) == 1  # the step-3 line goes
    second.start()
    for step in (3, 4):
        second.log(step, {"loss": 1.0 / step})
    second.close(failed=False)
    assert calls[0] == ("start", "renamed", 2, {"optim": {"lr": 1e-6}}, {"id": "run-1"})
    assert [c[1] for c in calls if c[0] == "log"] == [4]  # step 3 reached it before the kill
    assert [r["step"] for r in read_metrics(tmp_path, split="train")] == [1, 2, 3, 4]
    assert [r["fake"]["id"] for r in read_metrics(tmp_path, split="trackers")] == ["run-1", "run-1"]


def test_tracker_start_failure_is_one_line_and_closes_the_others(tmp_path):
    calls: list = []
    ok, broken = FakeTracker(calls), FakeTracker([], fail_at="start")
    broken.name = "broken"
    logger = _with_fakes(tmp_path, ok, broken)
    with pytest.raises(TrackerError) as e:
        logger.start()
    assert str(e.value) == "log.report_to: broken could not start: store refused second line"
    assert calls[-1] == ("close", True)
    logger.close()


def test_tracker_failing_mid_run_is_dropped_with_a_warning(tmp_path, caplog):
    calls: list = []
    logger = _with_fakes(tmp_path, FakeTracker(calls, fail_at=2))
    with caplog.at_level(logging.WARNING, logger="preftune.tracking"):
        for step in (1, 2, 3):
            logger.log(step, {"loss": 1.0})
    logger.close()
    assert [c[1] for c in calls if c[0] == "log"] == [1]
    assert calls[-1] == ("close", True)
    assert "fake failed at step 2 (connection reset)" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path, split="train")] == [1, 2, 3]
