"""End to end through the real modules: `preftune train` in a subprocess on a tiny config, then eval,
plot and generate on what it left, and data errors surfacing from the trainer as exit code 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_cli import assert_one_line_error, run, write_pairs

import preftune


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    model = model_dir  # tests/conftest.py's, shared
    data = write_pairs(root / "pairs.jsonl", n=16)
    config = {
        "model": {"path": str(model)},
        "data": {
            "train_files": [str(data)],
            "max_length": 48,
            "max_prompt_length": 24,
            "eval_fraction": 0.25,
            "cache_dir": str(root / "cache"),
        },
        "loss": {"name": "sigmoid", "beta": 0.1},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"output_dir": str(root / "run"), "max_steps": 3, "batch_size": 4, "seed": 0},
        "log": {"log_every": 1, "progress": False, "report_to": []},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return {"root": root, "model": model, "data": data, "config": path, "run": root / "run"}


@pytest.fixture(scope="module")
def trained(tiny) -> Path:
    """`python -m preftune train tiny.yaml key=value` in a subprocess; returns the run folder."""
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(preftune.__file__).parents[1]),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "preftune", "train", str(tiny["config"]), "train.max_steps=4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"final model: {tiny['run'] / 'final'}" in proc.stdout
    return tiny["run"]


def test_train_leaves_a_loadable_model_and_metrics(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = trained / "final"
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    AutoTokenizer.from_pretrained(final, local_files_only=True)
    assert model.config.num_hidden_layers == 1
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]  # the override beat the YAML's 3
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert any(r["split"] == "eval" for r in rows)
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 4


def test_eval_against_the_reference(capsys, trained, tiny):
    argv = ["eval", "--model", str(trained / "final"), "--data", str(tiny["data"])]
    code, out, err = run(capsys, *argv, "--ref", str(tiny["model"]), "--max-length", "48", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert 0.0 <= metrics["rewards/accuracies"] <= 1.0
    assert all(v is None or math.isfinite(v) for v in metrics.values())
    assert math.isclose(
        metrics["rewards/margins"],
        metrics["rewards/chosen"] - metrics["rewards/rejected"],
        rel_tol=1e-4,
        abs_tol=1e-6,
    )
    code, out, _ = run(capsys, *argv, "--max-length", "48")
    assert code == 0 and "logps/chosen" in out and "(none: no implicit reward" in out
    assert "avg_logp_accuracy" in out and "rewards/" not in out


def test_plot_and_generate_on_the_run(capsys, trained):
    code, out, err = run(capsys, "plot", str(trained))
    assert code == 0, err
    assert Path(out.strip()).read_bytes()[:4] == b"\x89PNG"
    argv = ["generate", "--model", str(trained / "final"), "--prompt", "what is 2+2?"]
    code, out, err = run(capsys, *argv, "--max-new-tokens", "3")
    assert code == 0, err
    assert "=== completion 1 ===" in out


def test_train_on_malformed_data_exits_2(capsys, tiny, tmp_path):
    bad = write_pairs(tmp_path / "bad.jsonl", n=3, extra=[{"prompt": "x", "chosen": "y"}])
    argv = ["train", str(tiny["config"]), f"data.train_files=[{bad}]"]
    argv += [f"train.output_dir={tmp_path / 'run'}"]
    assert_one_line_error(*run(capsys, *argv)[::2], "line 4", "rejected")


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_demo_quick_writes_a_finite_report(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--quick", "--out", str(tmp_path / "demo"), "--seed", "1")
    assert code == 0, err
    assert f"demo report: {tmp_path / 'demo'}" in out
    for name in ("report.md", "report.json", "curves.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["seed"] == 1 and report["quick"] is True
    numbers = list(_numbers(report))
    assert numbers and all(math.isfinite(x) for x in numbers)


# ---------------------------------------------------------------------------------------------------
# Nothing lost, nothing mixed (issue 12): resume checks what it resumes, one run per folder, a corrupt
# checkpoint is skipped, a full disk and SIGINT end with a checkpoint to resume from. In-process.


@pytest.fixture
def resumable(tiny, tmp_path, capsys, monkeypatch):
    """``go(*overrides) -> (code, err)``: `preftune train` of the tiny config into ``tmp_path/run``,
    checkpointing every step (two steps unless told otherwise)."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    base = [f"train.output_dir={run_dir}", "train.save_every=1", "train.max_steps=2"]

    def go(*overrides: str) -> tuple[int, str]:
        code, _, err = run(capsys, "train", str(tiny["config"]), *base, *overrides)
        assert "Traceback" not in err
        return code, err

    go.run_dir = run_dir
    return go


