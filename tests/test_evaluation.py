"""preftune.evaluation: ``preftune eval``'s entry point on what runs leave behind — a LoRA run's adapter
folder included — and what it reports without a reference; StepMetrics' sums and counts."""

from __future__ import annotations

import pytest
import torch
from _tiny import make_tiny_llama, tiny_train_config, toy_pairs, write_jsonl

from preftune.config import LoraConfig
from preftune.evaluation import StepMetrics, evaluate_model


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


def test_step_metrics_average_each_name_over_its_own_count():
    m = StepMetrics(torch.device("cpu"))
    m.add(torch.tensor(0.5), {"a": (torch.tensor(3.0), torch.tensor(2.0))})
    m.add(
        torch.tensor(0.25),
        {"a": (torch.tensor(1.0), torch.tensor(2.0)), "b": (torch.tensor(0.0), 0)},
    )
    m.add_grad_norm(torch.tensor(2.0))
    row = m.pop()
    assert row == {"loss": 0.75, "a": 1.0, "grad_norm": 2.0}  # b has count 0: left out
