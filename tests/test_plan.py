"""preftune.plan: the memory arithmetic, the fit/advice logic and ``preftune plan``.

The arithmetic tests use a hand-made model (:data:`FACTS`) and two pairs, so every number is written out:

- P = 1000 parameters (a largest decoder layer Λ = 200, the root R = 600), LoRA adapters 50 (output widths
  40 per layer), hidden h = 8, MLP i = 16, L = 2 layers, 2 heads of 4 (q = 8), 1 KV head (kv = 4),
  vocab V = 32, tied; the framework is given as 1,000,000 bytes.
- held, full fine-tuning: weights 4·1000 = 4000, AdamW 8·1000 = 8000; reference copy 4000, precomputed
  8 B x 2 pairs = 16 (16 B x 2 with LD-DPO), adapter / none 0. Gradients (backward end): 4·1000 + the tied
  embedding's dense gradient V·h·4 = 1024 -> 5024.
- LoRA: weights 4·(1000 + 50) = 4200, AdamW 8·50 = 400, reference (adapter) 0, gradients 4·50 = 200.
- FSDP over 4: weights 4000/4 = 1000, AdamW 2000, copy 1000, gradients 1000 + 1024, gathered
  4·(600 + 2·200) + 8·200 = 5600.
- α (fp32) = 4·(6·8 + 2·8 + 2·4 + 2 + 4·16) = 4·138 = 552 B per token and layer; padded + GQA adds
  4·2·(8 − 4) = 32 -> 584; bf16: 20·8 + 4·8 + 4·4 + 4·2 + 8·16 = 344.
- pairs (P, C, R) = (5, 3, 2) and (4, 2, 6), batch 2. Shared prompt: one row of 10 + 12 = 22 tokens,
  13 scored, Σ(P + R) = 17. Padded: 4 rows x max(5 + 3, 4 + 6) = 10 -> 40 tokens.
- activations shared: 22·2·552 + 22·12·8 (final norm) + 17·2·(2·4)·4 (rejected pieces' prompt K/V)
  = 24288 + 2112 + 1088 = 27488; padded: 40·2·584 + 40·96 = 50560; checkpointed (shared):
  22·2·4·8 + 22·552 + 2112 = 1408 + 12144 + 2112 = 15664.
- LM head: chunk min(1024, 13) = 13: 13·32·4 + 13·8·4 + 32·8·4 (head gradient) = 1664 + 416 + 1024 = 3104
  (LoRA: 2080). Reference forward (copy): 22·(3·8 + 3·16)·4 + 13·32·4 = 6336 + 1664 = 8000.
- backward start = 27488 + max(3104, 8000) = 35488 > backward end 5024.
- allocator retention (CPU) = round(22·2·(0.4·552)) = round(9715.2) = 9715; LoRA adds 22·2·4·40 = 7040.
- peak = 1,000,000 + 4000 + 8000 + 4000 + 35488 + 9715 = 1,061,203.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from preftune.config import Config, validate
from preftune.plan import (
    ModelFacts,
    activation_bytes_per_token,
    format_plan,
    model_facts,
    plan_memory,
)

FACTS = ModelFacts(
    model_type="toy",
    hidden=8,
    intermediate=16,
    layers=2,
    heads=2,
    kv_heads=1,
    head_dim=4,
    vocab=32,
    params=1000,
    layer_params=200,
    root_params=600,
    lora_params=50,
    lora_out_width=40,
    tied=True,
)
LENGTHS = [(5, 3, 2), (4, 2, 6)]
BASE = 1_000_000


def config(**over) -> Config:
    cfg = Config()
    cfg.model.path = "unused"
    cfg.train.batch_size = 2
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    validate(cfg)
    return cfg


def plan(cfg: Config, **kw):
    kw = {"facts": FACTS, "lengths": LENGTHS, "world_size": 1, "device": "cpu", "baseline": BASE,
          "available": None, **kw}  # fmt: skip
    return plan_memory(cfg, **kw)


def items(p) -> dict[str, int]:
    return {it.name: it.bytes for it in p.items}


@pytest.fixture(autouse=True)
def _glibc_default(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)


def test_full_finetuning_copy_reference_by_hand():
    p = plan(config())
    got = items(p)
    assert p.layout == "shared_prompt" and p.reference == "copy" and p.precision == "fp32"
    assert got == {
        "framework": BASE,
        "weights": 4000,
        "optimizer state": 8000,
        "reference": 4000,
        "activations": 27488,
        "LM head (chunked)": 3104,
        "reference forward": 8000,
        "gradients": 5024,
        "allocator retention": 9715,
    }
    assert p.total == 1_061_203 == p.phases["train"]
    assert p.phases["load"] == BASE + 4000  # no weight files (hand-made facts)
    assert (p.batch.rows, p.batch.length, p.batch.scored, p.batch.rejected_kv) == (1, 22, 13, 17)


@pytest.mark.parametrize(("keep_mb", "head"), [(512, 3104), (0, 4 * 32 * 4 + 416 + 1024)])
def test_the_lm_head_keeps_all_scored_rows_within_the_softmax_budget(keep_mb, head):
    """chunk_size 4 < 13 scored tokens: kept, the head holds all 13 x 32 x 4 = 1664 B of softmax (3104 as
    above); with train.keep_logits_mb=0 one chunk of 4 x 32 x 4 = 512 B (+ 416 + 1024 = 1952)."""
    p = plan(config(train__chunk_size=4, train__keep_logits_mb=keep_mb))
    assert items(p)["LM head (chunked)"] == head
    assert ("logits kept" in {it.name: it.how for it in p.items}["LM head (chunked)"]) is bool(
        keep_mb
    )


def test_no_retention_when_large_tensors_are_mapped(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    p = plan(config())
    assert "allocator retention" not in items(p)
    assert p.total == 1_061_203 - 9715


@pytest.mark.parametrize(
    "over, reference, ref_bytes, has_forward",
    [
        ({}, "copy", 4000, True),
        ({"reference__strategy": "precomputed"}, "precomputed", 8 * 2, False),
        (
            {"loss__ld_alpha": 0.5, "reference__strategy": "precomputed"},
            "precomputed",
            16 * 2,
            False,
        ),
        ({"loss__name": ["simpo"]}, "none", 0, False),
        ({"reference__sync": None}, "copy", 4000, True),  # TR-DPO below
    ],
)
def test_reference_per_strategy(over, reference, ref_bytes, has_forward):
    cfg = config(**{k: v for k, v in over.items() if v is not None})
    if "reference__sync" in over:
        cfg.reference.sync.mode = "soft"  # TR-DPO: still a full copy
    p = plan(cfg)
    assert p.reference == reference
    assert items(p)["reference"] == ref_bytes
    assert ("reference forward" in items(p)) is has_forward


def test_precomputed_has_a_precompute_phase():
    """Weights + a copy (4000 + 4000) + a no-grad forward of reference.batch_size (8) = both pairs:
    22·72·4 + 13·32·4 = 6336 + 1664 = 8000."""
    p = plan(config(reference__strategy="precomputed"))
    assert p.phases["precompute"] == BASE + 4000 + 4000 + 8000
    assert p.total == max(p.phases.values())


def test_lora_counts_adapters_only():
    p = plan(config(model__lora=_lora()))
    got = items(p)
    assert p.reference == "adapter"
    assert (got["weights"], got["gradients"], got["optimizer state"], got["reference"]) == (
        4200, 200, 400, 0,
    )  # fmt: skip
    assert got["LM head (chunked)"] == 2080
    assert got["reference forward"] == 8000  # the adapter reference runs the same forward
    assert got["allocator retention"] == 9715 + 7040
    assert p.total == BASE + 4200 + 400 + 27488 + 8000 + 9715 + 7040


def _lora():
    from preftune.config import LoraConfig

    return LoraConfig(enabled=True)


def test_fsdp_divides_by_processes_and_adds_gathered_layers():
    p = plan(config(train__parallel="fsdp"), world_size=4)
    got = items(p)
    assert p.parallel == "fsdp"
    assert (got["weights"], got["gradients"], got["optimizer state"], got["reference"]) == (
        1000, 1000 + 1024, 2000, 1000,
    )  # fmt: skip
    assert got["FSDP gathered"] == 5600
    ddp = items(plan(config(), world_size=4))  # DDP: everything on every process
    assert (ddp["weights"], ddp["optimizer state"], "FSDP gathered" in ddp) == (4000, 8000, False)


def test_activations_padded_and_checkpointed():
    assert activation_bytes_per_token(FACTS, precision="fp32", padded=False) == 552
    assert activation_bytes_per_token(FACTS, precision="fp32", padded=True) == 584
    assert activation_bytes_per_token(FACTS, precision="bf16", padded=False) == 344
    padded = plan(config(train__prefix_sharing=False))
    assert padded.layout == "padded"
    assert (padded.batch.rows, padded.batch.length) == (4, 10)
    assert items(padded)["activations"] == 50560
    gc = plan(config(model__gradient_checkpointing=True))
    assert items(gc)["activations"] == 15664


def test_without_data_the_max_length_bound():
    """Shared prompt: B pairs of 1 + (L-1) + (L-1) tokens; padded: 2B rows of L."""
    p = plan(config(data__max_length=64, data__max_prompt_length=None), lengths=None)
    assert (p.batch.rows, p.batch.length) == (1, 2 * 127)
    assert "max_length" in p.batch.source
    cfg = config(data__max_length=64, data__max_prompt_length=None, train__prefix_sharing=False)
    p = plan(cfg, lengths=None)
    assert (p.batch.rows, p.batch.length) == (4, 64)


def test_bf16_on_cuda_adds_the_autocast_cache():
    p = plan(config(), device="cuda", baseline=None)
    assert p.precision == "bf16"
    assert items(p)["autocast cache"] == 2000
    assert "allocator retention" not in items(p)  # CPU heap only
    assert items(p)["framework"] == 256 * 1024**2  # CUDA: a constant, not this process's RSS


# ---------------------------------------------------------------------------------------------------
# Fit and advice


def test_fits_when_the_budget_is_large():
    p = plan(config(), available=10 * BASE)
    assert p.fits is True and p.advice == []
    assert "fits" in format_plan(p)


def test_tiny_budget_gives_the_advice_in_order():
    """Four pairs over 2 processes: 2 per micro-batch, then 1 (each change saves bytes, none fits)."""
    p = plan(config(train__batch_size=2), available=BASE + 100, world_size=2, lengths=LENGTHS * 2)
    assert p.fits is False
    changes = [a.change.split("=")[0] for a in p.advice]
    assert changes == [
        "reference.strategy",
        "model.gradient_checkpointing",
        "train.batch_size",
        "train.parallel",
        "model.lora.enabled",
    ]
    assert p.advice[2].change == "train.batch_size=1 train.grad_accum=2"  # the same global batch
    totals = [a.total for a in p.advice]
    assert totals == sorted(totals, reverse=True) and not any(a.fits for a in p.advice)
    text = format_plan(p)
    assert "DOES NOT FIT" in text and "even with all of them" in text


def test_advice_stops_at_the_first_change_that_fits():
    """Precomputed: the copy (4000) goes, the table (16) comes, and backward start loses the reference
    forward: 27488 + 3104 instead of 27488 + 8000 -> 1,061,203 - 4000 + 16 - 4896 = 1,052,323."""
    p = plan(config(), available=1_055_000)
    assert [a.change for a in p.advice] == ["reference.strategy=precomputed"]
    assert p.advice[0].fits and p.advice[0].total == 1_052_323


# ---------------------------------------------------------------------------------------------------
# A real (tiny) model folder: facts from its config, and the CLI


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tests._tiny import make_tiny_llama, toy_pairs, write_jsonl

    root = tmp_path_factory.mktemp("plan")
    model, _ = make_tiny_llama(root / "model", hidden=32, layers=2)
    write_jsonl(root / "pairs.jsonl", toy_pairs(16))
    TINY_MODEL["model"] = model
    return root


TINY_MODEL: dict = {}


def test_model_facts_match_the_real_model(tiny):
    from peft import LoraConfig, get_peft_model

    cfg = config(model__path=str(tiny / "model"), model__lora=_lora())
    facts = model_facts(cfg)
    model = TINY_MODEL["model"]  # the model the folder was saved from
    assert facts.params == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    assert facts.layer_params == sum(p.numel() for p in layer.parameters())
    assert (facts.hidden, facts.intermediate, facts.layers, facts.heads, facts.kv_heads) == (
        32, 64, 2, 4, 2,
    )  # fmt: skip
    assert facts.tied and facts.sharing_note is None and facts.file_bytes > 0
    peft = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    assert facts.lora_params == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def _write_config(tiny: Path, path: Path, **train) -> Path:
    doc = {
        "model": {"path": str(tiny / "model")},
        "data": {"train_files": [str(tiny / "pairs.jsonl")], "max_length": 64,
                 "max_prompt_length": 32, "cache_dir": str(tiny / "cache")},
        "train": {"batch_size": 4, "max_steps": 2, **train},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_plan_prints_the_table(tiny, capsys):
    from preftune.cli import main

    cfg = _write_config(tiny, tiny / "run.yaml")
    code = main(["plan", str(cfg), "train.chunk_size=16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for needle in ("memory plan per process (cpu, fp32)", "weights", "optimizer state",
                   "activations", "LM head (chunked)", "peak", "available", "fits",
                   "longest of"):  # fmt: skip
        assert needle in out, out
    code = main(["plan", str(cfg), "--no-data", "--available-gib", "0.001"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "upper bound from data.max_length" in out and "DOES NOT FIT" in out
    assert "1. reference.strategy=precomputed" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train.batch_size=0"], "train.batch_size"),
        (["train.bach_size=2"], "train.batch_size"),  # did you mean
        (["--devices", "0"], "--devices"),
    ],
)
def test_cli_plan_bad_config_exits_2_with_one_line(tiny, capsys, argv, needle):
    from preftune.cli import main

    cfg = _write_config(tiny, tiny / "bad.yaml")
    code = main(["plan", str(cfg), *argv])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("preftune: error: ") and needle in lines[0]


def test_cli_plan_missing_model_exits_2(tiny, tmp_path, capsys):
    from preftune.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": {"path": str(tmp_path / "nope")}}))
    code = main(["plan", str(cfg), "--no-data"])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
