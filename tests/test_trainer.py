"""The training loop on a tiny random-init Llama built in the test (no download)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _tiny import tiny_train_config, toy_pairs, write_jsonl

from preftune.config import Config

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", toy_pairs(64, seed=0))


make_cfg = tiny_train_config


def read_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


@pytest.mark.parametrize(
    ("loss", "extra"),
    [
        ("sigmoid", {}),
        ("ipo", {"loss__beta": 0.5}),
        ("simpo", {"loss__beta": 2.0}),
        ("orpo", {}),
        ("sigmoid_norm", {"loss__beta": 5.0}),
        ("f_dpo", {"loss__params": {"f_divergence": "js"}}),
        ("f_dpo", {"loss__params": {"f_divergence": "forward_kl"}}),
        ("f_dpo", {"loss__params": {"f_divergence": "alpha", "f_alpha": 0.5}}),
        ("aot", {}),
        ("aot_unpaired", {}),
        ("sigmoid", {"loss__ld_alpha": 0.5}),
        ("sigmoid", {"loss__wpo_weighting": True}),
        ("sigmoid", {"loss__ld_alpha": 0.5, "reference__strategy": "precomputed"}),
    ],
)
def test_loss_falls_and_accuracy_rises(tiny_dir, pairs_file, tmp_path, loss, extra):
    from preftune.trainer import train

    cfg = make_cfg(
        tiny_dir, pairs_file, tmp_path / "run", loss__name=[loss], train__max_steps=30, **extra
    )
    train(cfg)
    rows = read_metrics(tmp_path / "run")
    first, last = rows[:3], rows[-3:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.05, (loss, first, last)
    assert mean(last, "rewards/accuracies") >= 0.9, (loss, last)


@pytest.mark.parametrize(
    ("strategy", "ld_alpha"),
    [("copy", None), ("precomputed", None), ("adapter", None), ("precomputed", 0.5)],
)
def test_every_reference_strategy_starts_at_log2(
    tiny_dir, pairs_file, tmp_path, strategy, ld_alpha
):
    """At θ₀ the policy equals the reference, so h = 0 and −log σ(0) = log 2 for every pair (with LD-DPO
    too: the precomputed table then carries the prefix sums)."""
    from preftune.trainer import train

    over = {"reference__strategy": strategy, "train__max_steps": 1, "loss__ld_alpha": ld_alpha}
    if strategy == "adapter":
        over["model__lora"] = type(Config().model.lora)(
            enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]
        )
    cfg = make_cfg(tiny_dir, pairs_file, tmp_path / "run", **over)
    train(cfg)
    first = read_metrics(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def _grads_after_window(model_dir, pairs, windows, loss, weights=None):
    """fp64 gradients after one optimizer window made of the given micro-batch index lists."""
    from preftune.build import build_objective
    from preftune.distributed import DistContext
    from preftune.model import PaddedLayout, load_model, resolve_source
    from preftune.reference import CopyReference
    from preftune.trainer import window_backward

    model = load_model(resolve_source(model_dir), device=torch.device("cpu")).double()
    layout = PaddedLayout(pad_token_id=0, chunk_size=7)
    policy = layout.module(model)
    reference = CopyReference(model, PaddedLayout(pad_token_id=0, chunk_size=5))
    cfg = Config()
    cfg.loss.name = loss
    cfg.loss.weights = weights
    micro = [layout.collate([pairs[i] for i in idx]) for idx in windows]
    window_backward(
        policy,
        reference,
        micro,
        build_objective(cfg),
        layout=layout,
        device=torch.device("cpu"),
        autocast=_null,
        dist=DistContext(),
    )
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _null():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize(
    ("loss", "weights"), [(["sigmoid"], None), (["ipo"], None), (["sigmoid", "sft"], [1.0, 0.5])]
)
def test_accumulation_equals_one_big_batch(tiny_dir, tmp_path, loss, weights):
    """k unequal micro-batches (3 + 1 + 2 pairs) give the gradient of one batch of the same 6 pairs.

    At θ₀ the margins are 0 but the gradients are not (d/dh of −log σ(βh) is −β/2; IPO's is −1/β·...);
    the token-level sft term weighs pairs by their (unequal) token counts, so dividing each micro-batch
    mean by the number of micro-batches would fail this test.
    """
    from preftune.build import build_tokenizer
    from preftune.config import DataConfig
    from preftune.data import load_preference_data

    data_cfg = DataConfig(
        train_files=[str(write_jsonl(tmp_path / "d.jsonl", toy_pairs(6, seed=3)))]
    )
    cfg = Config()
    cfg.model.path = str(tiny_dir)
    data = load_preference_data(data_cfg, build_tokenizer(cfg))
    pairs = [data.train[i] for i in range(6)]
    big = _grads_after_window(tiny_dir, pairs, [[0, 1, 2, 3, 4, 5]], loss, weights)
    small = _grads_after_window(tiny_dir, pairs, [[0, 1, 2], [3], [4, 5]], loss, weights)
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-10, atol=1e-10, msg=name)
    assert any(g.abs().sum() > 0 for g in big.values())


def test_same_seed_gives_bitwise_same_weights(tiny_dir, pairs_file, tmp_path):
    from safetensors.torch import load_file

    from preftune.trainer import train

    a = train(make_cfg(tiny_dir, pairs_file, tmp_path / "a", train__max_steps=3))
    b = train(make_cfg(tiny_dir, pairs_file, tmp_path / "b", train__max_steps=3))
    wa = load_file(a.final_model_dir / "model.safetensors")
    wb = load_file(b.final_model_dir / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_saved_model_reloads_and_gives_same_logps(tiny_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.logprobs import sequence_logps
    from preftune.model import PaddedLayout
    from preftune.trainer import train

    result = train(make_cfg(tiny_dir, pairs_file, tmp_path / "run", train__max_steps=2))
    tok = AutoTokenizer.from_pretrained(result.final_model_dir)
    model = AutoModelForCausalLM.from_pretrained(result.final_model_dir)
    ids = tok("abc? yes", return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    layout = PaddedLayout(pad_token_id=0, chunk_size=1024)
    batch = layout.collate(
        [
            {
                "prompt_ids": [1, 5, 6],
                "chosen_ids": [7, 8],
                "rejected_ids": [9],
                "weight": 1.0,
                "index": 0,
            }
        ]
    )
    ours = layout.logps(layout.module(model), batch)
    full = sequence_logps(
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
        batch.input_ids,
        batch.completion_mask,
    )[0]
    torch.testing.assert_close(
        torch.cat([ours.chosen_logps, ours.rejected_logps]), full, rtol=1e-5, atol=1e-5
    )
    assert (tmp_path / "run" / "report.json").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "data_drops.json").is_file()


def test_nonfinite_loss_stops_with_step_and_checkpoint(tiny_dir, pairs_file, tmp_path, monkeypatch):
    import preftune.build as build
    from preftune.trainer import TrainingError, train

    real = build.build_loss_fn

    def poisoned(cfg):
        fn = real(cfg)

        def call(*a, **k):
            out = fn(*a, **k)
            out.losses = out.losses * float("nan")
            return out

        return call

    monkeypatch.setattr(build, "build_loss_fn", poisoned)
    with pytest.raises(TrainingError, match="step 1"):
        train(make_cfg(tiny_dir, pairs_file, tmp_path / "run"))
    result = train(
        make_cfg(
            tiny_dir, pairs_file, tmp_path / "run2", train__skip_nonfinite=True, train__max_steps=2
        )
    )
    report = json.loads((result.output_dir / "report.json").read_text())
    assert report["skipped_steps"] == 2


_RUNNER = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_trainer import make_cfg
    from preftune.trainer import train
    real_step = torch.optim.AdamW.step
    def slow_step(self, *a, **k):
        time.sleep(float({delay!r}))
        return real_step(self, *a, **k)
    torch.optim.AdamW.step = slow_step
    cfg = make_cfg({model!r}, {data!r}, {out!r}, train__max_steps=12, train__save_every=3, train__grad_accum=2)
    train(cfg)
    """
)


