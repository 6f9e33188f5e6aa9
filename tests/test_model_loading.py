"""preftune.model.loading: where models live (folder, .gguf, Hub id offline from the cache), attention
``auto``, every stochastic setting off, and load failures as one-line ModelErrors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import toy_pairs, write_jsonl

import preftune
from preftune.model import ModelError, disable_dropout, load_model, resolve_source

CPU = torch.device("cpu")


def test_resolve_source_kinds(tiny_dir, tmp_path):
    assert resolve_source(tiny_dir).local and resolve_source(tiny_dir).gguf_file is None
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    src = resolve_source(gguf)
    assert (src.name_or_path, src.gguf_file, src.local) == (str(tmp_path), "m.Q4.gguf", True)
    assert resolve_source(tmp_path, gguf_file="m.Q4.gguf").gguf_file == "m.Q4.gguf"
    hub = resolve_source("org/model-1.5B", revision="v2")
    assert not hub.local and hub.pretrained_kwargs() == {
        "local_files_only": False,
        "revision": "v2",
    }


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("missing-folder", "not found"),  # not org/name: never a Hub lookup
        ("./org/name", "not found"),  # a relative path that does not exist is not a Hub id
        ("", "empty"),
    ],
)
def test_resolve_source_errors(tmp_path, monkeypatch, path, needle):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=needle):
        resolve_source(path)


def test_a_folder_that_is_not_a_model_names_what_is_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_source(tmp_path)
    with pytest.raises(ModelError, match=r"gguf_file: x\.gguf not found"):
        resolve_source(tmp_path, gguf_file="x.gguf")
    with pytest.raises(ModelError, match="is a file"):
        resolve_source(tmp_path / "notes.txt")


def test_broken_weights_are_a_model_error(tiny_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(ModelError, match="cannot load a causal LM"):
        load_model(resolve_source(broken), device=CPU)


def test_every_dropout_like_setting_is_zeroed_whatever_its_name(tiny_dir):
    """GPT-J's attn_pdrop, OPT's layerdrop and Mixtral's router jitter are not called 'dropout'."""
    model = load_model(resolve_source(tiny_dir), device=CPU)
    model.config.attn_pdrop = 0.1
    model.config.layerdrop = 0.2
    model.config.router_jitter_noise = 0.3
    model.model.layers[0].self_attn.attention_dropout = 0.4  # a module's own copy
    model.model.layers[0].mlp.jitter_noise = 0.5
    model.config.rope_theta_like = 0.7  # not stochastic: left alone
    disable_dropout(model)
    for key in ("attn_pdrop", "layerdrop", "router_jitter_noise"):
        assert getattr(model.config, key) == 0.0, key
    assert model.model.layers[0].self_attn.attention_dropout == 0.0
    assert model.model.layers[0].mlp.jitter_noise == 0.0
    assert model.config.rope_theta_like == 0.7


def test_attention_auto_picks_sdpa_or_eager(tiny_dir, tmp_path):
    assert load_model(resolve_source(tiny_dir), device=CPU).config._attn_implementation == "sdpa"
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    Gemma2ForCausalLM(cfg).save_pretrained(tmp_path / "gemma2")
    model = load_model(resolve_source(tmp_path / "gemma2"), device=CPU)
    assert model.config._attn_implementation == "eager"  # Gemma 2 refuses SDPA in transformers 5


def _hub_cache(root: Path, repo: str, model_dir: Path) -> str:
    """``root/models--org--name/snapshots/<rev>/`` with the model's files and ``refs/main`` -> rev, the
    layout huggingface_hub writes; returns the revision."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return revision


def test_hub_ids_resolve_offline_from_the_hub_cache(tiny_dir, tmp_path):
    """train, eval, generate and data name the model by Hub id; HF_HUB_OFFLINE=1 and an empty network:
    everything comes from a cache laid out as huggingface_hub lays it out."""
    hub = tmp_path / "hub"
    revision = _hub_cache(hub, "acme/tiny-chat", tiny_dir)
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(8, seed=1))
    config = tmp_path / "run.yaml"
    config.write_text("loss: {name: sigmoid}\n")
    script = f"""
import sys
from preftune.cli import main
common = ["data.max_length=48", "data.max_prompt_length=24", "data.cache_dir={tmp_path / "c"}"]
codes = [
    main(["train", "{config}", "model.path=acme/tiny-chat", "model.revision={revision}",
          "data.train_files=[{data}]", "train.output_dir={tmp_path / "run"}", "train.max_steps=2",
          "train.batch_size=4", "log.progress=false", "log.report_to=[none]", *common]),
    main(["eval", "--model", "acme/tiny-chat", "--ref", "acme/tiny-chat", "--data", "{data}",
          "--max-length", "48", "--json"]),
    main(["generate", "--model", "acme/tiny-chat", "--prompt", "abc?", "--max-new-tokens", "3"]),
    main(["data", "{data}", "--tokenizer", "acme/tiny-chat", "data.cache_dir={tmp_path / "c"}"]),
]
sys.exit(max(codes))
"""
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(preftune.__file__).parents[1]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert "rewards/accuracies" in proc.stdout  # eval's JSON
    assert "8 read -> 8 kept" in proc.stdout  # data's report
