"""preftune.cli: parsing, help, exit codes and one-line errors, and each subcommand on tiny local inputs.

The trainer's ``train`` is stood in for under its real signature and returns real ``TrainResult`` objects
(the demo runner: a fake module of the same signature), so these tests check the CLI's wiring only;
tests/test_cli_e2e.py runs the real ones, tests/test_cli_evaluate.py ``preftune eval``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import preftune
from preftune import cli
from preftune.cli import main, parse_sweep

COMMANDS = ["train", "demo", "data", "eval", "generate", "plot"]


# ---------------------------------------------------------------------------------------------------
# Tiny local data (the tokenizer and model folders: tests/conftest.py's tok_dir and model_dir)


def write_pairs(path: Path, n: int = 12, extra: list[dict] | None = None) -> Path:
    rows = [
        {"prompt": f"what is {i}+{i}?", "chosen": f" it is {2 * i}.", "rejected": " no idea."}
        for i in range(n)
    ]
    rows += extra or []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("preftune: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


# ---------------------------------------------------------------------------------------------------
# Help and parsing


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_exits_0_with_examples(capsys, command):
    code, out, _ = run(capsys, *([command] if command else []), "--help")
    assert code == 0
    assert "examples:" in out
    assert "preftune" in out


def test_top_level_help_lists_every_command(capsys):
    _, out, _ = run(capsys, "--help")
    for command in COMMANDS:
        assert f"    {command} " in out


def test_no_command_prints_help_and_exits_2(capsys):
    code, _, err = run(capsys)
    assert code == 2
    assert "COMMAND" in err


def test_python_m_preftune_help_is_fast_and_imports_no_torch():
    env = {**os.environ, "PYTHONPATH": str(Path(preftune.__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "preftune", "--help"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "generate" in proc.stdout
    check = "import sys; from preftune.cli import main; main(['train', '--help']); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
    assert proc.stdout.strip().endswith("False"), proc.stdout


def test_parse_each_subcommand():
    a = cli._parse(["train", "c.yaml", "loss.beta=0.2", "--print-config", "train.seed=3"])
    assert (a.command, a.config, a.print_config) == ("train", "c.yaml", True)
    assert a.overrides == ["loss.beta=0.2", "train.seed=3"]  # overrides on both sides of the option

    a = cli._parse(["demo", "--out", "d", "--seed", "2", "--quick", "--sweep", "beta=0.1,0.5"])
    assert (a.out, a.seed, a.quick, a.sweep) == ("d", 2, True, [{"beta": [0.1, 0.5]}])
    a = cli._parse(["demo"])
    assert (a.out, a.seed, a.quick, a.sweep) == ("runs/demo", 0, False, None)

    a = cli._parse(["data", "f.jsonl", "data.max_length=64", "--tokenizer", "t", "--examples", "1"])
    assert (a.target, a.overrides, a.tokenizer, a.examples) == (
        "f.jsonl",
        ["data.max_length=64"],
        "t",
        1,
    )

    # --beta and --batch-size unset: resolved when the command runs (the loss registry's beta; 8 pairs or 16
    # generation prompts: tests/test_cli_evaluate.py, tests/test_loop.py)
    a = cli._parse(["eval", "--model", "m", "--data", "d.jsonl", "--ref", "r", "--json"])
    assert (a.model, a.ref, a.data, a.beta, a.batch_size, a.max_length, a.json) == (
        "m",
        "r",
        "d.jsonl",
        None,
        None,
        1024,
        True,
    )

    a = cli._parse(["generate", "--model", "m", "--prompt", "hi", "--temperature", "0.7", "--chat"])
    assert (a.prompt, a.prompts, a.max_new_tokens, a.temperature, a.top_p, a.seed, a.chat) == (
        "hi",
        None,
        64,
        0.7,
        1.0,
        0,
        True,
    )

    a = cli._parse(["plot", "runs/x", "--out", "x.png"])
    assert (a.run_dir, a.out) == ("runs/x", "x.png")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train"], "required: CONFIG.yaml"),
        (
            ["train", "c.yaml", "--bogus"],
            "unrecognized arguments: --bogus (see 'preftune train --help')",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["demo", "--seed", "x"], "argument --seed: invalid int value"),
        (["demo", "--sweep", "beta"], "expected KEY=V1,V2,..."),
        (["demo", "--sweep", "beta=0.1,big"], "must be numbers"),
        (["generate", "--model", "m"], "one of the arguments --prompt --prompts is required"),
        (["generate", "--model", "m", "--prompt", "a", "--prompts", "f"], "not allowed with"),
        (["eval", "--data", "d"], "required: --model"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, argv, needle):
    assert_one_line_error(*run(capsys, *argv)[::2], needle)


def test_parse_sweep():
    assert parse_sweep("beta=0.05,0.1,0.5") == {"beta": [0.05, 0.1, 0.5]}
    assert parse_sweep("loss.beta = 1e-2, 0.1 ,") == {"loss.beta": [0.01, 0.1]}
    for bad in ["beta", "=0.1", "beta=", "beta=,", "beta=a", "1x=2"]:
        with pytest.raises(Exception, match=r"expected|must be|no values"):
            parse_sweep(bad)


# ---------------------------------------------------------------------------------------------------
# train


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_print_config_shows_resolved_values_and_docs(capsys, tmp_path):
    path = write_config(tmp_path, {"model": {"path": "models/m"}, "loss": {"beta": 0.1}})
    code, out, err = run(
        capsys, "train", str(path), "--print-config", "loss.beta=0.05", "loss.name=[sigmoid,sft]"
    )
    assert code == 0, err
    assert "  beta: 0.05  # beta of the loss" in out
    assert "  name: [sigmoid, sft]  #" in out
    assert "  path: models/m  # the starting policy: a local Hugging Face model folder" in out
    assert yaml.safe_load(out)["loss"]["beta"] == 0.05


@pytest.mark.parametrize(
    "data, overrides, needles",
    [
        ({"modle": {}}, [], ["unknown key 'modle'", "did you mean 'model'?"]),
        ({"optim": {"lrr": 1}}, [], ["unknown key 'optim.lrr'", "did you mean 'optim.lr'?"]),
        ({}, ["train.batchsize=4"], ["unknown key 'train.batchsize'", "'train.batch_size'"]),
        ({"train": {"batch_size": "big"}}, [], ["train.batch_size: expected an integer"]),
        ({}, ["optim.lr=fast"], ["optim.lr: expected a number, got 'fast'"]),
        ({}, ["reference.strategy=cpy"], ["did you mean 'copy'?"]),
        ({"loss": {"name": "simpo"}, "reference": {"strategy": "copy"}}, [], ["reference-free"]),
        ({}, ["train.seed"], ["expected key.sub=value"]),
    ],
)
def test_config_errors_exit_2_one_line(capsys, tmp_path, data, overrides, needles):
    path = write_config(tmp_path, data)
    assert_one_line_error(*run(capsys, "train", str(path), *overrides)[::2], *needles)


def test_missing_config_file_exit_2(capsys, tmp_path):
    assert_one_line_error(
        *run(capsys, "train", str(tmp_path / "nope.yaml"))[::2], "config file not found"
    )


def stand_in_train(monkeypatch, body) -> None:
    """``preftune.trainer.train`` replaced by ``body(cfg)`` under the real signature (checked, so that the
    stand-in cannot drift from what the CLI calls); errors and results are the trainer's real ones."""
    import inspect

    from preftune import trainer

    def train(cfg, *, model=None, tokenizer=None, callbacks=()):
        return body(cfg)

    def shape(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(train) == shape(trainer.train)
    monkeypatch.setattr(trainer, "train", train)


def test_train_calls_trainer_and_prints_where_results_are(capsys, tmp_path, monkeypatch):
    from preftune.trainer import TrainResult

    seen = {}

    def body(cfg):
        seen["cfg"] = cfg
        out = Path(cfg.train.output_dir)
        return TrainResult(out, out / "final", out / "checkpoints" / "checkpoint-3", steps=3)

    stand_in_train(monkeypatch, body)
    path = write_config(tmp_path, {"model": {"path": "m"}})
    code, out, err = run(capsys, "train", str(path), f"train.output_dir={tmp_path / 'run'}")
    assert code == 0, err
    assert seen["cfg"].train.output_dir == str(tmp_path / "run")
    assert f"trained 3 steps; run folder: {tmp_path / 'run'}" in out
    assert f"final model: {tmp_path / 'run' / 'final'}" in out
    assert f"metrics:     {tmp_path / 'run' / 'metrics.jsonl'}" in out


def test_train_without_a_final_model_says_so(capsys, tmp_path, monkeypatch):
    from preftune.trainer import TrainResult

    stand_in_train(monkeypatch, lambda cfg: TrainResult(tmp_path / "run", None, None, steps=2))
    code, out, err = run(capsys, "train", str(write_config(tmp_path, {"model": {"path": "m"}})))
    assert code == 0, err
    assert "final model: (not saved: train.save_final=false)" in out


@pytest.mark.parametrize(("rank", "prints"), [(None, True), ("0", True), ("1", False)])
def test_train_summary_only_on_rank_0(capsys, tmp_path, monkeypatch, rank, prints):
    """Under torchrun every rank runs main(); the summary lines come from rank 0 (or no RANK) only."""
    from preftune.trainer import TrainResult

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    stand_in_train(monkeypatch, lambda cfg: TrainResult(tmp_path / "run", None, None, steps=3))
    path = write_config(tmp_path, {"model": {"path": "m"}})
    code, out, err = run(capsys, "train", str(path))
    assert code == 0, err
    assert ("trained 3 steps" in out) is prints, out


def test_training_failure_exit_1_with_last_checkpoint(capsys, tmp_path, monkeypatch):
    from preftune.trainer import TrainingError

    def body(cfg):
        raise TrainingError("loss is NaN at step 7", tmp_path / "checkpoint-5")

    stand_in_train(monkeypatch, body)
    code, _, err = run(capsys, "train", str(write_config(tmp_path, {})))
    assert code == 1
    assert "preftune: training failed: loss is NaN at step 7" in err
    assert f"last checkpoint: {tmp_path / 'checkpoint-5'} (resume with train.resume=auto)" in err
    assert "Traceback" not in err


def test_keyboard_interrupt_exit_130(capsys, tmp_path, monkeypatch):
    def body(cfg):
        raise KeyboardInterrupt

    stand_in_train(monkeypatch, body)
    code, _, err = run(capsys, "train", str(write_config(tmp_path, {})))
    assert code == 130
    assert "interrupted" in err


def test_debug_env_reraises(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_DEBUG", "1")
    from preftune.config import ConfigError

    with pytest.raises(ConfigError):
        main(["train", str(write_config(tmp_path, {"modle": {}}))])


def test_unexpected_exception_is_not_hidden(tmp_path, monkeypatch):
    def body(cfg):
        raise ZeroDivisionError("a bug")

    stand_in_train(monkeypatch, body)
    with pytest.raises(ZeroDivisionError):
        main(["train", str(write_config(tmp_path, {}))])


# ---------------------------------------------------------------------------------------------------
# demo (wiring, with a fake; eval: tests/test_cli_evaluate.py)


def test_demo_passes_arguments(capsys, tmp_path, monkeypatch):
    calls = []

    def run_demo(output_dir, *, seed=0, quick=False, sweep=None):
        calls.append((output_dir, seed, quick, sweep))
        return Path(output_dir)

    fake_module(monkeypatch, "preftune.demo", run_demo=run_demo)
    argv = ["demo", "--out", str(tmp_path), "--seed", "3", "--quick"]
    code, out, _ = run(capsys, *argv, "--sweep", "beta=0.05,0.1", "--sweep", "lr=1e-4")
    assert code == 0
    assert calls == [(str(tmp_path), 3, True, {"beta": [0.05, 0.1], "lr": [1e-4]})]
    assert str(tmp_path) in out
    run(capsys, "demo")
    assert calls[-1] == ("runs/demo", 0, False, None)


# ---------------------------------------------------------------------------------------------------
# data


def test_data_describes_a_file(capsys, tmp_path, tok_dir):
    extra = [
        {"prompt": "same?", "chosen": " yes.", "rejected": " yes."},  # chosen == rejected
        {"prompt": "long " * 30, "chosen": " a.", "rejected": " b."},  # prompt truncated
    ]
    path = write_pairs(tmp_path / "pairs.jsonl", n=12, extra=extra)
    code, out, err = run(
        capsys,
        "data",
        str(path),
        "--tokenizer",
        str(tok_dir),
        "--examples",
        "2",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "train.batch_size=4",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert code == 0, err
    assert "rows:      14 read -> 13 kept (13 train, 0 eval)" in out
    assert "dropped:   1 pairs, by reason:" in out
    assert "  chosen_equals_rejected                    1" in out
    assert "truncated: prompt in 1 pairs" in out
    assert "p50" in out and "p99" in out and "max" in out
    assert "padding:" in out and "batch_size 4" in out
    # "<s>what is 0+0?" is 13 tokens, " it is 0.</s>" 10: the response decoded on its own, in brackets.
    assert "--- example 1: pair 0, prompt 13 tokens, chosen 10, rejected 10" in out
    assert "<s>what is 0+0?⟦ it is 0.</s>⟧" in out
    assert out.count("--- example") == 2


def test_data_describe_dict(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    from preftune.config import load_config
    from preftune.describe import describe_dataset, format_description

    path = write_pairs(tmp_path / "pairs.jsonl", n=10)
    cfg = load_config(
        None,
        [f"data.train_files=[{path}]", f"data.cache_dir={tmp_path / 'c'}", "train.batch_size=3"],
    )
    d = describe_dataset(cfg, AutoTokenizer.from_pretrained(str(tok_dir)), examples=1)
    assert d["rows_read"] == 10 and d["train_pairs"] == 10
    assert sum(d["drops"].values()) == 0
    prompt = d["lengths"]["prompt"]
    assert prompt["p50"] == 13 and prompt["max"] == 13
    assert d["lengths"]["rejected"] == {"p50": 10, "p90": 10, "p99": 10, "max": 10}
    assert 0.0 < d["padding"]["share"] < 1.0
    assert d["examples"][0]["chosen"] == " it is 0.</s>"
    assert "dropped:   0" in format_description(d)


def test_data_with_a_config_file(capsys, tmp_path, tok_dir):
    path = write_pairs(tmp_path / "pairs.jsonl", n=8)
    cfg = write_config(
        tmp_path,
        {
            "model": {"path": str(tok_dir)},
            "data": {"train_files": [str(path)], "cache_dir": str(tmp_path / "cache")},
        },
    )
    code, out, err = run(capsys, "data", str(cfg), "--examples", "0")
    assert code == 0, err
    assert "8 read -> 8 kept" in out and "--- example" not in out


def test_data_malformed_line_names_line_and_field(capsys, tmp_path, tok_dir):
    path = write_pairs(
        tmp_path / "bad.jsonl", n=2, extra=[{"prompt": "x", "chosen": 3, "rejected": "y"}]
    )
    argv = ["data", str(path), "--tokenizer", str(tok_dir), f"data.cache_dir={tmp_path / 'c'}"]
    assert_one_line_error(*run(capsys, *argv)[::2], "line 3", "chosen")


def test_data_broken_json_names_line(capsys, tmp_path, tok_dir):
    path = write_pairs(tmp_path / "bad.jsonl", n=3)
    with path.open("a") as f:
        f.write('{"prompt": "x", "chosen": "y" "rejected": "z"}\n')
    argv = ["data", str(path), "--tokenizer", str(tok_dir), f"data.cache_dir={tmp_path / 'c'}"]
    assert_one_line_error(*run(capsys, *argv)[::2], "line 4")


def test_data_input_errors(capsys, tmp_path, tok_dir):
    path = write_pairs(tmp_path / "pairs.jsonl", n=2)
    code, out, _ = run(capsys, "data", str(path))
    assert code == 0 and "no tokenizer:" in out
    assert_one_line_error(
        *run(capsys, "data", str(path), "--tokenizer", str(tmp_path / "nope"))[::2],
        "model.tokenizer_path",
        "not found",
    )
    assert_one_line_error(
        *run(capsys, "data", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tok_dir))[::2],
        "not found",
    )
    assert_one_line_error(
        *run(capsys, "data", str(path), "--tokenizer", str(tok_dir), "data.max_lenght=3")[::2],
        "did you mean 'data.max_length'?",
    )


# ---------------------------------------------------------------------------------------------------
# generate (the module itself: tests/test_generation.py)


def test_generate_prints_a_completion(capsys, model_dir):
    argv = ["generate", "--model", str(model_dir), "--prompt", "what is 1+1?"]
    code, out, err = run(capsys, *argv, "--max-new-tokens", "4")
    assert code == 0, err
    assert out.startswith("=== prompt 1 ===\nwhat is 1+1?\n=== completion 1 ===\n")
    completion = out.split("=== completion 1 ===\n", 1)[1].rstrip("\n")
    assert 0 < len(completion) <= 4  # char tokenizer: at most one character per new token


def test_generate_from_prompt_files(capsys, tmp_path, model_dir):
    txt = tmp_path / "p.txt"
    txt.write_text("first?\n\nsecond?\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "one?"}\n{"prompt": "two?", "other": 1}\n')
    base = ["generate", "--model", str(model_dir), "--max-new-tokens", "2"]
    code, out, _ = run(capsys, *base, "--prompts", str(txt))
    assert code == 0 and "=== prompt 2 ===\nsecond?" in out and "=== prompt 3" not in out
    code, out, _ = run(capsys, *base, "--prompts", str(jsonl), "--json", "--chat")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["prompt"] for r in rows] == ["one?", "two?"]


def test_generate_input_errors(capsys, tmp_path, model_dir, tok_dir):
    base = ["generate", "--model", str(model_dir)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert_one_line_error(*run(capsys, *base, "--prompts", str(bad))[::2], "line 2", "'prompt'")
    assert_one_line_error(
        *run(capsys, *base, "--prompts", str(tmp_path / "none.txt"))[::2], "prompts file not found"
    )
    assert_one_line_error(
        *run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x")[::2],
        "--model",
        "not found",
    )
    assert_one_line_error(
        *run(capsys, *base, "--prompt", "x", "--temperature", "-1")[::2], "--temperature"
    )
    assert_one_line_error(*run(capsys, *base, "--prompt", "x", "--top-p", "0")[::2], "--top-p")


# ---------------------------------------------------------------------------------------------------
# plot


def write_metrics(run_dir: Path, steps: int = 6) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in range(1, steps + 1):
        for split in ["train"] + (["eval"] if step % 3 == 0 else []):
            rows.append(
                {
                    "step": step,
                    "split": split,
                    "loss": 0.693 - 0.05 * step,
                    "rewards/accuracies": min(1.0, 0.5 + 0.08 * step),
                    "rewards/margins": 0.1 * step,
                    "rewards/chosen": 0.05 * step,
                    "rewards/rejected": -0.05 * step,
                    "logps/chosen": -20.0 + 0.1 * step,
                    "logps/rejected": -22.0 - 0.3 * step,
                    "learning_rate": 1e-6 * min(1.0, step / 3),
                    "grad_norm": 1.0 / step,
                }
            )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_writes_a_png(capsys, tmp_path):
    pytest.importorskip("preftune.tracking")
    write_metrics(tmp_path / "run")
    code, out, err = run(capsys, "plot", str(tmp_path / "run"))
    assert code == 0, err
    png = Path(out.strip())
    assert png == tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run(capsys, "plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png"))
    assert code == 0 and (tmp_path / "c.png").stat().st_size > 0


def test_plot_input_errors(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "plot", str(tmp_path / "nope"))[::2], "run folder not found")
    assert_one_line_error(*run(capsys, "plot", str(tmp_path))[::2], "metrics file not found")
