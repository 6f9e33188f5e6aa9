"""Architecture facts of a Hugging Face causal LM, read once from the model object.

Everything the rest of preftune needs to know about *which* model it trains lives here, so no other module
reads ``config.model_type`` or guesses attribute names:

- :func:`find_decoder`: the decoder stack that returns the last hidden states (``base_model_prefix`` first,
  then transformers' own ``get_decoder()``: Llama 4 keeps its decoder under a name the prefix does not give).
- :func:`split_lm_head`: the LM head as ``weight``/``bias`` plus the logit transform the model applies after
  it (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, Gemma 2/3's final soft-cap). Whether this
  split reproduces the model's logits is *proven* at setup by :mod:`preftune.model.probe`, not assumed.
- :func:`decoder_layer_classes`: the repeated block (FSDP units, gradient checkpointing).
- :func:`router_aux`: the MoE load-balancing term the model adds to its loss when
  ``output_router_logits`` is on, reproduced from the decoder's router logits.
- :func:`sharing_refusal`: config facts a tiny probe forward cannot show (chunked attention, position-scaled
  queries), which rule out the shared-prompt layout.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "LMHead",
    "RouterAux",
    "accepts_kwarg",
    "decoder_layer_classes",
    "find_decoder",
    "lora_exclusions",
    "router_aux",
    "sharing_refusal",
    "split_lm_head",
    "unwrap_causal_lm",
]


@dataclass
class LMHead:
    """``logits = (h @ weight.T + bias) * logit_scale``, then ``c * tanh(logits / c)`` with a soft-cap ``c``."""

    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]
    logit_scale: float
    logit_softcap: float | None


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_decoder(model: nn.Module) -> nn.Module | None:
    """The module that maps ``input_ids`` to ``last_hidden_state`` (None when there is none to find)."""
    lm = unwrap_causal_lm(model)
    # base_model_prefix names the decoder attribute for most families; Llama 4's text model declares
    # "language_model" but keeps its decoder under "model", the name most families use.
    for name in (getattr(lm, "base_model_prefix", "") or "", "model"):
        decoder = getattr(lm, name, None) if name else None
        if isinstance(decoder, nn.Module) and decoder is not lm:
            return decoder
    get_decoder = getattr(lm, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, ValueError, NotImplementedError):
            return None
        if isinstance(decoder, nn.Module) and decoder is not lm:
            return decoder
    return None


def split_lm_head(model: nn.Module) -> LMHead | None:
    """The LM head's weight/bias and logit transform, or None when the head is not a plain projection."""
    lm = unwrap_causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    # type(), not isinstance(): a PEFT LoRA layer on the head is not a plain projection.
    if type(head) is not nn.Linear or find_decoder(lm) is None:
        return None
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere multiplies the logits
        scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite divides them
        scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return LMHead(head.weight, head.bias, scale, None if softcap is None else float(softcap))


def decoder_layer_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """Classes of the repeated decoder blocks (the model's ``_no_split_modules``), as found in the model."""
    lm = unwrap_causal_lm(model)
    names = set(getattr(lm, "_no_split_modules", None) or ())
    found: dict[str, type[nn.Module]] = {}
    for module in lm.modules():
        if type(module).__name__ in names:
            found.setdefault(type(module).__name__, type(module))
    return tuple(found.values())


def lora_exclusions(model: nn.Module) -> list[str]:
    """Linear layers peft's ``all-linear`` must skip: subclasses of ``nn.Linear`` whose forward does not
    return one tensor (Llama 4's router returns a tuple, which a LoRA layer cannot add to). Found by
    calling each subclass once on a zero row; plain ``nn.Linear`` layers (and Falcon's tensor-returning
    subclass) stay targets."""
    lm = unwrap_causal_lm(model)
    skip = []
    with torch.no_grad():
        for name, module in lm.named_modules():
            if not isinstance(module, nn.Linear) or type(module) is nn.Linear:
                continue
            w = module.weight
            try:
                out = module(torch.zeros(1, module.in_features, dtype=w.dtype, device=w.device))
            except (RuntimeError, TypeError, ValueError):
                out = None
            if not isinstance(out, Tensor):
                skip.append(name)
    return skip


def accepts_kwarg(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes ``name`` (or ``**kwargs``)."""
    params = inspect.signature(module.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@dataclass
class RouterAux:
    """The MoE auxiliary loss as the model's own ``forward`` adds it: ``coef * fn(router_logits, E, k, mask)``."""

    fn: Callable[..., Tensor]
    num_experts: int
    top_k: int
    coef: float

    def __call__(self, router_logits, attention_mask: Tensor | None) -> Tensor:
        return self.coef * self.fn(router_logits, self.num_experts, self.top_k, attention_mask)


def router_aux(model: nn.Module) -> RouterAux | None:
    """The router load-balancing term when the config asks for it (``output_router_logits``), else None.

    The function is the model family's own ``load_balancing_loss_func``; experts and top-k are read from the
    same attributes its ``*ForCausalLM.forward`` uses, so the term is the one ``model(...).aux_loss`` gives.
    """
    lm = unwrap_causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None or not getattr(config, "output_router_logits", False):
        return None
    fn = getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)
    num_experts = _first_attr(lm, config, ("num_experts", "num_local_experts", "n_routed_experts"))
    top_k = _first_attr(lm, config, ("num_experts_per_tok", "top_k", "moe_topk"))
    coef = getattr(config, "router_aux_loss_coef", None)
    if fn is None or num_experts is None or top_k is None or coef is None:
        return None
    return RouterAux(fn, int(num_experts), int(top_k), float(coef))


def _first_attr(lm: nn.Module, config, names: tuple[str, ...]):
    for obj in (lm, config):
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


# Config attributes whose effect depends on absolute positions or on masks the shared layout does not
# build; a short probe forward cannot show them, so they rule sharing out by name.
_UNSHAREABLE_CONFIG = {
    "attention_chunk_size": "chunked local attention (attention_chunk_size)",
    "attn_temperature_tuning": "query temperature tuning by absolute position",
}


def sharing_refusal(model: nn.Module) -> str | None:
    """Why the shared-prompt layout cannot be exact for this model by its config alone (None: no reason)."""
    lm = unwrap_causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None:
        return "it has no config"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    for key, what in _UNSHAREABLE_CONFIG.items():
        if getattr(config, key, None):
            return f"{what} is not reproduced by per-segment attention"
    if find_decoder(lm) is None:
        return "no decoder module found (base_model_prefix / get_decoder)"
    if not callable(getattr(lm, "set_attn_implementation", None)):
        return "it has no set_attn_implementation()"
    can_set = getattr(lm, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():  # asking would only log transformers' warning
        return "it does not route attention through transformers' AttentionInterface"
    return None
