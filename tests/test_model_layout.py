"""preftune.model.layout / probe: the layout is chosen once, before training, by proof on the model —
never a crash at step N, never a silent loss of an optimisation or of a model term."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.model import ModelError, PaddedLayout, choose_layout
from preftune.model.probe import check_deterministic


def _llama(seed: int = 0, **over) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, attn_implementation="sdpa", **over,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


class _ScaledLogits(LlamaForCausalLM):
    """A model whose forward transforms the logits in a way no config attribute announces (as custom
    ``trust_remote_code`` models do): the split LM head would silently drop the transform."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


def test_llama_gets_the_shared_prompt_and_says_so(caplog):
    model = _llama()
    with caplog.at_level(logging.INFO, logger="preftune"):
        layout = choose_layout(model, pad_token_id=0, chunk_size=8)
    assert layout.name == "shared_prompt" and layout.chunked_head
    assert layout.facts() == {
        "name": "shared_prompt",
        "chunked_head": True,
        "extras": [],
        "notes": [],
    }
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("preftune")]
    assert lines == ["layout: shared prompt layout, chunked LM head"]


def test_prefix_sharing_false_keeps_padded_rows_and_the_models_attention():
    model = _llama()
    layout = choose_layout(model, pad_token_id=0, chunk_size=8, prefix_sharing=False)
    assert isinstance(layout, PaddedLayout) and layout.chunked_head
    assert model.config._attn_implementation == "sdpa"
    assert "train.prefix_sharing=false" in layout.describe()


def test_a_model_that_cannot_share_falls_back_before_training_with_the_reason():
    model = _llama(attention_chunk_size=4)  # chunked local attention lives in the mask only
    layout = choose_layout(model, pad_token_id=0, chunk_size=8)
    assert layout.name == "padded"
    assert "attention_chunk_size" in layout.describe()
    assert model.config._attn_implementation == "sdpa"  # switched back


def test_required_sharing_on_a_model_that_cannot_is_a_model_error_naming_it():
    with pytest.raises(ModelError, match=r"prefix_sharing: true, but LlamaForCausalLM cannot"):
        choose_layout(
            _llama(attention_chunk_size=4), pad_token_id=0, chunk_size=8, prefix_sharing=True
        )


def test_an_unannounced_logit_transform_falls_back_to_full_logits():
    """The probe compares the split head with the model's own logits, so nothing is assumed by name."""
    cfg = _llama().config
    torch.manual_seed(0)
    model = _ScaledLogits(cfg)
    layout = choose_layout(model, pad_token_id=0, chunk_size=8)
    assert layout.name == "padded" and not layout.chunked_head
    assert "split LM head differs" in layout.describe()
    # ... and the fallback is exact: full logits through the model's own forward
    batch = layout.collate(
        [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10], "index": 0}]
    )
    out = layout.logps(layout.module(model), batch)
    logits = model(input_ids=batch.input_ids[:1, :5]).logits
    expected = torch.log_softmax(logits[0, 2:4], -1)[[0, 1], [8, 9]].sum()
    torch.testing.assert_close(out.chosen_logps[0], expected, rtol=1e-5, atol=1e-5)


def test_a_model_still_random_in_training_is_refused():
    """Noise added in training mode by a module (NEFTune-style embedding noise) is not dropout by name."""
    model = _llama()

    def noisy(module, args, output):
        return output + 0.01 * torch.randn_like(output) if module.training else output

    model.model.embed_tokens.register_forward_hook(noisy)
    with pytest.raises(ModelError, match="still random in training mode"):
        choose_layout(model, pad_token_id=0, chunk_size=8)
    # the check leaves the caller's random stream alone
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    with pytest.raises(ModelError):
        check_deterministic(model, chunk_size=8)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(("scale", "refused"), [(1e-7, False), (1e-3, True)])
def test_rounding_level_differences_pass_the_determinism_check(scale, refused):
    """A GEMM that rounds differently from call to call (some CPUs) moves the final hidden states by an
    ulp or so (1e-7 relative); a random draw moves them far more. Only the latter is refused."""
    model = _llama()

    def jitter(module, args, output):
        return output * (1 + scale * torch.randn_like(output)) if module.training else output

    model.model.norm.register_forward_hook(jitter)
    if refused:
        with pytest.raises(ModelError, match="still random in training mode"):
            check_deterministic(model, chunk_size=8)
    else:
        check_deterministic(model, chunk_size=8)


def test_two_models_share_only_if_both_can():
    policy, reference = _llama(seed=0), _llama(seed=1, attention_chunk_size=4)
    layout = choose_layout(policy, reference, pad_token_id=0, chunk_size=8)
    assert layout.name == "padded"
    assert policy.config._attn_implementation == "sdpa"