def _run_training(model, data, out, delay=0.0):
    code = _RUNNER.format(
        tests=str(Path(__file__).parent),
        model=str(model),
        data=str(data),
        out=str(out),
        delay=delay,
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def test_sigkill_then_resume_gives_bitwise_same_weights(tiny_dir, pairs_file, tmp_path):
    """Kill -9 after the step-6 checkpoint; resuming must end bitwise where an uninterrupted run ends."""
    from safetensors.torch import load_file

    full = _run_training(tiny_dir, pairs_file, tmp_path / "full")
    assert full.wait(timeout=300) == 0, full.stdout.read().decode()

    victim = _run_training(tiny_dir, pairs_file, tmp_path / "killed", delay=0.3)
    marker = tmp_path / "killed" / "checkpoints" / "step-00000006" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "final").exists()

    resumed = _run_training(tiny_dir, pairs_file, tmp_path / "killed")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    wa = load_file(tmp_path / "full" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    steps = [r["step"] for r in read_metrics(tmp_path / "killed")]
    assert steps == sorted(set(steps)) and steps[-1] == 12, steps


def test_sigterm_checkpoints_and_exits_nonzero(tiny_dir, pairs_file, tmp_path):
    proc = _run_training(tiny_dir, pairs_file, tmp_path / "run", delay=0.3)
    first = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode != 0
    assert "resume" in out
    from preftune.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "run") is not None


