"""Every common architecture, proven: tiny random-init models of 31 families (``_archs.py``) through the
model-and-layout layer with the default config.

For each family:

* the setup probe picks the expected layout (:data:`NOT_SHARED` says which families fall back to padded
  rows, and why), with no traceback;
* response log-probs of every layout the model gets (padded right, padded left, and the shared prompt
  where chosen) equal a naive float64 forward of each unpadded sequence through the model's own full
  logits: values to 1e-5 relative, gradients (of a fixed random weighting of the log-probs) to 1e-4 of
  the largest gradient entry. The models are run in *training* mode, so a dropout left on (GPT-J's
  ``attn_pdrop``, Mixtral's router jitter, OPT's layerdrop...) fails here;
* 3 training steps through :func:`preftune.trainer.train` start at loss ln 2 (copy reference: policy and
  reference agree exactly), and the final folder reloads with ``AutoModelForCausalLM`` and generates;
* LoRA with the default ``target_modules: [all-linear]`` attaches to the family's own linear layers;
* MoE families with ``output_router_logits``: the router term equals the model's own ``aux_loss``
  (times ``router_aux_loss_coef``) and is added to the training loss.

Run as a script (``python tests/test_architectures.py``) to print the README's table of architectures.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _archs import ARCHS, build_tiny
from _tiny import make_char_tokenizer, tiny_train_config, toy_pairs, write_jsonl

from preftune.logprobs import sequence_logps
from preftune.model import (
    PaddedLayout,
    choose_layout,
    load_model,
    resolve_source,
)
from preftune.model.arch import router_aux

NAMES = sorted(ARCHS)
#: Families that keep padded rows, and why (the probe's reason must contain this).
NOT_SHARED = {
    "bloom": "AttentionInterface",  # ALiBi attention written inside the layer
    "falcon": "AttentionInterface",
    "stablelm": "route attention",  # its decoder layer drops the routing keyword arguments
    "llama4": "attention_chunk_size",  # chunked local attention, position-scaled queries
}
#: Families whose left-padded batches differ from unpadded sequences in transformers itself (preftune pads
#: on the right): Llama 4 scales queries by cache position, which left padding shifts.
LEFT_PADDING_INEXACT = {"llama4"}
#: Families whose transformers model adds a router load-balancing term (Llama 4's and DeepSeek-V3's add
#: none: asking for it is a config error).
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "granitemoe", "olmoe"}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def arch_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("archs")


def _arch_dir(root: Path, name: str, **config_overrides) -> Path:
    """The tiny model of ``name`` saved with the char tokenizer (built once per module and settings)."""
    key = name + "".join(f"-{k}={v}" for k, v in sorted(config_overrides.items()))
    out = root / key
    if not (out / "config.json").is_file():
        model = build_tiny(name)
        for k, v in config_overrides.items():
            setattr(model.config, k, v)
        model.save_pretrained(out, safe_serialization=True)
        make_char_tokenizer(out)
    return out


def _pairs() -> list[dict]:
    """Unequal lengths; one pair longer than the 8-token windows/chunks; one-token responses."""
    g = torch.Generator().manual_seed(11)
    shapes = [(12, 9, 14), (3, 1, 6), (7, 5, 1), (1, 4, 3)]
    rows = []
    for i, (p, c, r) in enumerate(shapes):
        ids = torch.randint(3, 49, (p + c + r,), generator=g).tolist()
        rows.append(
            {
                "prompt_ids": ids[:p],
                "chosen_ids": ids[p : p + c],
                "rejected_ids": ids[p + c :],
                "weight": 1.0,
                "index": i,
            }
        )
    return rows


def _naive(model, pairs, weights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """float64 log-probs ``[2B]`` (chosen rows, then rejected) from full logits of each unpadded
    sequence, and the gradients of ``Σ weights · logps``."""
    model.zero_grad(set_to_none=True)
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in pairs:
            ids = torch.tensor([ex["prompt_ids"] + ex[key]])
            mask = torch.zeros_like(ids)
            mask[:, len(ex["prompt_ids"]) :] = 1
            out.append(sequence_logps(model(input_ids=ids, use_cache=False).logits, ids, mask)[0])
    logps = torch.cat(out)
    (logps * weights.double()).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def _layout_run(layout, model, pairs, weights):
    model.zero_grad(set_to_none=True)
    module = layout.module(model)
    out = layout.logps(module, layout.collate(pairs))
    logps = torch.cat([out.chosen_logps, out.rejected_logps])
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def _max_rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((got.double() - ref).abs() / ref.abs().clamp(min=1.0)).max())


def check_exact(root: Path, name: str) -> dict:
    """The layout chosen for ``name`` and each layout's max relative log-prob error vs float64."""
    model = load_model(resolve_source(_arch_dir(root, name)), device=CPU)
    naive_model = copy.deepcopy(model).double().eval()
    if (
        hasattr(naive_model, "set_experts_implementation")
        and naive_model._can_set_experts_implementation()
    ):
        naive_model.set_experts_implementation("eager")  # grouped_mm kernels take no float64
    model.train()  # dropout must be off in training mode too
    chosen = choose_layout(model, pad_token_id=0, chunk_size=8)
    pairs = _pairs()
    weights = torch.randn(2 * len(pairs), generator=torch.Generator().manual_seed(5))
    ref, ref_grads = _naive(naive_model, pairs, weights)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    layouts = {"padded right": PaddedLayout(pad_token_id=0, chunk_size=8)}
    if name not in LEFT_PADDING_INEXACT:
        layouts["padded left"] = PaddedLayout(pad_token_id=0, chunk_size=8, padding_side="left")
    if chosen.name == "shared_prompt":
        layouts["shared prompt"] = chosen
    errors = {}
    for label, layout in layouts.items():
        logps, grads = _layout_run(layout, model, pairs, weights)
        torch.testing.assert_close(
            logps.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m, lb=label: f"{lb}: {m}"
        )
        assert grads.keys() == ref_grads.keys(), label
        for key, g in grads.items():
            torch.testing.assert_close(
                g.double(), ref_grads[key], rtol=1e-4, atol=1e-4 * scale,
                msg=lambda m, lb=label, k=key: f"{lb}, grad of {k}: {m}",
            )  # fmt: skip
        errors[label] = _max_rel_error(logps, ref)
    return {"layout": chosen, "errors": errors}


