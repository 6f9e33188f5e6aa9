"""Tiny random-init configs for many Hugging Face causal-LM architectures (nothing is downloaded).

``ARCHS`` maps a name (the ``model_type``, except ``"llama4"`` whose text-only config is
``llama4_text``) to a builder that returns a *fresh* config every call; ``build_tiny(name)`` turns it
into an fp32 ``AutoModelForCausalLM`` under ``torch.manual_seed(seed)``. ``UNBUILDABLE`` lists the
archs the installed transformers cannot build tiny here, with the reason (empty when all build).

Shared shape of every config: ``vocab_size=64`` (token ids 0..63; pad 0, bos 1, eos 2), hidden size
32, 2 layers, 4 query heads over 2 key/value heads (GQA) where the arch has GQA,
``max_position_embeddings=256`` (bloom has no positions: ALiBi).

On purpose, so that tests exercise the hard parts:

* per-layer patterns show up within the 2 layers: sliding + full attention (gemma2, gemma3_text,
  qwen2, gpt_oss), chunked + NoPE full (llama4), dense + MoE (deepseek_v3, qwen2_moe, llama4);
* sliding windows / attention chunks are 8 tokens, so ~30-token sequences reach past them
  (mistral, qwen2, gemma2, gemma3_text, starcoder2, gpt_oss; llama4 chunks);
* MoE configs use 4 experts, top-2 (llama4: top-1 + shared expert, as upstream) and
  ``output_router_logits=False`` (tests flip it);
* every dropout-like probability is NONZERO (dropouts 0.1, mixtral router jitter 0.1, OPT
  layerdrop 0.1): the training code must switch all stochastic parts off itself;
* logit transforms are strong enough to matter numerically: gemma2 final/attention soft-capping
  (with ``initializer_range=0.1`` so that attention scores reach the cap), cohere ``logit_scale``,
  granite ``logits_scaling`` (and its other multipliers), gpt_oss sinks, llama4
  attention-temperature tuning (``floor_scale=4``, ``attn_scale=1.0``).

``build_tiny(name, seed=0, attn_implementation=None)`` passes ``attn_implementation`` through to
``from_config`` when given (``"sdpa"`` is refused by gemma2, gpt_oss and bloom; left ``None``,
transformers picks sdpa where supported and eager otherwise). The model comes back in train mode.

Quirks worth knowing (transformers 5.24): ``Llama4ForCausalLM.get_decoder()`` returns the model
itself (its ``base_model_prefix`` is ``"language_model"`` but the decoder lives at ``.model``);
``OPTForCausalLM.get_decoder()`` is ``model.model.decoder``; falcon and bloom do not route attention
through ``AttentionInterface``; stablelm's decoder layer drops extra ``**kwargs`` before attention.
"""

from __future__ import annotations

from collections.abc import Callable

import transformers as tf

__all__ = ["ARCHS", "UNBUILDABLE", "build_tiny"]

V, H, L, NH, KV, HD, FF, POS, WIN = 64, 32, 2, 4, 2, 8, 64, 256, 8
P = 0.1  # every dropout-like probability
TOK = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# the Llama-style core most configs share
CORE = {
    "vocab_size": V,
    "hidden_size": H,
    "intermediate_size": FF,
    "num_hidden_layers": L,
    "num_attention_heads": NH,
    "num_key_value_heads": KV,
    "max_position_embeddings": POS,
    **TOK,
}
MOE = {"num_experts_per_tok": 2, "output_router_logits": False}


def _llama():
    return tf.LlamaConfig(**CORE, attention_dropout=P)


def _mistral():
    return tf.MistralConfig(**CORE, sliding_window=WIN, attention_dropout=P)


def _mixtral():
    return tf.MixtralConfig(
        **CORE, **MOE, num_local_experts=4, attention_dropout=P, router_jitter_noise=P
    )


def _qwen2():  # layer 0 full, layer 1 sliding
    return tf.Qwen2Config(
        **CORE,
        use_sliding_window=True,
        sliding_window=WIN,
        max_window_layers=1,
        attention_dropout=P,
    )


