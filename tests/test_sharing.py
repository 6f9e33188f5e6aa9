"""Prefix sharing and packing are exact: log-probs and gradients equal the padded two-row computation."""

from __future__ import annotations

import copy

import pytest
import torch

from preftune.modeling import SequenceLogpsModel, split_pairs
from preftune.sharing import (
    SharedPrefixLogpsModel,
    collate_packed,
    collate_shared,
    forward_shared_pairs,
    shared_model_inputs,
)

VOCAB = 50
PAD = 0


def _padded(examples, pad_token_id, padding_side="right"):
    """Reference two-row layout: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected."""
    seqs, comp = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            seqs.append(ex["prompt_ids"] + ex[key])
            comp.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[key]))
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad_token_id)
    attn = torch.zeros_like(ids)
    cmask = torch.zeros_like(ids)
    pos = torch.zeros_like(ids)
    for i, (s, c) in enumerate(zip(seqs, comp)):
        sl = slice(length - len(s), length) if padding_side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        attn[i, sl] = 1
        cmask[i, sl] = torch.tensor(c)
        pos[i, sl] = torch.arange(len(s))
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": cmask, "position_ids": pos}


def _pairs(seed=0):
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    # unequal prompt/chosen/rejected lengths, responses of length 1 on either side
    shapes = [(7, 5, 3), (3, 1, 9), (11, 4, 1), (1, 6, 2)]
    return [
        {
            "prompt_ids": toks(p),
            "chosen_ids": toks(c),
            "rejected_ids": toks(r),
            "weight": 1.0,
            "index": i,
        }
        for i, (p, c, r) in enumerate(shapes)
    ]


def _llama(tie=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie, pad_token_id=PAD, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


def _qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=PAD, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).float().eval()


def _run(module, inputs, seed=1):
    """logps, n_tokens and the parameter gradients of a fixed random linear loss on the logps."""
    module.zero_grad(set_to_none=True)
    logps, n = module(**inputs)
    w = torch.randn(logps.shape, generator=torch.Generator().manual_seed(seed))
    (logps * w).sum().backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
    return logps.detach(), n, grads


def _assert_same(got, ref):
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], ref[1])
    assert got[2].keys() == ref[2].keys()
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], atol=1e-5, rtol=1e-5, msg=k)


def _reference(model, pairs, padding_side="right"):
    base = SequenceLogpsModel(copy.deepcopy(model), chunk_size=5)
    return _run(base, _padded(pairs, PAD, padding_side))


VARIANTS = [
    ("shared", collate_shared, {}, "segments"),
    ("shared-dense", collate_shared, {}, "dense"),
    ("shared-rows-right", collate_shared, {"pairs_per_row": 1}, "segments"),
    ("shared-rows-left", collate_shared, {"pairs_per_row": 1, "padding_side": "left"}, "segments"),
    ("shared-2-per-row-dense", collate_shared, {"pairs_per_row": 3}, "dense"),
    ("packed", collate_packed, {}, "segments"),
    ("packed-rows-left", collate_packed, {"pairs_per_row": 2, "padding_side": "left"}, "segments"),
    ("packed-dense", collate_packed, {}, "dense"),
]


@pytest.mark.parametrize("tie", [True, False])
def test_llama_variants_match_padded(tie):
    model = _llama(tie)
    pairs = _pairs()
    ref = _reference(model, pairs)
    ref_left = _reference(model, pairs, "left")
    _assert_same(ref_left, ref)  # the baseline itself is padding-side invariant
    for name, collate, kw, attention in VARIANTS:
        shared = SharedPrefixLogpsModel(copy.deepcopy(model), chunk_size=5, attention=attention)
        batch = collate(pairs, PAD, **kw)
        try:
            _assert_same(_run(shared, shared_model_inputs(batch)), ref)
        except AssertionError as err:
            raise AssertionError(f"variant {name}: {err}") from None


def test_qwen2_bias_and_gradient_checkpointing():
    model = _qwen2()
    pairs = _pairs(seed=3)
    ref = _reference(model, pairs)
    shared = SharedPrefixLogpsModel(copy.deepcopy(model), chunk_size=5)
    _assert_same(_run(shared, shared_model_inputs(collate_shared(pairs, PAD))), ref)
    # gradient checkpointing recomputes the layers in backward: the plan must travel with them
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    shared = SharedPrefixLogpsModel(ckpt, chunk_size=5)
    _assert_same(_run(shared, shared_model_inputs(collate_shared(pairs, PAD))), ref)


