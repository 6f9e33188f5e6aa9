"""Every bad input to `preftune train` is one clear line (issue 12): exit 2, exactly one stderr line starting
with ``preftune: error:`` (the last one) naming the setting, file, line or field, no traceback, and no run
folder left behind. One table, run in-process on a tiny model built here."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from _tiny import make_tiny_llama, toy_pairs, write_jsonl

from preftune.cli import main


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    make_tiny_llama(root / "model", layers=1, hidden=16)
    return {"model": root / "model", "data": write_jsonl(root / "pairs.jsonl", toy_pairs(8))}


def _model_variant(tmp: Path, good: dict, change) -> Path:
    folder = tmp / "model"
    shutil.copytree(good["model"], folder)
    change(folder)
    return folder


def _edit_config(**changes):
    def change(folder: Path) -> None:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return change


def _halve(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _model(change):
    return lambda tmp, good: [f"model.path={_model_variant(tmp, good, change)}"]


def _data(name: str, content: bytes | str, *extra: str):
    def setup(tmp: Path, good: dict) -> list[str]:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return [f"data.train_files=[{path}]", *extra]

    return setup


def _rows(rows: list[dict], *extra: str, name: str = "d.jsonl"):
    return _data(name, "".join(json.dumps(r) + "\n" for r in rows), *extra)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data)


PAIR = {"prompt": "abc?", "chosen": " yes.", "rejected": " no."}
GOOD_LINES = "".join(json.dumps(r) + "\n" for r in toy_pairs(8)).encode()


def _small_vocab(tmp: Path, good: dict) -> list[str]:
    make_tiny_llama(tmp / "small", vocab_size=20, layers=1, hidden=16, save_tokenizer=False)
    return [f"model.path={tmp / 'small'}", f"model.tokenizer_path={good['model']}"]


def _output_dir_is_a_file(tmp: Path, good: dict) -> list[str]:
    (tmp / "run").write_text("not a folder")
    return []


def _output_dir_under_a_file(tmp: Path, good: dict) -> list[str]:
    (tmp / "file").write_text("x")
    return [f"train.output_dir={tmp / 'file' / 'run'}"]


def _output_dir_read_only(tmp: Path, good: dict, monkeypatch) -> list[str]:
    (tmp / "run").mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the folder look read-only instead
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, m, **k: False if "run" in str(p) else real(p, m)
        )
    else:
        (tmp / "run").chmod(0o500)
    return []


def _output_dir_with_foreign_files(tmp: Path, good: dict) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "notes.txt").write_text("my notes")
    return []


# id: (setup(tmp, good) -> overrides, text the error line must hold)
CASES = {
    # The config layer: refused before any model loads.
    "betas": (lambda t, g: ["optim.betas=[0.9,1.0]"], ["optim.betas", "[0, 1)"]),
    "eps": (lambda t, g: ["optim.eps=0"], ["optim.eps", "> 0"]),
    "weight_decay": (lambda t, g: ["optim.weight_decay=-0.1"], ["optim.weight_decay", ">= 0"]),
    "lr_nan": (lambda t, g: ["optim.lr=nan"], ["optim.lr", "> 0", "nan"]),
    "max_grad_norm": (lambda t, g: ["optim.max_grad_norm=-1"], ["optim.max_grad_norm"]),
    "log_every_0": (lambda t, g: ["log.log_every=0"], ["log.log_every", ">= 1"]),
    "unknown_device": (lambda t, g: ["train.device=tpu"], ["train.device", "cuda:N"]),
    "missing_cuda": (lambda t, g: ["train.device=cuda:7"], ["train.device", "not available"]),
    "epochs_negative": (lambda t, g: ["train.epochs=-1"], ["train.epochs", "> 0"]),
    "warmup_negative": (lambda t, g: ["optim.warmup_steps=-3"], ["optim.warmup_steps", ">= 0"]),
    "resume_unknown": (lambda t, g: ["train.resume=sometimes"], ["train.resume", "force"]),
    "unknown_key": (lambda t, g: ["optim.betta=0.1"], ["optim.betta", "did you mean"]),
    # Model folders that are not models.
    "no_config_json": (
        _model(lambda d: (d / "config.json").unlink()),
        ["model.path", "config.json"],
    ),
    "broken_config_json": (
        _model(lambda d: (d / "config.json").write_text("{not json")),
        ["config.json", "not a valid JSON"],
    ),
    "unknown_model_type": (
        _model(_edit_config(model_type="nosuchmodel")),
        ["nosuchmodel", "model"],
    ),
    "missing_weights": (
        _model(lambda d: (d / "model.safetensors").unlink()),
        ["cannot load a causal LM", "model.safetensors"],
    ),
    "truncated_weights": (
        _model(lambda d: _halve(d / "model.safetensors")),
        ["cannot load a causal LM", "deserializing"],
    ),
    "wrong_shapes": (
        _model(_edit_config(hidden_size=32, intermediate_size=64)),
        ["cannot load a causal LM", "mismatch"],
    ),
    "weights_of_fewer_layers": (
        _model(_edit_config(num_hidden_layers=3)),
        ["lack", "model.layers.1"],
    ),
    "tokenizer_exceeds_embeddings": (_small_vocab, ["50 tokens", "only 20 embeddings"]),
    "model_path_missing": (lambda t, g: [f"model.path={t / 'nope'}"], ["model.path", "not found"]),
    "hub_id_not_cached": (
        lambda t, g: ["model.path=nosuch-org/nosuch-model"],
        ["nosuch-org/nosuch-model"],
    ),
    # The run folder.
    "output_dir_is_a_file": (_output_dir_is_a_file, ["train.output_dir", "is a file"]),
    "output_dir_under_a_file": (_output_dir_under_a_file, ["train.output_dir", "cannot be used"]),
    "output_dir_read_only": (_output_dir_read_only, ["train.output_dir", "not writable"]),
    "output_dir_foreign_files": (
        _output_dir_with_foreign_files,
        ["train.output_dir", "notes.txt"],
    ),
    # Data files.
    "data_missing": (lambda t, g: [f"data.train_files=[{t / 'nope.jsonl'}]"], ["nope.jsonl"]),
    "gz_truncated": (
        _data("d.jsonl.gz", _gzip(GOOD_LINES)[:-30]),
        ["d.jsonl.gz", "cannot decompress", "ends early"],
    ),
    "gz_not_gzip": (_data("d.jsonl.gz", GOOD_LINES), ["d.jsonl.gz", "not gzip data"]),
    "utf16_surrogate": (
        _data("d.jsonl", GOOD_LINES + b'{"prompt": "a\\ud800", "chosen": "b", "rejected": "c"}\n'),
        ["line 9", "prompt", "surrogate"],
    ),
    "invalid_utf8": (_data("d.jsonl", GOOD_LINES + b'{"prompt": "\xff"}\n'), ["line 9", "UTF-8"]),
    "empty_file": (_data("d.jsonl", b""), ["d.jsonl", "empty"]),
    "missing_field": (
        _data("d.jsonl", GOOD_LINES + b'{"prompt": "x", "chosen": "y"}\n'),
        ["line 9", "rejected"],
    ),
    "all_weights_zero": (
        _rows([{**PAIR, "w": 0}] * 4, "data.weight_column=w"),
        ["weight 0", "'w'"],
    ),
    "weight_overflows_float32": (
        _rows([PAIR, {**PAIR, "w": 1e39}], "data.weight_column=w"),
        ["line 2", "'w'", "float32"],
    ),
    "negative_weight": (_rows([{**PAIR, "w": -1}], "data.weight_column=w"), ["line 1", "'w'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, good, tmp_path, capsys, monkeypatch):
    # No network lookups in tests: huggingface_hub read HF_HUB_OFFLINE when it was imported.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    setup, needles = CASES[case]
    base = {
        "model": {"path": str(good["model"])},
        "data": {"train_files": [str(good["data"])], "max_length": 48, "max_prompt_length": 24},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 4},
        "log": {"progress": False, "report_to": []},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base))
    args = (tmp_path, good, monkeypatch) if setup is _output_dir_read_only else (tmp_path, good)
    overrides = setup(*args)
    existed = (tmp_path / "run").exists()
    before = (
        sorted(p.name for p in (tmp_path / "run").iterdir()) if (tmp_path / "run").is_dir() else []
    )

    code = main(["train", str(config), *overrides])
    err = capsys.readouterr().err

    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("preftune: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], errors[0]
    # Nothing left behind: no run folder created, a folder that was there is as it was.
    assert (tmp_path / "run").exists() == existed
    if (tmp_path / "run").is_dir():
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