def _qwen2_moe():  # layer 0 dense MLP, layer 1 MoE (+ shared expert)
    return tf.Qwen2MoeConfig(
        **CORE,
        **MOE,
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[0],
        attention_dropout=P,
    )


def _qwen3():
    return tf.Qwen3Config(**CORE, head_dim=HD, attention_dropout=P)


def _qwen3_moe():
    return tf.Qwen3MoeConfig(
        **CORE, **MOE, num_experts=4, moe_intermediate_size=32, head_dim=HD, attention_dropout=P
    )


def _gemma():
    return tf.GemmaConfig(**CORE, head_dim=HD, attention_dropout=P)


def _gemma2():  # layer 0 sliding, layer 1 full; larger init so that both soft-caps bite
    return tf.Gemma2Config(
        **CORE,
        head_dim=HD,
        query_pre_attn_scalar=HD,
        sliding_window=WIN,
        initializer_range=0.1,
        final_logit_softcapping=2.0,
        attn_logit_softcapping=1.0,
        attention_dropout=P,
    )


def _gemma3_text():  # layer 0 sliding (local rope), layer 1 full (global rope)
    return tf.Gemma3TextConfig(
        **CORE,
        head_dim=HD,
        query_pre_attn_scalar=HD,
        sliding_window=WIN,
        layer_types=["sliding_attention", "full_attention"],
        attention_dropout=P,
    )


def _phi():  # partial rotary (half of each head)
    return tf.PhiConfig(
        **CORE,
        partial_rotary_factor=0.5,
        resid_pdrop=P,
        embd_pdrop=P,
        attention_dropout=P,
    )


def _phi3():
    return tf.Phi3Config(
        **CORE,
        resid_pdrop=P,
        embd_pdrop=P,
        attention_dropout=P,
        original_max_position_embeddings=POS,
    )


def _gpt2():
    return tf.GPT2Config(
        vocab_size=V,
        n_embd=H,
        n_layer=L,
        n_head=NH,
        n_positions=POS,
        resid_pdrop=P,
        embd_pdrop=P,
        attn_pdrop=P,
        **TOK,
    )


def _gpt_neox():
    c = {k: v for k, v in CORE.items() if k != "num_key_value_heads"}
    return tf.GPTNeoXConfig(**c, attention_dropout=P, hidden_dropout=P)


def _gptj():
    return tf.GPTJConfig(
        vocab_size=V,
        n_embd=H,
        n_layer=L,
        n_head=NH,
        n_positions=POS,
        rotary_dim=4,
        resid_pdrop=P,
        embd_pdrop=P,
        attn_pdrop=P,
        **TOK,
    )


def _opt():
    return tf.OPTConfig(
        vocab_size=V,
        hidden_size=H,
        ffn_dim=FF,
        num_hidden_layers=L,
        num_attention_heads=NH,
        max_position_embeddings=POS,
        dropout=P,
        attention_dropout=P,
        layerdrop=P,
        **TOK,
    )


def _falcon():  # new decoder architecture: GQA, parallel attention, rotary
    return tf.FalconConfig(
        vocab_size=V,
        hidden_size=H,
        num_hidden_layers=L,
        num_attention_heads=NH,
        num_kv_heads=KV,
        new_decoder_architecture=True,
        ffn_hidden_size=FF,
        max_position_embeddings=POS,
        hidden_dropout=P,
        attention_dropout=P,
        **TOK,
    )


def _bloom():  # ALiBi, no position embeddings
    return tf.BloomConfig(
        vocab_size=V,
        hidden_size=H,
        n_layer=L,
        n_head=NH,
        hidden_dropout=P,
        attention_dropout=P,
        **TOK,
    )


def _stablelm():
    return tf.StableLmConfig(
        **CORE, partial_rotary_factor=0.5, hidden_dropout=P, attention_dropout=P, qk_layernorm=True
    )


