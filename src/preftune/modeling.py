"""Model glue: load a local Hugging Face causal LM and turn a batch of pairs into response log-probs.

The LM head is split off the model so that only response positions are projected, in chunks
(:func:`preftune.logprobs.chunked_sequence_logps`); models whose head cannot be split (an unknown logit
transform, a non-linear head) fall back to full logits and :func:`preftune.logprobs.sequence_logps`.

:class:`SequenceLogpsModel` does the whole computation inside ``forward`` so that DDP and FSDP2 wrappers
see every parameter use (FSDP2 must unshard the tied embedding/LM-head weight around it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from preftune.logprobs import chunked_sequence_logps, sequence_logps

__all__ = [
    "LMHead",
    "SequenceLogps",
    "SequenceLogpsModel",
    "batch_chosen_tokens",
    "batch_num_pairs",
    "compile_blocks",
    "disable_dropout",
    "forward_pairs",
    "load_model",
    "logps_module",
    "resolve_device",
    "split_lm_head",
    "unwrap_causal_lm",
]

log = logging.getLogger(__name__)

# Config attributes that change the logits after the LM head, and how we reproduce them.
_KNOWN_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# Model types whose forward applies a logit transform we do not reproduce.
_UNSUPPORTED_HEAD_TYPES = ("mamba", "whisper")


@dataclass
class LMHead:
    weight: Tensor
    bias: Tensor | None
    logit_scale: float
    logit_softcap: float | None


@dataclass
class SequenceLogps:
    """Per-pair response log-prob sums and token counts of one batch."""

    chosen_logps: Tensor  # [B]
    rejected_logps: Tensor  # [B]
    chosen_tokens: Tensor  # [B]
    rejected_tokens: Tensor  # [B]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def split_lm_head(model: nn.Module) -> LMHead | None:
    """The LM head's weight/bias and logit transform, or None when it cannot be reproduced exactly."""
    lm = unwrap_causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "model_type", "") in _UNSUPPORTED_HEAD_TYPES:
        return None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    # type(), not isinstance(): a PEFT LoRA layer on the head is not a plain projection.
    if type(head) is not nn.Linear or not hasattr(lm, getattr(lm, "base_model_prefix", "")):
        return None
    scale = 1.0
    softcap = None
    if getattr(config, "logit_scale", None) is not None:  # Cohere multiplies the logits
        scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite divides them
        scale = 1.0 / float(config.logits_scaling)
    if getattr(config, "final_logit_softcapping", None) is not None:  # Gemma 2/3
        softcap = float(config.final_logit_softcapping)
    return LMHead(head.weight, head.bias, scale, softcap)


