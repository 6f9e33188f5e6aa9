"""The Python API: ``from preftune import ...`` names and signatures frozen (a change must be deliberate),
and a notebook-style run with objects in memory: a PreTrainedModel, its tokenizer, a list of dicts and a
datasets.Dataset."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys

import pytest
from _tiny import make_tiny_llama, toy_pairs

import preftune

#: The public surface. Changing it breaks users: update the README and this list together.
FROZEN = {
    "__version__": None,
    "Config": None,
    "ConfigError": None,
    "load_config": "(path: 'str | Path | None', overrides: 'typing.Sequence[str]' = ()) -> 'Config'",
    "config_from_dict": "(data: 'dict[str, Any]') -> 'Config'",
    "train": (
        "(config: 'Config | Mapping | str | Path | None' = None, overrides: 'Sequence[str]' = (), *, "
        "model: 'Any' = None, tokenizer: 'Any' = None, train_data: 'Any' = None, "
        "eval_data: 'Any' = None, callbacks: 'Sequence[Callback]' = ()) -> 'TrainResult'"
    ),
    "TrainResult": None,
    "TrainingError": None,
    "LOSSES": None,
    "UNPAIRED_LOSSES": None,
    "LossOutput": None,
    "compute_loss": None,
}


def test_public_names_and_signatures_are_frozen():
    assert sorted(preftune.__all__) == sorted(FROZEN)
    for name, signature in FROZEN.items():
        obj = getattr(preftune, name)
        if signature is not None:
            assert str(inspect.signature(obj)) == signature, name
    assert {"sigmoid", "ipo", "simpo"} <= set(preftune.LOSSES) and "kto" in preftune.UNPAIRED_LOSSES
    with pytest.raises(AttributeError):
        preftune.not_a_name  # noqa: B018


def test_importing_preftune_loads_no_torch():
    code = "import sys, preftune; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_notebook_run_with_objects_in_memory(tmp_path):
    from datasets import Dataset

    model, tokenizer = make_tiny_llama(tmp_path / "unused")
    pairs = toy_pairs(24, seed=5)
    result = preftune.train(
        {"loss": {"name": "sigmoid", "beta": 0.1}, "data": {"max_length": 64, "max_prompt_length": 32}},
        [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.batch_size=4",
         "log.progress=false", "log.report_to=[none]", "optim.lr=1e-3", "log.log_every=1"],
        model=model,
        tokenizer=tokenizer,
        train_data=pairs,
        eval_data=Dataset.from_list(toy_pairs(8, seed=6)),
    )  # fmt: skip
    assert result.steps == 3 and (result.final_model_dir / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").open()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "rewards/accuracies" in result.final_eval
    fingerprint = json.loads((result.output_dir / "fingerprint.json").read_text())
    assert fingerprint["facts"]["model"]["in_memory"] == "LlamaForCausalLM"


def test_a_model_without_its_tokenizer_is_refused(tmp_path):
    model, _ = make_tiny_llama(tmp_path / "m", save_tokenizer=False)
    with pytest.raises(ValueError, match="tokenizer"):
        preftune.train(None, model=model, train_data=toy_pairs(4))