def _starcoder2():
    return tf.Starcoder2Config(
        **CORE,
        sliding_window=WIN,
        attention_dropout=P,
        residual_dropout=P,
        embedding_dropout=P,
    )


def _olmo():
    return tf.OlmoConfig(**CORE, attention_dropout=P, clip_qkv=8.0)


def _olmo2():
    return tf.Olmo2Config(**CORE, attention_dropout=P)


def _granite():
    return tf.GraniteConfig(
        **CORE,
        attention_dropout=P,
        embedding_multiplier=4.0,
        residual_multiplier=0.5,
        attention_multiplier=0.25,
        logits_scaling=4.0,
    )


def _cohere():  # logit_scale=0.0625 (default) multiplies the logits
    return tf.CohereConfig(**CORE, logit_scale=0.0625, use_qk_norm=True, attention_dropout=P)


def _glm():  # partial rotary (half), interleaved
    return tf.GlmConfig(**CORE, head_dim=HD, attention_dropout=P)


def _smollm3():  # layer 0 rope, layer 1 NoPE
    return tf.SmolLM3Config(**CORE, no_rope_layer_interval=2, attention_dropout=P)


def _gpt_oss():  # layer 0 sliding, layer 1 full; attention sinks; yarn rope
    return tf.GptOssConfig(
        **CORE,
        **MOE,
        num_local_experts=4,
        head_dim=HD,
        sliding_window=WIN,
        attention_dropout=P,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 64,
        },
    )


def _deepseek_v3():  # MLA (no GQA); layer 0 dense, layer 1 MoE (4 routed in 2 groups + 1 shared)
    return tf.DeepseekV3Config(
        **{**CORE, "num_key_value_heads": NH},
        **MOE,
        n_routed_experts=4,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        attention_dropout=P,
    )


def _llama4():  # text only; layer 0 rope+chunked+dense, layer 1 NoPE+full+MoE
    return tf.Llama4TextConfig(
        **CORE,
        output_router_logits=False,
        head_dim=HD,
        intermediate_size_mlp=FF,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=2,
        attention_chunk_size=WIN,
        attn_temperature_tuning=True,
        floor_scale=4,
        attn_scale=1.0,
        attention_dropout=P,
        router_jitter_noise=P,
    )


def _granitemoe():
    return tf.GraniteMoeConfig(
        **CORE,
        **MOE,
        num_local_experts=4,
        attention_dropout=P,
        embedding_multiplier=4.0,
        residual_multiplier=0.5,
        attention_multiplier=0.25,
        logits_scaling=4.0,
    )


def _olmoe():
    return tf.OlmoeConfig(**CORE, **MOE, num_experts=4, attention_dropout=P)


ARCHS: dict[str, Callable[[], tf.PretrainedConfig]] = {
    f.__name__[1:]: f
    for f in (
        _llama,
        _mistral,
        _mixtral,
        _qwen2,
        _qwen2_moe,
        _qwen3,
        _qwen3_moe,
        _gemma,
        _gemma2,
        _gemma3_text,
        _phi,
        _phi3,
        _gpt2,
        _gpt_neox,
        _gptj,
        _opt,
        _falcon,
        _bloom,
        _stablelm,
        _starcoder2,
        _olmo,
        _olmo2,
        _granite,
        _cohere,
        _glm,
        _smollm3,
        _gpt_oss,
        _deepseek_v3,
        _llama4,
        _granitemoe,
        _olmoe,
    )
}

UNBUILDABLE: dict[str, str] = {}


def build_tiny(name: str, seed: int = 0, attn_implementation: str | None = None):
    """A fresh random-init fp32 ``AutoModelForCausalLM`` for ``ARCHS[name]``, seeded with ``seed``."""
    import torch

    if name in UNBUILDABLE:
        raise ValueError(f"{name} cannot be built here: {UNBUILDABLE[name]}")
    kwargs = {"dtype": torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(ARCHS[name](), **kwargs)