def test_lora_policy_and_adapter_off():
    peft = pytest.importorskip("peft")
    model = _llama(tie=False)
    pairs = _pairs(seed=7)
    lora_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base = peft.get_peft_model(copy.deepcopy(model), lora_cfg)
    for name, p in base.named_parameters():  # non-zero adapters, so the LoRA path matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    shared_peft = copy.deepcopy(base)
    ref = _run(SequenceLogpsModel(base, chunk_size=5), _padded(pairs, PAD))
    shared = SharedPrefixLogpsModel(shared_peft, chunk_size=5)
    _assert_same(_run(shared, shared_model_inputs(collate_shared(pairs, PAD))), ref)
    with torch.no_grad(), shared.model.disable_adapter():
        off = shared(**shared_model_inputs(collate_shared(pairs, PAD)))[0]
        ref_off = SequenceLogpsModel(model)(**_padded(pairs, PAD))[0]
    torch.testing.assert_close(off, ref_off, atol=1e-5, rtol=1e-5)


def test_switched_model_still_exact_for_padded_batches():
    """After the switch, ordinary (padded, masked) calls behave exactly as SDPA."""
    model = _llama()
    pairs = _pairs(seed=5)
    ref = _reference(model, pairs, "left")
    shared = SharedPrefixLogpsModel(model)
    assert model.config._attn_implementation == "preftune_segments"
    _assert_same(
        _run(SequenceLogpsModel(shared.model, chunk_size=5), _padded(pairs, PAD, "left")), ref
    )
    with torch.no_grad():  # generation-style call with a padding mask
        inputs = _padded(pairs, PAD, "left")
        a = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        b = _llama()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)


def test_forward_shared_pairs_splits_chosen_first():
    model = _llama()
    pairs = _pairs()
    batch = collate_shared(pairs, PAD)
    out = forward_shared_pairs(SharedPrefixLogpsModel(model), batch)
    ref = split_pairs(*SequenceLogpsModel(_llama())(**_padded(pairs, PAD)))
    torch.testing.assert_close(out.chosen_logps, ref.chosen_logps.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.rejected_logps, ref.rejected_logps.detach(), atol=1e-5, rtol=1e-5
    )
    assert out.chosen_tokens.tolist() == [5, 1, 4, 6]
    assert out.rejected_tokens.tolist() == [3, 9, 1, 2]


def test_collate_shared_layout():
    pairs = [
        {
            "prompt_ids": [5, 6],
            "chosen_ids": [7, 8],
            "rejected_ids": [9],
            "weight": 0.5,
            "index": 3,
        },
        {"prompt_ids": [], "chosen_ids": [4, 5], "rejected_ids": [6, 7], "weight": 1.0, "index": 4},
    ]
    b = collate_shared(pairs, PAD)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 5, 6, 7]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 0, 1]]
    assert b["segments"].tolist() == [[0, 0, 2, 2, 1], [0, 5, 0, 2, 2]]
    # pair 0: chosen 7 <- pos 1, 8 <- pos 2; rejected 9 <- pos 1 (the prompt's last state)
    # pair 1 (empty prompt): the first token of each response is not scored
    assert b["score_index"].tolist() == [1, 2, 1, 5, 7]
    assert b["score_labels"].tolist() == [7, 8, 9, 5, 7]
    assert b["score_seq"].tolist() == [0, 0, 2, 1, 3]
    assert b["n_tokens"].tolist() == [2, 1, 1, 1]
    assert b["weights"].tolist() == [0.5, 1.0] and b["index"].tolist() == [3, 4]
    left = collate_shared(pairs, PAD, pairs_per_row=1, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 4, 5, 6, 7]]
    assert left["segments"].tolist() == [[0, 0, 2, 2, 1], [1, 1, 0, 2, 2]]
    # row 1 starts at flat index 5 and holds one pad on the left
    assert left["score_index"].tolist() == [1, 2, 1, 5 + 1 + 0, 5 + 1 + 2]


def test_refuses_unroutable_models():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=50.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="soft-capping"):
        SharedPrefixLogpsModel(Gemma2ForCausalLM(cfg))
    with pytest.raises(ValueError, match="attention must be one of"):
        SharedPrefixLogpsModel(_llama(), attention="flex")