def test_prefix_sharing_trains_like_padded_rows(tiny_dir, pairs_file, tmp_path):
    """train.prefix_sharing only changes how the prompt is computed: the same logged metrics per step.

    Also checks that the default (null) picks the shared layout for a Llama model.
    """
    from preftune.trainer import train

    common = {"train__max_steps": 3, "train__grad_accum": 2}
    a = train(make_cfg(tiny_dir, pairs_file, tmp_path / "a", train__prefix_sharing=False, **common))
    b = train(make_cfg(tiny_dir, pairs_file, tmp_path / "b", train__prefix_sharing=True, **common))
    c = train(make_cfg(tiny_dir, pairs_file, tmp_path / "c", **common))
    rows_a, rows_b = read_metrics(a.output_dir), read_metrics(b.output_dir)
    assert read_metrics(c.output_dir) == [
        {**r, "time": rc["time"], "tokens_per_s": rc["tokens_per_s"]}
        for r, rc in zip(rows_b, read_metrics(c.output_dir))
    ], (
        "the default layout for Llama must be the shared one (bitwise the same run as prefix_sharing=true)"
    )
    assert len(rows_a) == len(rows_b) == 3
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), key


def test_prefix_sharing_gradients_equal_padded_rows(tiny_dir, tmp_path):
    """One window through the shared [P|C|R] layout gives the padded layout's fp64 gradients (to 1e-6)."""
    from preftune.build import build_objective, build_tokenizer
    from preftune.config import DataConfig
    from preftune.data import load_preference_data
    from preftune.distributed import DistContext
    from preftune.model import (
        PaddedLayout,
        SharedPromptLayout,
        load_model,
        resolve_source,
    )
    from preftune.reference import CopyReference
    from preftune.trainer import window_backward

    cfg = Config()
    cfg.model.path = str(tiny_dir)
    data_cfg = DataConfig(
        train_files=[str(write_jsonl(tmp_path / "d.jsonl", toy_pairs(5, seed=4)))]
    )
    data = load_preference_data(data_cfg, build_tokenizer(cfg))
    pairs = [data.train[i] for i in range(5)]
    grads = []
    layouts = (
        PaddedLayout(pad_token_id=0, chunk_size=4),
        SharedPromptLayout(pad_token_id=0, chunk_size=4, attention_layers=2),
    )
    for layout in layouts:
        model = load_model(resolve_source(tiny_dir), device=torch.device("cpu")).double()
        policy = layout.module(model)
        reference = CopyReference(model, layout)
        torch.manual_seed(0)
        with torch.no_grad():  # move the policy off θ₀ so the margins are not all zero
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        micro = [layout.collate(pairs[:3]), layout.collate(pairs[3:])]
        window_backward(
            policy,
            reference,
            micro,
            build_objective(cfg),
            layout=layout,
            device=torch.device("cpu"),
            autocast=_null,
            dist=DistContext(),
        )
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        # fp64, but ~1e-9 absolute differences appear below the last layer (attention backward of the
        # segment kernel vs the padded-mask kernel); a wrong mask would differ at O(1e-3) here.
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-8, msg=name)


