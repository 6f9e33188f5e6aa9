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
from test_cli import assert_one_line_error, make_model, run, write_pairs

import preftune


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    model = make_model(root / "model")
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
        "log": {"log_every": 1, "progress": False, "tensorboard": False},
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
    assert code == 0 and "logps/chosen" in out and "(none: rewards are beta" in out


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