@pytest.mark.parametrize("name", NAMES)
def test_log_probs_of_every_layout_equal_a_float64_forward(arch_root, name):
    result = check_exact(arch_root, name)
    layout = result["layout"]
    if name in NOT_SHARED:
        assert layout.name == "padded"
        assert any(NOT_SHARED[name] in note for note in layout.notes), layout.notes
    else:
        assert layout.name == "shared_prompt", layout.describe()
    assert layout.chunked_head, layout.describe()


def _read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pairs_file(arch_root) -> Path:
    return write_jsonl(arch_root / "pairs.jsonl", toy_pairs(12, seed=1))


@pytest.mark.parametrize("name", NAMES)
def test_three_steps_from_ln2_then_reload_and_generate(arch_root, pairs_file, tmp_path, name):
    from transformers import AutoModelForCausalLM

    from preftune.trainer import train

    cfg = tiny_train_config(
        _arch_dir(arch_root, name), pairs_file, tmp_path / "run",
        train__max_steps=3, train__batch_size=4, data__max_length=32, data__max_prompt_length=16,
        reference__strategy="copy", train__save_final=True,
    )  # fmt: skip
    result = train(cfg)
    rows = [r for r in _read_metrics(result.output_dir) if r.get("split", "train") == "train"]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(r["loss"]) for r in rows)
    report = json.loads((result.output_dir / "report.json").read_text())
    assert report["layout"]["name"] == ("padded" if name in NOT_SHARED else "shared_prompt")
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_model_dir)
    ids = torch.tensor([[1, 20, 21, 22]])
    out = reloaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("name", NAMES)