def test_compile_opt_in_gives_the_same_logged_run(tiny_dir, pairs_file, tmp_path):
    """train.compile only fuses element-wise work: the logged losses match the eager run."""
    from preftune.model import compile_blocks, load_model, resolve_source
    from preftune.trainer import train

    model = load_model(resolve_source(tiny_dir), device=torch.device("cpu"))
    assert compile_blocks(model) == 2 * 3  # 2 layers

    a = train(make_cfg(tiny_dir, pairs_file, tmp_path / "a", train__max_steps=2))
    b = train(
        make_cfg(tiny_dir, pairs_file, tmp_path / "b", train__max_steps=2, train__compile=True)
    )
    for ra, rb in zip(read_metrics(a.output_dir), read_metrics(b.output_dir), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        assert rb["logps/chosen"] == pytest.approx(ra["logps/chosen"], rel=1e-5, abs=1e-5)


def test_lora_resumes_bitwise_from_adapter_only_checkpoints(tiny_dir, pairs_file, tmp_path):
    """A LoRA checkpoint holds the adapters only (the base is model.path's): resuming from it ends where an
    uninterrupted run ends."""
    import shutil

    from safetensors.torch import load_file

    from preftune.config import LoraConfig
    from preftune.trainer import train

    over = {
        "train__max_steps": 4, "train__save_every": 2, "optim__lr": 1e-2,
        "model__lora": LoraConfig(enabled=True, r=4, alpha=8.0),
    }  # fmt: skip
    full = train(make_cfg(tiny_dir, pairs_file, tmp_path / "full", **over))
    cut = tmp_path / "cut"
    shutil.copytree(full.output_dir, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    resumed = train(make_cfg(tiny_dir, pairs_file, cut, **over))
    wa = load_file(full.final_model_dir / "adapter_model.safetensors")
    wb = load_file(resumed.final_model_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_orpo_logs_its_odds_ratio_and_nll_terms_and_they_add_up(tiny_dir, pairs_file, tmp_path):
    """ORPO = λ·odds-ratio term + NLL: both are logged (loss/orpo/odds_ratio, loss/orpo/nll) and sum to the
    logged loss; a weighted combination logs each term (loss/sigmoid, loss/sft)."""
    from preftune.trainer import train

    orpo = train(
        make_cfg(tiny_dir, pairs_file, tmp_path / "orpo", loss__name=["orpo"], train__max_steps=2)
    )
    for r in read_metrics(orpo.output_dir):
        total = r["loss/orpo/odds_ratio"] + r["loss/orpo/nll"]
        assert total == pytest.approx(r["loss"], rel=1e-5, abs=1e-7)
        assert r["loss/orpo/nll"] > 0
    combo = train(
        make_cfg(
            tiny_dir, pairs_file, tmp_path / "combo", loss__name=["sigmoid", "sft"],
            loss__weights=[1.0, 0.5], train__max_steps=2,
        )
    )  # fmt: skip
    for r in read_metrics(combo.output_dir):
        assert r["loss/sigmoid"] + r["loss/sft"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-7)


def test_eval_points_at_step_zero_and_once_at_the_end(tiny_dir, pairs_file, tmp_path):
    from preftune.trainer import train

    result = train(
        make_cfg(
            tiny_dir, pairs_file, tmp_path / "run", train__max_steps=4, train__eval_every=2,
            data__eval_fraction=0.25,
        )
    )  # fmt: skip
    evals = [r["step"] for r in read_metrics(result.output_dir, split="eval")]
    assert evals == [0, 2, 4]  # the last eval is the final eval, not run twice
    assert result.final_eval and "rewards/accuracies" in result.final_eval


def test_final_folder_has_a_model_card_and_the_run_report_says_how_it_went(
    tiny_dir, pairs_file, tmp_path, caplog
):
    import logging

    import yaml

    from preftune.trainer import train

    with caplog.at_level(logging.INFO, logger="preftune"):
        result = train(
            make_cfg(
                tiny_dir, pairs_file, tmp_path / "run", train__max_steps=2, optim__warmup_steps=3
            )
        )
    card = (result.final_model_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == str(tiny_dir) and "sigmoid" in front["tags"]
    assert "preftune train preftune_config.yaml" in card and str(pairs_file) in card
    saved = yaml.safe_load((result.final_model_dir / "preftune_config.yaml").read_text())
    assert saved["train"]["max_steps"] == 2
    config = json.loads((result.final_model_dir / "config.json").read_text())
    assert config["use_cache"] is True  # training turns the cache off; generation wants it back
    report = json.loads((result.output_dir / "report.json").read_text())
    assert (
        report["wall_time_s"] > 0 and report["tokens_per_s"] > 0 and report["peak_memory_bytes"] > 0
    )
    assert [f["rule"] for f in report["diagnostics"]] == ["long_warmup"]  # 3 of 2 steps
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("model: LlamaForCausalLM") for line in lines)
    assert any(line.startswith("schedule: 2 optimizer steps") for line in lines)
