"""Per-segment attention is exact: the shared-prompt layout's log-probs and gradients equal the padded layout.

(The architecture matrix in ``test_architectures.py`` repeats the value check on every common family; this
file covers the layout variants, gradient checkpointing, LoRA, and the switched model's ordinary calls.)
"""

from __future__ import annotations

import copy

import pytest
import torch

from preftune.model import PaddedLogps, SharedPromptLogps, collate_padded, collate_shared
from preftune.model.attention import ATTENTION_PREFIX, prepare_shared, restore_attention
from preftune.model.forward import split_pairs

VOCAB = 50
PAD = 0


def _padded(examples, pad_token_id, padding_side="right"):
    """Reference two-row layout: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected."""
    return collate_padded(examples, pad_token_id, padding_side=padding_side).model_inputs()


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
    logps, n, *_ = module(**inputs)
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
    base = PaddedLogps(copy.deepcopy(model), chunk_size=5)
    return _run(base, _padded(pairs, PAD, padding_side))


def _shared(model, chunk_size=5):
    prepare_shared(model)
    return SharedPromptLogps(model, chunk_size=chunk_size, attention_layers=2)


VARIANTS = [
    ("one-row", {}),
    ("row-per-pair-right", {"pairs_per_row": 1}),
    ("row-per-pair-left", {"pairs_per_row": 1, "padding_side": "left"}),
    ("three-per-row-left", {"pairs_per_row": 3, "padding_side": "left"}),
]


@pytest.mark.parametrize("tie", [True, False])
def test_llama_variants_match_padded(tie):
    model = _llama(tie)
    pairs = _pairs()
    ref = _reference(model, pairs)
    ref_left = _reference(model, pairs, "left")
    _assert_same(ref_left, ref)  # the baseline itself is padding-side invariant
    for name, kw in VARIANTS:
        shared = _shared(copy.deepcopy(model))
        batch = collate_shared(pairs, PAD, **kw)
        try:
            _assert_same(_run(shared, batch.model_inputs()), ref)
        except AssertionError as err:
            raise AssertionError(f"variant {name}: {err}") from None


def test_qwen2_bias_and_gradient_checkpointing():
    model = _qwen2()
    pairs = _pairs(seed=3)
    ref = _reference(model, pairs)
    shared = _shared(copy.deepcopy(model))
    _assert_same(_run(shared, collate_shared(pairs, PAD).model_inputs()), ref)
    # gradient checkpointing recomputes the layers in backward: the plan must travel with them
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    shared = _shared(ckpt)
    _assert_same(_run(shared, collate_shared(pairs, PAD).model_inputs()), ref)


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
    ref = _run(PaddedLogps(base, chunk_size=5), _padded(pairs, PAD))
    shared = _shared(shared_peft)
    _assert_same(_run(shared, collate_shared(pairs, PAD).model_inputs()), ref)
    with torch.no_grad(), shared.model.disable_adapter():
        off = shared(**collate_shared(pairs, PAD).model_inputs())[0]
        ref_off = PaddedLogps(model, chunk_size=5)(**_padded(pairs, PAD))[0]
    torch.testing.assert_close(off, ref_off, atol=1e-5, rtol=1e-5)


def test_switched_model_still_exact_for_padded_batches():
    """After the switch, ordinary (padded, masked) calls behave exactly as SDPA."""
    model = _llama()
    pairs = _pairs(seed=5)
    ref = _reference(model, pairs, "left")
    shared = _shared(model)
    assert model.config._attn_implementation == ATTENTION_PREFIX
    _assert_same(_run(PaddedLogps(shared.model, chunk_size=5), _padded(pairs, PAD, "left")), ref)
    with torch.no_grad():  # generation-style call with a padding mask
        inputs = _padded(pairs, PAD, "left")
        a = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        b = _llama()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)


def test_shared_output_splits_chosen_first():
    model = _llama()
    pairs = _pairs()
    out = split_pairs(*_shared(model)(**collate_shared(pairs, PAD).model_inputs()))
    ref = split_pairs(*PaddedLogps(_llama(), chunk_size=5)(**_padded(pairs, PAD)))
    torch.testing.assert_close(out.chosen_logps, ref.chosen_logps.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.rejected_logps, ref.rejected_logps.detach(), atol=1e-5, rtol=1e-5
    )
    assert out.chosen_tokens.tolist() == [5, 1, 4, 6]
    assert out.rejected_tokens.tolist() == [3, 9, 1, 2]
    assert out.aux_loss is None


def test_restore_attention_undoes_the_switch():
    model = _llama()
    prepare_shared(model)
    assert model.config._attn_implementation == ATTENTION_PREFIX
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_a_layer_that_does_not_route_is_caught():
    """A decoder layer that drops the plan (as StableLM's drops **kwargs) must not pass silently."""
    model = _llama()
    shared = SharedPromptLogps(model, chunk_size=5, attention_layers=3)  # more than route
    prepare_shared(model)
    with pytest.raises(RuntimeError, match="only 2 of 3 attention layers"):
        shared(**collate_shared(_pairs(), PAD).model_inputs())


@pytest.mark.parametrize("arch", ["llama", "mistral_window", "gemma2_softcap"])
def test_flex_kernel_equals_the_padded_layout(arch):
    """The fused FlexAttention path (chosen on CUDA) gives the padded layout's log-probs. FlexAttention runs
    unfused on a CPU but has no CPU backward: gradients are checked by the GPU subset
    (tests/test_gpu.py). Mistral with a 4-token window and Gemma 2's attention soft-cap exercise the mask
    and the score_mod."""
    import warnings

    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(0)
    if arch == "llama":
        model = _llama()
    elif arch == "mistral_window":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=4)).float().eval()
    else:
        cfg = Gemma2Config(**common, head_dim=8, attn_logit_softcapping=1.0, sliding_window=4)
        model = Gemma2ForCausalLM(cfg).float().eval()
    model.config._attn_implementation = model.config._attn_implementation or "eager"
    pairs = _pairs(seed=9)
    ref = _reference(model, pairs)
    flexed = copy.deepcopy(model)
    prepare_shared(flexed)
    module = SharedPromptLogps(flexed, chunk_size=5, attention_layers=2, kernel="flex")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        logps, n, *_ = module(**collate_shared(pairs, PAD, pairs_per_row=2).model_inputs())
    torch.testing.assert_close(logps, ref[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(n, ref[1])