def _zero_dropout_config(config) -> None:
    for key, value in list(vars(config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability: DPO compares log-probs of two policies, noise only blurs them.

    Modules that copied a probability from the config at construction (e.g. attention_dropout) are only
    reached through the config before construction, which :func:`load_model` does.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(unwrap_causal_lm(model), "config", None)
    if config is not None:
        _zero_dropout_config(config)


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` the MLP and RMSNorm modules of every decoder layer, in place; returns how many.

    Attention is left alone: the prefix-shared layout passes its segment plan as Python data, which would
    make a compiled attention recompile per batch. Measured on the 2-core CPU (SmolLM-135M shape, prompt-heavy,
    2 pairs): no step-time gain and ~20 s of compilation, hence opt-in.
    """
    count = 0
    for name, module in unwrap_causal_lm(model).named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("mlp", "input_layernorm", "post_attention_layernorm"):
            module.compile(dynamic=True)
            count += 1
    return count


def load_model(
    path: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "sdpa",
    dropout: bool = False,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a causal LM from a local folder in fp32 master weights (bf16 is applied by autocast)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {path} has no config.json (a local Hugging Face model folder)"
        )
    config = AutoConfig.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )
    if not dropout:
        _zero_dropout_config(config)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    if not dropout:
        disable_dropout(model)
    model.config.use_cache = False
    return model.to(device)


class SequenceLogpsModel(nn.Module):
    """forward(batch tensors) -> per-row response log-prob sums [R] and token counts [R].

    Rows are whatever the collator produced (2B rows: chosen first, then rejected).
    """

    shared_layout = (
        False  # rows are padded [prompt|response] sequences (preftune.data.collate_pairs)
    )

    def __init__(self, model: nn.Module, *, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.uses_chunked_head = split_lm_head(model) is not None
        if not self.uses_chunked_head:
            log.warning(
                "LM head of %s cannot be split off: using full logits (more memory)",
                type(unwrap_causal_lm(model)).__name__,
            )

    def forward(
        self,
        input_ids: Tensor,  # [R, T]
        attention_mask: Tensor | None,  # [R, T]
        position_ids: Tensor | None,  # [R, T]
        completion_mask: Tensor,  # [R, T]
    ) -> tuple[Tensor, Tensor]:
        lm = unwrap_causal_lm(self.model)
        if not self.uses_chunked_head:
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            ).logits
            return sequence_logps(logits, input_ids, completion_mask)
        decoder = getattr(lm, lm.base_model_prefix)
        hidden = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # [R, T, H]
        head = split_lm_head(self.model)
        assert head is not None
        return chunked_sequence_logps(
            hidden,
            head.weight,
            input_ids,
            completion_mask,
            lm_head_bias=head.bias,
            logit_scale=head.logit_scale,
            logit_softcap=head.logit_softcap,
            chunk_size=self.chunk_size,
        )


def _model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor | None]:
    if "segments" in batch:  # prefix-shared / packed layout (preftune.sharing)
        from preftune.sharing import shared_model_inputs

        return shared_model_inputs(batch)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch.get("attention_mask"),
        "position_ids": batch.get("position_ids"),
        "completion_mask": batch["completion_mask"],
    }


def split_pairs(logps: Tensor, n_tokens: Tensor) -> SequenceLogps:
    b = logps.shape[0] // 2
    return SequenceLogps(logps[:b], logps[b:], n_tokens[:b], n_tokens[b:])


def forward_pairs(module: nn.Module, batch: dict[str, Tensor]) -> SequenceLogps:
    """Call ``module`` (a log-prob module for the batch's layout, or a DDP/FSDP wrapper of one) and split."""
    return split_pairs(*module(**_model_inputs(batch)))


def logps_module(
    model: nn.Module, *, chunk_size: int, prefix_sharing: bool | None = False
) -> nn.Module:
    """The log-prob module for a layout: padded two rows per pair, or the prompt computed once per pair.

    ``prefix_sharing=None`` shares the prompt when the model's attention can be routed per segment and
    falls back to padded rows (saying why) when it cannot; ``True`` raises instead of falling back. Both
    layouts give the same log-probs; ``.shared_layout`` tells the collator which one to build.
    """
    if prefix_sharing is False:
        return SequenceLogpsModel(model, chunk_size=chunk_size)
    from preftune.sharing import SharedPrefixLogpsModel

    try:
        return SharedPrefixLogpsModel(model, chunk_size=chunk_size)
    except ValueError as e:
        if prefix_sharing:
            raise
        log.info("prefix sharing off for this model (%s); using padded rows", e)
        return SequenceLogpsModel(model, chunk_size=chunk_size)


def batch_num_pairs(batch: dict[str, Tensor]) -> int:
    return batch["weights"].shape[0]


def batch_chosen_tokens(batch: dict[str, Tensor]) -> int:
    """Scored chosen tokens of a collated batch, whatever its layout (host-side, no device sync)."""
    b = batch_num_pairs(batch)
    if "n_tokens" in batch:
        return int(batch["n_tokens"][:b].sum())
    return int(batch["completion_mask"][:b, 1:].sum())
