"""preftune.cli.evaluate: ``preftune eval`` end to end on real tiny models and data — a LoRA run's adapter
folder included — what it reports without a reference, and the command's argument wiring."""

from __future__ import annotations

import inspect
import json

import pytest
from _tiny import make_tiny_llama, tiny_train_config, toy_pairs, write_jsonl
from test_cli import assert_one_line_error, run, write_pairs

from preftune.cli import evaluate as cli_evaluate
from preftune.cli.evaluate import evaluate_model
from preftune.config import LoraConfig


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 3-step LoRA run: final/ is an adapter folder, its checkpoints hold the adapters only."""
    from preftune.trainer import train

    root = tmp_path_factory.mktemp("lora-eval")
    make_tiny_llama(root / "base")
    data = write_jsonl(root / "pairs.jsonl", toy_pairs(16, seed=7))
    cfg = tiny_train_config(
        root / "base", data, root / "run", train__max_steps=3, train__save_every=2,
        model__lora=LoraConfig(enabled=True, r=4, alpha=8.0), optim__lr=5e-2,
    )  # fmt: skip
    return train(cfg), root, data


def test_eval_takes_a_lora_adapter_folder(lora_run):
    result, root, data = lora_run
    final = result.final_model_dir
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").is_file()
    row = evaluate_model(
        str(final), str(data), ref=str(root / "base"), beta=0.1, batch_size=8, max_length=64
    )
    assert row["pairs"] == 16.0 and 0.0 <= row["rewards/accuracies"] <= 1.0
    assert abs(row["rewards/margins"]) > 1e-4  # the merged adapters changed the policy


def test_eval_without_a_reference_reports_what_it_measured(lora_run):
    _, root, data = lora_run
    row = evaluate_model(
        str(root / "base"), str(data), ref=None, beta=0.1, batch_size=8, max_length=64
    )
    assert "avg_logp_accuracy" in row and not any(k.startswith("rewards/") for k in row)
    assert "loss" not in row and row["logps/chosen"] < 0


def test_lora_checkpoints_hold_the_adapters_only(lora_run):
    """The frozen base is model.path's: a checkpoint stores the trainable LoRA weights (and resumes from
    them: tests/test_trainer.py covers resume)."""
    from safetensors import safe_open

    result, _, _ = lora_run
    with safe_open(str(result.last_checkpoint / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names)


def test_eval_table_and_json_on_a_real_model(capsys, tmp_path, model_dir):
    """The real command on a tiny model: a table by default, JSON with --json; the model against itself
    as reference has margins exactly 0 (rewards are β·(logp − logp_ref))."""
    data = write_pairs(tmp_path / "d.jsonl", n=6)
    code, out, err = run(capsys, "eval", "--model", str(model_dir), "--data", str(data))
    assert code == 0, err
    assert "(beta=0.1)" in out  # the sigmoid loss's registry default
    assert "avg_logp_accuracy" in out and "pairs" in out and "rewards/" not in out
    argv = ["eval", "--model", str(model_dir), "--ref", str(model_dir), "--data", str(data)]
    code, out, err = run(capsys, *argv, "--beta", "0.5", "--batch-size", "4", "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["pairs"] == 6 and row["rewards/margins"] == 0.0 and row["rewards/accuracies"] == 0.0
    assert row["loss"] == pytest.approx(0.6931472, abs=1e-6)  # log 2 at the reference


def test_eval_passes_its_arguments(capsys, tmp_path, model_dir, monkeypatch):
    """The wiring, with a stand-in of evaluate_model's exact signature (checked, so it cannot drift)."""
    calls = []

    def fake(
        model,
        data_file,
        *,
        ref,
        beta,
        batch_size,
        max_length,
        loss=cli_evaluate._LOSS,
        trust_remote_code=False,
    ):
        calls.append((model, data_file, ref, beta, batch_size, max_length))
        return {"rewards/accuracies": 0.75, "rewards/margins": 1.5, "logps/chosen": -12.0}

    def shape(fn):  # names, kinds and defaults (annotations aside)
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(fake) == shape(evaluate_model)
    monkeypatch.setattr(cli_evaluate, "evaluate_model", fake)
    data = write_pairs(tmp_path / "d.jsonl")
    code, out, err = run(capsys, "eval", "--model", str(model_dir), "--data", str(data))
    assert code == 0, err
    assert calls[-1] == (str(model_dir), str(data), None, 0.1, 8, 1024)
    assert "rewards/accuracies" in out and "0.7500" in out
    argv = ["eval", "--model", str(model_dir), "--ref", str(model_dir), "--data", str(data)]
    code, out, _ = run(capsys, *argv, "--beta", "0.5", "--batch-size", "2", "--json")
    assert calls[-1] == (str(model_dir), str(data), str(model_dir), 0.5, 2, 1024)
    assert json.loads(out)["rewards/margins"] == 1.5


def test_eval_input_errors(capsys, tmp_path, model_dir):
    data = write_pairs(tmp_path / "d.jsonl")
    assert_one_line_error(
        *run(capsys, "eval", "--model", str(tmp_path / "no"), "--data", str(data))[::2],
        "--model",
        "not found",
    )
    assert_one_line_error(
        *run(capsys, "eval", "--model", str(tmp_path), "--data", str(data))[::2],
        "no config.json",
    )
    assert_one_line_error(
        *run(capsys, "eval", "--model", str(model_dir), "--data", str(tmp_path / "x.jsonl"))[::2],
        "data file not found",
    )
    assert_one_line_error(
        *run(capsys, "eval", "--model", str(model_dir), "--data", str(data), "--beta", "0")[::2],
        "--beta must be > 0",
    )