def test_lora_default_targets_the_familys_own_linear_layers(arch_root, name):
    """Default LoRA targets (all-linear) attach adapters to the decoder's own layers, never the LM head,
    and the adapter reference (adapters off) starts equal to the policy."""
    pytest.importorskip("peft")
    from preftune.build import build_policy_model
    from preftune.config import Config
    from preftune.reference import AdapterReference

    cfg = Config()
    cfg.model.path = str(_arch_dir(arch_root, name))
    cfg.model.lora.enabled = True
    model = build_policy_model(cfg, CPU)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted, "no linear layer received an adapter"
    assert not any(n.endswith(("lm_head", "embed_out", "output")) for n in adapted)
    layout = choose_layout(model, pad_token_id=0, chunk_size=8)
    policy = layout.module(model)
    batch = layout.collate(_pairs())
    pol = layout.logps(policy, batch)
    ref = AdapterReference(policy, layout).logps(batch)
    torch.testing.assert_close(pol.chosen_logps.detach(), ref.chosen_logps, rtol=0, atol=1e-6)
    torch.testing.assert_close(pol.rejected_logps.detach(), ref.rejected_logps, rtol=0, atol=1e-6)
    (pol.chosen_logps - pol.rejected_logps).sum().backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)


@pytest.mark.parametrize("name", sorted(MOE))
def test_router_term_equals_the_models_own_aux_loss(arch_root, name):
    model = load_model(
        resolve_source(_arch_dir(arch_root, name)), device=CPU, output_router_logits=True
    )
    aux = router_aux(model)
    assert aux is not None, "output_router_logits=true must give a router term"
    layout = PaddedLayout(pad_token_id=0, chunk_size=8)
    batch = layout.collate(_pairs())
    ours = layout.logps(layout.module(model), batch).aux_loss
    theirs = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        output_router_logits=True,
        use_cache=False,
    ).aux_loss
    assert float(theirs) > 0
    torch.testing.assert_close(ours, model.config.router_aux_loss_coef * theirs)


@pytest.mark.parametrize("name", ["llama4", "deepseek_v3", "llama"])
def test_asking_for_a_router_term_the_model_lacks_is_an_error(arch_root, name):
    from preftune.build import build_policy_model
    from preftune.config import Config
    from preftune.model import ModelError

    cfg = Config()
    cfg.model.path = str(_arch_dir(arch_root, name))
    cfg.model.output_router_logits = True
    with pytest.raises(ModelError, match="output_router_logits"):
        build_policy_model(cfg, CPU)


def test_router_term_is_added_to_the_training_loss(arch_root, pairs_file, tmp_path):
    """Mixtral with output_router_logits: the first loss is ln 2 + the logged router term."""
    from preftune.trainer import train

    cfg = tiny_train_config(
        _arch_dir(arch_root, "mixtral"), pairs_file, tmp_path / "run",
        train__max_steps=2, train__batch_size=4, data__max_length=32, data__max_prompt_length=16,
        reference__strategy="copy", train__save_final=False, model__output_router_logits=True,
    )  # fmt: skip
    rows = _read_metrics(train(cfg).output_dir)
    assert rows[0]["aux_loss"] > 0
    assert rows[0]["loss"] == pytest.approx(math.log(2) + rows[0]["aux_loss"], abs=1e-6)


def _table(root: Path) -> str:
    """The README's table: one row per family (layout, max log-prob error, LoRA targets, notes)."""
    from preftune.build import build_policy_model
    from preftune.config import Config

    lines = [
        "| architecture | layout | max rel. error vs fp64 | LoRA (all-linear) | notes |",
        "|---|---|---|---|---|",
    ]
    for name in NAMES:
        result = check_exact(root, name)
        layout = result["layout"]
        cfg = Config()
        cfg.model.path = str(_arch_dir(root, name))
        cfg.model.lora.enabled = True
        model = build_policy_model(cfg, CPU)
        leaves = sorted(
            {
                n.split(".lora_A")[0].replace(".base_layer", "").rsplit(".", 1)[-1]
                for n, _ in model.named_parameters()
                if ".lora_A" in n
            }
        )
        err = max(result["errors"].values())
        notes = "; ".join(layout.notes) or ""
        if name in MOE:
            notes = "; ".join(x for x in ("router aux loss with output_router_logits", notes) if x)
        lines.append(
            f"| {name} | {layout.name.replace('_', ' ')} | {err:.1e} | {', '.join(leaves)} | {notes} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(_table(Path(tempfile.mkdtemp(prefix="preftune-archs-"))))
