"""preftune.config: defaults, YAML round trip, typed overrides, and every error message."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from preftune.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    format_config,
    load_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path: Path, data: dict | str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


def over(*items: str) -> Config:
    return load_config(None, items)


# ---------------------------------------------------------------------------------------------------
# Defaults and round trip


def test_defaults_load_and_validate():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.loss.name == ["sigmoid"]
    assert cfg.loss.weights is None
    assert cfg.reference.strategy == "auto"
    assert cfg.optim.lr == 5e-7
    assert cfg.data.max_prompt_length < cfg.data.max_length


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_yaml_round_trip(tmp_path):
    cfg = over(
        "loss.name=[cdpo,sft]",
        "loss.weights=[1.0,0.2]",
        "loss.params.label_smoothing=0.0",
        "model.path=models/m",
        "data.train_files=[a.jsonl,b.jsonl]",
        "train.max_steps=7",
    )
    path = write(tmp_path, config_to_dict(cfg))
    assert load_config(path) == cfg


def test_format_config_is_loadable_yaml_of_the_same_config():
    """The printed config (field docs as comments) reads back as the same config."""
    cfg = over("model.lora.enabled=true", "reference.strategy=adapter", "optim.lr=2e-5")
    assert config_from_dict(yaml.safe_load(format_config(cfg))) == cfg


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    """PyYAML reads `5e-7` (no dot) as a string; the float field still gets a float."""
    cfg = load_config(write(tmp_path, "optim:\n  lr: 5e-7\n"))
    assert cfg.optim.lr == 5e-7 and isinstance(cfg.optim.lr, float)


def test_format_config_has_every_fields_help():
    import typing

    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield f
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name])

    text = format_config(Config())
    fields = list(walk(Config))
    assert len(fields) > 60
    for f in fields:
        assert f.metadata["help"], f.name
        assert f"# {f.metadata['help']}" in text, f.name


# ---------------------------------------------------------------------------------------------------
# Overrides are parsed to the field's type


@pytest.mark.parametrize(
    "item, key, expected",
    [
        ("train.batch_size=4", "train.batch_size", 4),
        ("train.epochs=2", "train.epochs", 2.0),
        ("optim.lr=1e-6", "optim.lr", 1e-6),
        ("loss.beta=0.05", "loss.beta", 0.05),
        ("model.lora.enabled=true", "model.lora.enabled", True),
        ("log.progress=off", "log.progress", False),
        ("loss.name=[sigmoid,sft]", "loss.name", ["sigmoid", "sft"]),
        ("loss.name=ipo", "loss.name", ["ipo"]),
        ("loss.weights=[1, 0.5]", "loss.weights", [1.0, 0.5]),
        ("loss.params.label_smoothing=0.1", "loss.params", {"label_smoothing": 0.1}),
        ("model.tokenizer_path=null", "model.tokenizer_path", None),
        ("model.tokenizer_path=tok", "model.tokenizer_path", "tok"),
        ("train.max_steps=null", "train.max_steps", None),
        ("data.max_prompt_length=None", "data.max_prompt_length", None),
        ("data.train_files=a.jsonl", "data.train_files", ["a.jsonl"]),
        ("train.output_dir=runs/x=1", "train.output_dir", "runs/x=1"),
        ("model.path = models/m ", "model.path", "models/m"),
    ],
)
def test_override_types(item, key, expected):
    value = apply_overrides(Config(), [item])  # parsing only; cross-field checks are tested below
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, list):
        assert all(type(v) is type(e) for v, e in zip(value, expected))


def test_overrides_apply_after_yaml_and_params_merge(tmp_path):
    path = write(tmp_path, {"loss": {"name": "cdpo", "params": {"label_smoothing": 0.2}}})
    cfg = load_config(path, ["loss.params.label_smoothing=0.3", "loss.beta=0.2"])
    assert cfg.loss.name == ["cdpo"]
    assert cfg.loss.params == {"label_smoothing": 0.3}
    assert cfg.loss.beta == 0.2


def test_later_override_wins():
    assert over("train.seed=1", "train.seed=2").train.seed == 2


# ---------------------------------------------------------------------------------------------------
# Unknown keys, with suggestions


def test_unknown_top_level_key_suggests(tmp_path):
    msg = error(load_config, write(tmp_path, {"modle": {"path": "m"}}))
    assert msg == "unknown key 'modle' (did you mean 'model'?)"


def test_unknown_nested_key_suggests_full_key(tmp_path):
    msg = error(load_config, write(tmp_path, {"optim": {"lrr": 1e-6}}))
    assert msg == "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"
    msg = error(load_config, write(tmp_path, {"model": {"lora": {"rank": 8}}}))
    assert "unknown key 'model.lora.rank'" in msg


@pytest.mark.parametrize(
    "item, suggestion",
    [
        ("optim.lrr=1e-6", "optim.lr"),
        ("optm.lr=1e-6", "optim.lr"),  # misspelled section
        ("lr=1e-6", "optim.lr"),  # section forgotten
        ("model.lora.enabld=true", "model.lora.enabled"),
        ("reference.stratgy=copy", "reference.strategy"),
        ("trian.seed=1", "train.seed"),
    ],
)
def test_unknown_override_key_suggests(item, suggestion):
    msg = error(over, item)
    assert msg.startswith(f"unknown key '{item.split('=')[0]}'")
    assert f"did you mean '{suggestion}'?" in msg


def test_unknown_override_without_close_match_has_no_wild_guess():
    assert error(over, "optim.zzz=1") == "unknown key 'optim.zzz'"


def test_leaf_in_two_sections_lists_both():
    assert "'reference.batch_size' or 'train.batch_size'" in error(over, "batch_size=4")


def test_override_below_a_plain_value_is_an_unknown_key():
    assert error(over, "loss.beta.x=1").startswith("unknown key 'loss.beta.x'")
    assert "loss.params.NAME=VALUE" in error(over, "loss.params.a.b=1")


def test_override_of_a_section_or_without_equals():
    assert "'model.lora' is a section" in error(over, "model.lora=true")
    assert error(over, "train.seed") == "override 'train.seed': expected key.sub=value"


# ---------------------------------------------------------------------------------------------------
# Wrong types name the key


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"train": {"batch_size": "eight"}}, "train.batch_size: expected an integer, got 'eight'"),
        ({"train": {"batch_size": 8.5}}, "train.batch_size: expected an integer, got 8.5"),
        ({"train": {"batch_size": True}}, "train.batch_size: expected an integer, got True"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number, got 'fast'"),
        ({"model": {"lora": {"enabled": "maybe"}}}, "model.lora.enabled: expected true or false"),
        ({"model": {"path": ["a"]}}, "model.path: expected a string, got ['a']"),
        (
            {"train": {"max_steps": "ten"}},
            "train.max_steps: expected an integer, got 'ten' (or null)",
        ),
        ({"loss": {"weights": [1, "x"]}}, "loss.weights[1]: expected a number, got 'x'"),
        ({"loss": {"params": [1]}}, "loss.params: expected a mapping"),
        ({"data": {"train_files": "[a"}}, "data.train_files"),
        ({"model": 3}, "model: expected a mapping, got 3"),
        ({"model": {"lora": True}}, "model.lora: expected a mapping, got True"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, data, expected):
    assert expected in error(load_config, write(tmp_path, data))


def test_wrong_type_in_override():
    assert error(over, "train.batch_size=abc") == (
        "train.batch_size: expected an integer, got 'abc'"
    )
    assert "loss.params.label_smoothing: expected a number" in error(
        over, "loss.params.label_smoothing=lots"
    )


def test_bad_yaml_and_missing_file(tmp_path):
    assert error(load_config, tmp_path / "nope.yaml").startswith("config file not found")
    assert "not valid YAML" in error(load_config, write(tmp_path, "model: [unclosed\n"))
    assert "expected a mapping at the top level" in error(load_config, write(tmp_path, "- a\n"))


# ---------------------------------------------------------------------------------------------------
# Choices and cross-field checks


def test_bad_choice_suggests():
    msg = error(over, "reference.strategy=cpy")
    assert msg.startswith("reference.strategy: expected one of auto, copy, precomputed")
    assert msg.endswith("(did you mean 'copy'?)")
    assert "did you mean 'cosine'" in error(over, "optim.scheduler=cosin")


def test_unknown_loss_suggests():
    msg = error(over, "loss.name=sigmod")
    assert "loss.name: unknown loss 'sigmod' (did you mean 'sigmoid'?)" in msg


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
@pytest.mark.parametrize("strategy", ["copy", "precomputed"])
def test_reference_free_loss_with_a_reference_is_an_error(loss, strategy):
    msg = error(over, f"loss.name={loss}", f"reference.strategy={strategy}")
    assert msg.startswith(f"reference.strategy: '{strategy}' configured but loss ['{loss}']")
    assert "reference-free" in msg


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_loss_with_none_or_auto_is_fine(loss):
    over(f"loss.name={loss}", "reference.strategy=none")
    over(f"loss.name={loss}")


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "[sigmoid,sft]"])
def test_reference_loss_with_strategy_none_is_an_error(loss):
    msg = error(over, f"loss.name={loss}", "reference.strategy=none")
    assert msg.startswith("reference.strategy: loss")
    assert "needs a reference" in msg


def test_adapter_reference_needs_lora():
    assert error(over, "reference.strategy=adapter") == (
        "reference.strategy: 'adapter' needs model.lora.enabled=true"
    )
    over("reference.strategy=adapter", "model.lora.enabled=true")


def test_weights_length_must_match_names():
    msg = error(over, "loss.name=[sigmoid,sft]", "loss.weights=[1.0]")
    assert msg == "loss.weights: 1 weights for 2 losses ['sigmoid', 'sft']"


def test_max_prompt_length_must_leave_room_for_the_response():
    msg = error(over, "data.max_length=512", "data.max_prompt_length=512")
    assert msg.startswith("data.max_prompt_length (512) must be < data.max_length (512)")
    over("data.max_length=512", "data.max_prompt_length=null")


@pytest.mark.parametrize(
    "item, expected",
    [
        ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
        ("train.max_steps=0", "train.max_steps: must be >= 1 or null, got 0"),
        ("loss.beta=0", "loss.beta: must be > 0 or null, got 0.0"),
        ("loss.beta=nan", "loss.beta: must be > 0 or null, got nan"),
        ("optim.lr=-1", "optim.lr: must be > 0, got -1.0"),
        ("optim.betas=[0.9]", "optim.betas: expected two numbers, got [0.9]"),
        ("optim.warmup_ratio=1", "optim.warmup_ratio: must be in [0, 1), got 1.0"),
        ("data.eval_fraction=1.5", "data.eval_fraction: must be in [0, 1), got 1.5"),
        ("loss.name=[]", "loss.name: give at least one loss"),
        # issue 12: optimizer values out of range trained the model the wrong way and exited 0
        ("optim.lr=nan", "optim.lr: must be > 0, got nan"),
        ("optim.lr=inf", "optim.lr: must be > 0, got inf"),
        ("optim.betas=[0.9,1.0]", "optim.betas: each must be in [0, 1), got 1.0 at position 1"),
        ("optim.betas=[-0.1,0.9]", "optim.betas: each must be in [0, 1), got -0.1 at position 0"),
        ("optim.eps=0", "optim.eps: must be > 0, got 0.0"),
        ("optim.weight_decay=-0.01", "optim.weight_decay: must be >= 0, got -0.01"),
        ("optim.max_grad_norm=-1", "optim.max_grad_norm: must be > 0 or null, got -1.0"),
        ("optim.warmup_steps=-5", "optim.warmup_steps: must be >= 0 or null, got -5"),
        ("log.log_every=0", "log.log_every: must be >= 1, got 0"),
        ("train.epochs=-1", "train.epochs: must be > 0, got -1.0"),
        ("train.eval_every=0", "train.eval_every: must be >= 1 or null, got 0"),
        ("train.save_every=-2", "train.save_every: must be >= 1 or null, got -2"),
        ("train.eval_batch_size=0", "train.eval_batch_size: must be >= 1 or null, got 0"),
        ("data.max_length=1", "data.max_length: must be >= 2, got 1"),
        ("reference.batch_size=0", "reference.batch_size: must be >= 1, got 0"),
        ("model.lora.r=0", "model.lora.r: must be >= 1, got 0"),
        ("model.lora.dropout=1", "model.lora.dropout: must be in [0, 1), got 1.0"),
    ],
)
def test_range_checks(item, expected):
    assert error(over, item) == expected


def test_non_finite_loss_settings_and_unknown_devices():
    msg = error(over, "loss.name=cdpo", "loss.params.label_smoothing=nan")
    assert msg == "loss.params.label_smoothing: must be a finite number, got nan"
    msg = error(over, "loss.name=[sigmoid,sft]", "loss.weights=[1,inf]")
    assert msg == "loss.weights: must be finite numbers, got [1.0, inf]"
    for device in ("gpu", "cuda:x", "tpu"):
        assert error(over, f"train.device={device}").startswith(
            f"train.device: expected auto, cpu, cuda, cuda:N or mps, got '{device}'"
        )


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_devices_accepted(device):
    assert over(f"train.device={device}").train.device == device


def test_resume_is_a_mode_or_an_existing_checkpoint(tmp_path):
    for mode in ("auto", "never", "force"):
        assert over(f"train.resume={mode}").train.resume == mode
    assert error(over, "train.resume=forse").startswith(
        "train.resume: forse not found; expected auto, never, force or a checkpoint folder"
    )
    assert "did you mean 'force'?" in error(over, "train.resume=forse")
    assert "is not a complete checkpoint folder" in error(over, f"train.resume={tmp_path}")
    (tmp_path / "COMPLETE").write_text("{}")
    assert over(f"train.resume={tmp_path}").train.resume == str(tmp_path)


def test_unknown_loss_param_suggests_accepted_one():
    msg = error(over, "loss.name=cdpo", "loss.params.label_smothing=0.1")
    assert msg.startswith("loss.params.label_smothing: not a hyperparameter of ['cdpo']")
    assert "did you mean 'label_smoothing'?" in msg
    assert "loss.beta" in error(over, "loss.params.beta=0.1")


# ---------------------------------------------------------------------------------------------------
# Example configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.path or path.name == "demo.yaml"


def test_example_configs_present():
    names = {p.name for p in CONFIGS}
    assert {"dpo.yaml", "ipo.yaml", "simpo.yaml", "orpo.yaml", "lora-dpo.yaml", "rpo.yaml"} <= names


def test_example_configs_use_paper_defaults():
    cfgs = {p.stem: load_config(p) for p in CONFIGS}
    assert cfgs["dpo"].loss.name == ["sigmoid"] and cfgs["dpo"].loss.beta == 0.1
    assert cfgs["simpo"].loss.beta == 2.0 and cfgs["simpo"].loss.params == {"gamma_beta_ratio": 0.5}
    assert cfgs["simpo"].reference.strategy == "none"
    assert cfgs["orpo"].loss.params == {"orpo_lambda": 0.1} and cfgs["orpo"].optim.lr == 5e-6
    assert cfgs["lora-dpo"].reference.strategy == "adapter" and cfgs["lora-dpo"].model.lora.enabled
    assert cfgs["rpo"].loss.name == ["sigmoid", "sft"] and cfgs["rpo"].loss.weights == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------------
# Names from other tools, null, settings that exclude each other, data sources


def test_dpo_is_an_alias_of_sigmoid_recorded_as_sigmoid(tmp_path, caplog):
    from preftune.config import LossConfig, validate

    caplog.set_level("INFO", logger="preftune.config")
    assert over("loss.name=dpo").loss.name == ["sigmoid"]
    assert "'dpo' is an alias of 'sigmoid'" in caplog.text
    cfg = load_config(write(tmp_path, {"loss": {"name": ["dpo", "sft"], "weights": [1, 0.5]}}))
    assert config_to_dict(cfg)["loss"]["name"] == ["sigmoid", "sft"]
    built = Config(loss=LossConfig(name=["dpo"]))  # the Python API: validate resolves it too
    validate(built)
    assert built.loss.name == ["sigmoid"]


@pytest.mark.parametrize(
    "item, suggestion",
    [
        ("model.lora.rank=8", "model.lora.r"),
        ("model.lora.lora_alpha=16", "model.lora.alpha"),
        ("learning_rate=1e-6", "optim.lr"),
        ("per_device_train_batch_size=4", "train.batch_size"),
        ("gradient_accumulation_steps=2", "train.grad_accum"),
        ("loss_type=ipo", "loss.name"),
    ],
)
def test_names_from_trl_and_peft_suggest_ours(item, suggestion):
    assert error(over, item) == f"unknown key '{item.split('=')[0]}' (did you mean '{suggestion}'?)"


def test_hints_apply_in_yaml_and_inside_list_entries(tmp_path):
    msg = error(load_config, write(tmp_path, {"model": {"lora": {"rank": 8}}}))
    assert msg == "unknown key 'model.lora.rank' (did you mean 'model.lora.r'?)"
    data = {"data": {"sources": [{"path": "a.jsonl"}, {"path": "org/x", "name": "cfg"}]}}
    msg = error(load_config, write(tmp_path, data))
    assert msg == "unknown key 'data.sources[1].name' (did you mean 'data.sources[1].config'?)"


def test_eval_files_after_eval_fraction_the_later_wins(tmp_path, caplog):
    caplog.set_level("INFO", logger="preftune.config")
    path = write(tmp_path, {"data": {"eval_fraction": 0.02}})
    cfg = load_config(path, ["data.eval_files=[held.jsonl]"])
    assert cfg.data.eval_files == ["held.jsonl"] and cfg.data.eval_fraction == 0.0
    assert (
        "data.eval_files set after data.eval_fraction=0.02: the later setting wins" in caplog.text
    )
    cfg = load_config(path, ["data.eval_files=[held.jsonl]", "data.eval_fraction=0.1"])
    assert cfg.data.eval_files == [] and cfg.data.eval_fraction == 0.1
    cfg = load_config(path, ["data.eval_sources=[{path: held.jsonl}]"])
    assert cfg.data.eval_fraction == 0.0 and cfg.data.eval_sources[0].path == "held.jsonl"
    both = write(tmp_path, {"data": {"eval_fraction": 0.1, "eval_files": ["h.jsonl"]}}, "both.yaml")
    msg = error(load_config, both)
    assert msg.startswith("data.eval_files and data.eval_fraction: set one") and "\n" not in msg


def test_null_resets_a_setting_to_its_default(tmp_path):
    cfg = load_config(
        write(tmp_path, {"data": {"eval_fraction": 0.02}}), ["data.eval_fraction=null"]
    )
    assert cfg.data.eval_fraction == 0.0
    assert over("data.eval_files=[a.jsonl]", "data.eval_files=null").data.eval_files == []
    assert over("train.batch_size=4", "train.batch_size=~").train.batch_size == 8
    assert over("reference.strategy=none", "loss.name=simpo").reference.strategy == "none"
    yaml_null = load_config(write(tmp_path, "data:\n  eval_files:\n  train_files: null\n"))
    assert yaml_null.data.eval_files == [] and yaml_null.data.train_files == []


def test_data_sources_from_yaml_and_overrides(tmp_path):
    data = {
        "data": {
            "train_files": ["base.jsonl"],
            "sources": [
                {"path": "extra.parquet", "fraction": 0.3, "prompt_column": "question"},
                {"path": "org/prefs", "split": "train_prefs", "max_rows": 100, "shape": "implicit"},
            ],
        }
    }
    cfg = load_config(write(tmp_path, data), ["data.sources[1].max_rows=50"])
    first, second = cfg.data.sources
    assert (first.fraction, first.prompt_column, first.chosen_column) == (0.3, "question", None)
    assert (second.split, second.max_rows, second.shape) == ("train_prefs", 50, "implicit")
    assert config_from_dict(yaml.safe_load(format_config(cfg))) == cfg  # printed config reads back
    assert "{path: extra.parquet, fraction: 0.3, prompt_column: question}" in format_config(cfg)
    cfg = over(
        "data.sources=[{path: a.jsonl, max_rows: 5}, {path: b.jsonl}]", "data.sources[1]={path: c}"
    )
    assert [s.path for s in cfg.data.sources] == ["a.jsonl", "c"]
    assert config_to_dict(cfg)["data"]["sources"][0]["max_rows"] == 5


@pytest.mark.parametrize(
    "item, expected",
    [
        ("data.sources=[{path: a, fraction: 0}]", "data.sources[0].fraction: must be in (0, 1]"),
        ("data.sources=[{path: a, fraction: 1.5}]", "data.sources[0].fraction: must be in (0, 1]"),
        ("data.sources=[{path: a, max_rows: 0}]", "data.sources[0].max_rows: must be >= 1"),
        ("data.sources=[{path: a, shape: chat}]", "data.sources[0].shape: expected one of auto"),
        ("data.eval_sources=[{fraction: 0.5}]", "data.eval_sources[0].path: give a file"),
        (
            "data.sources=[{path: a, max_rows: many}]",
            "data.sources[0].max_rows: expected an integer",
        ),
        ("data.sources=[a.jsonl]", "data.sources[0]: expected a mapping, got 'a.jsonl'"),
        ("data.sources=[{path: a, prompt_column: ''}]", "data.sources[0].prompt_column: give a"),
        (
            "data.sources[2].fraction=0.5",
            "data.sources[2]: no such entry; 'sources' has no entries",
        ),
        ("data.train_files=[a", "data.train_files: not valid YAML"),
    ],
)
def test_data_source_errors_name_the_entry(item, expected):
    assert error(over, item).startswith(expected)
