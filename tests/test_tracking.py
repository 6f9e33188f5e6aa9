"""Tracking: metrics.jsonl round trip and resume truncation, TensorBoard events, plots, atomic JSON, ranks."""

from __future__ import annotations

import json
import math
import struct
import zlib

import pytest
import torch

from preftune.tracking import (
    MetricsLogger,
    ProgressBar,
    format_line,
    plot_run,
    read_metrics,
    write_json,
)


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
    with MetricsLogger(run_dir, tensorboard=False) as logger:
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
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": torch.tensor(0.5), "rewards/accuracies": torch.tensor(1.0)})
    with MetricsLogger(tmp_path, tensorboard=False) as logger:  # a later process appends
        logger.log(2, {"loss": 0.25})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, 0.25)]


def test_truncate_after_drops_lines_of_the_killed_run(tmp_path):
    _write_run(tmp_path, n=10)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "split": "train", "lo')  # a line cut in half by SIGKILL
    logger = MetricsLogger(tmp_path, tensorboard=False)
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
    assert MetricsLogger(tmp_path, tensorboard=False).truncate_after(100) == 0


def test_half_line_is_cut_before_appending(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2'
    )
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, {"loss": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_non_main_rank_writes_nothing(tmp_path):
    run = tmp_path / "run"
    logger = MetricsLogger(run, tensorboard=True, is_main=False)
    logger.log(1, _metrics(1))
    assert logger.truncate_after(0) == 0
    logger.close()
    assert not run.exists()
    bar = ProgressBar(total=5, enabled=True, is_main=False)
    assert bar.bar.disable
    bar.close()


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
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


def test_tensorboard_disabled_writes_no_events(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, _metrics(1))
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
    bar = ProgressBar(total=10, initial=2, enabled=True)
    bar.update(1)
    bar.update(1, loss=0.69312, acc=0.5, margin=0.0123, tok_s=1500.4)
    assert bar.bar.n == 4
    assert bar.bar.postfix == "loss=0.6931, acc=0.50, margin=0.0123, tok/s=1500"
    bar.set_postfix(_metrics(10))
    assert bar.bar.postfix.startswith("loss=0.2550, acc=0.70, margin=0.4, tok/s=1234")
    bar.write("a log line")
    bar.close()
    assert "a log line" in capsys.readouterr().out
    quiet = ProgressBar(total=3, enabled=False)
    quiet.update(1, loss=0.5)
    quiet.write("still printed")
    quiet.close()
    assert "still printed" in capsys.readouterr().out


def test_write_json_atomic(tmp_path):
    from pathlib import Path

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