def _rows(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("preftune: error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


def test_changed_settings_refuse_resume_force_records_them_more_steps_allowed(resumable, tiny):
    assert resumable()[0] == 0
    run_dir = resumable.run_dir
    saved_config = (run_dir / "config.yaml").read_text()

    code, err = resumable("optim.lr=0.002", "loss.beta=0.2", "train.max_steps=3")
    assert code == 2
    line = _error_line(err)
    assert "optim.lr: 0.001 -> 0.002" in line and "loss.beta: 0.1 -> 0.2" in line
    assert "train.max_steps" not in line  # a safe change is not a reason to refuse
    assert "train.resume=force" in line and "train.output_dir" in line
    assert (
        run_dir / "config.yaml"
    ).read_text() == saved_config  # the folder still says what it holds

    # Other data under the same file name: refused, naming the data fact.
    data = tiny["data"]
    original = data.read_bytes()
    try:
        data.write_bytes(original.replace(b"what is 1+1?", b"what is 9+9?"))
        code, err = resumable()
        assert code == 2 and "facts.data" in _error_line(err)
    finally:
        data.write_bytes(original)

    code, err = resumable(
        "optim.lr=0.002", "loss.beta=0.2", "train.max_steps=3", "train.resume=force"
    )
    assert code == 0, err
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3]
    (event,) = _rows(run_dir, "resume")
    changes = {c["key"]: c for c in event["changes"]}
    assert event["step"] == 2
    assert changes["optim.lr"] == {"key": "optim.lr", "old": 0.001, "new": 0.002, "safe": False}
    assert changes["train.max_steps"]["safe"] is True
    report = json.loads((run_dir / "report.json").read_text())
    assert report["resume_changes"] == [event]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.002

    # Training longer is a safe change: no force needed, and it is on record too.
    code, err = resumable("optim.lr=0.002", "loss.beta=0.2", "train.max_steps=4")
    assert code == 0, err
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3, 4]
    assert [c["key"] for c in _rows(run_dir, "resume")[-1]["changes"]] == [
        "train.max_steps",
        "train.resume",
    ]


def test_resume_never_into_an_existing_run_is_refused_unless_overwrite(resumable):
    assert resumable()[0] == 0
    run_dir = resumable.run_dir
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    code, err = resumable("train.resume=never", "train.max_steps=1")
    assert code == 2
    assert "already holds a run" in _error_line(err) and "train.overwrite=true" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing pruned

    code, err = resumable("train.resume=never", "train.max_steps=1", "train.overwrite=true")
    assert code == 0, err
    assert [r["step"] for r in _rows(run_dir)] == [1]  # a new run, nothing of the old one left
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001"]


def test_a_second_run_on_a_locked_folder_is_refused_naming_pid_and_host(resumable):
    import socket

    from preftune.runfolder import RunLock

    resumable.run_dir.mkdir()
    with RunLock(resumable.run_dir):  # held by this (live) process, as by a run in progress
        code, err = resumable()
    assert code == 2
    line = _error_line(err)
    assert f"pid {os.getpid()}" in line and socket.gethostname() in line
    assert sorted(p.name for p in resumable.run_dir.iterdir()) == []  # untouched, lock released


def test_a_corrupt_latest_checkpoint_is_skipped_and_the_run_resumes(resumable):
    assert resumable()[0] == 0
    ckpts = resumable.run_dir / "checkpoints"
    latest = ckpts / "step-00000002" / "model.safetensors"
    data = bytearray(latest.read_bytes())
    data[-8:] = bytes(8)  # same size, other bytes: only the checksum can tell
    latest.write_bytes(bytes(data))

    code, err = resumable("train.max_steps=3")
    assert code == 0, err
    assert "step-00000002 cannot be resumed from" in err and "model.safetensors" in err
    assert "resumed from" in err and "step-00000001 at step 1" in err
    assert [r["step"] for r in _rows(resumable.run_dir)] == [1, 2, 3]

    for folder in ckpts.iterdir():  # every checkpoint corrupt: exit 2 naming the files
        (folder / "optimizer.pt").write_bytes(b"garbage")
    code, err = resumable("train.max_steps=4")
    assert code == 2
    assert "no checkpoint of" in _error_line(err) and "optimizer.pt" in err


@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_disk_full_exits_1_naming_the_place_with_the_last_checkpoint_intact(
    resumable, monkeypatch, where
):
    import errno

    from preftune import checkpoint, lifecycle

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(resumable.run_dir / "x"))

    if where == "checkpoint":  # the second checkpoint's first file
        real = checkpoint._write_file

        def write(path, writer):
            if path.parent.name.startswith(".tmp-step-00000002"):
                full()
            return real(path, writer)

        monkeypatch.setattr(checkpoint, "_write_file", write)
    else:
        monkeypatch.setattr(lifecycle, "save_final", full)
    code, err = resumable()
    assert code == 1
    assert "no space left on" in err
    good = "step-00000001" if where == "checkpoint" else "step-00000002"
    assert f"last checkpoint: {resumable.run_dir / 'checkpoints' / good}" in err
    assert checkpoint.verify_checkpoint(resumable.run_dir / "checkpoints" / good) is None
    assert not list((resumable.run_dir / "checkpoints").glob(".tmp-*"))


def test_sigint_checkpoints_and_exits_130_then_resumes(resumable, monkeypatch):
    import signal

    import torch

    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # Ctrl-C during step 2 of 3
        out = real_step(self, *args, **kwargs)
        step.calls += 1
        if step.calls == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    step.calls = 0
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    # What the run must put back (the default handler in a terminal; SIG_IGN in a background job).
    before = signal.getsignal(signal.SIGINT)
    code, err = resumable("train.save_every=null", "train.max_steps=3")
    assert code == 130, err
    assert "preftune: interrupted: stopped by SIGINT after step 2" in err
    assert "train.resume=auto" in err
    assert f"last checkpoint: {resumable.run_dir / 'checkpoints' / 'step-00000002'}" in err
    assert signal.getsignal(signal.SIGINT) is before  # handler restored

    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    code, err = resumable("train.save_every=null", "train.max_steps=3")
    assert code == 0, err
    assert [r["step"] for r in _rows(resumable.run_dir)] == [1, 2, 3]
