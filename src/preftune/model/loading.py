"""Load a causal LM and its tokenizer from where users keep them, with every stochastic part switched off.

Where a model lives (:func:`resolve_source`): a local folder, a ``.gguf`` file (or ``gguf_file`` inside a
folder: dequantised to fp32 master weights by transformers' GGUF support, which needs the ``gguf`` package),
or a Hub id ``org/name`` (with a ``revision``) resolved by ``from_pretrained`` — offline
(``HF_HUB_OFFLINE=1``) from the local Hub cache. A path that exists is never looked up on the Hub; a Hub id
is only tried when the string looks like one and no such path exists.

Attention (``attn_implementation="auto"``): SDPA when the model class supports it, else eager (Gemma 2,
Bloom, GPT-OSS refuse SDPA in transformers 5).

Stochastic parts: DPO compares log-probs of two policies, so noise only blurs them and makes the first loss
differ from ln 2. Dropout is switched off *by value*, not by one known key: every float setting of the config
(and its sub-configs) whose name says dropout, ``pdrop``, drop-path, jitter or noise is zeroed before the
model is built (modules copy these at construction), then every dropout module and every such float
attribute of a module is zeroed after loading. The layout probe (:mod:`preftune.model.probe`) then proves it:
training-mode forwards must agree (to fp32 rounding).

Every failure to load becomes a :class:`ModelError` naming the source and the reason in one line.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from preftune.model.arch import unwrap_causal_lm

__all__ = [
    "ModelError",
    "ModelSource",
    "compile_blocks",
    "disable_dropout",
    "load_model",
    "load_tokenizer",
    "prepare_model",
    "prepare_tokenizer",
    "resolve_device",
    "resolve_source",
]

log = logging.getLogger(__name__)

_STOCHASTIC = re.compile(
    r"drop|jitter|noise", re.IGNORECASE
)  # dropout, pdrop, layerdrop, drop_path
# Files that make a folder a model (or an adapter) / a tokenizer folder; the first is named in errors.
_MARKERS = {
    "model": ("config.json", "adapter_config.json"),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded or used as configured (a usage error: exit 2)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model (or tokenizer) comes from, in the terms ``from_pretrained`` takes."""

    name_or_path: str  # a local folder or a Hub id
    revision: str | None = None
    gguf_file: str | None = None  # file name inside ``name_or_path``
    local: bool = True

    def pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"local_files_only": self.local}
        if self.revision:
            kwargs["revision"] = self.revision
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs

    def __str__(self) -> str:
        where = self.name_or_path if self.local else f"Hub id {self.name_or_path}"
        if self.gguf_file:
            where = f"{where}/{self.gguf_file}"
        return f"{where}@{self.revision}" if self.revision else where


def resolve_source(
    path: str | Path,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    setting: str = "model.path",
    kind: str = "model",
) -> ModelSource:
    """A local folder, a ``.gguf`` file, or a Hub id; anything else is a :class:`ModelError`.

    ``kind`` (``"model"`` or ``"tokenizer"``) says which files a local folder must hold.
    """
    text = str(path).strip()
    if not text:
        raise ModelError(f"{setting}: empty (a model folder, a .gguf file or a Hub id org/name)")
    local = Path(text).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelError(
                f"{setting}: {local} is a file; expected a model folder, a .gguf file or a Hub id"
            )
        if gguf_file and gguf_file != local.name:
            raise ModelError(f"{setting} names {local.name} but model.gguf_file is {gguf_file}")
        return ModelSource(str(local.parent), revision, local.name, local=True)
    if local.is_dir():
        if gguf_file:
            if not (local / gguf_file).is_file():
                raise ModelError(f"model.gguf_file: {gguf_file} not found in {local}")
        elif not any((local / name).is_file() for name in _MARKERS[kind]):
            raise ModelError(
                f"{setting}: {local} is not a Hugging Face {kind} folder (no {_MARKERS[kind][0]})"
            )
        return ModelSource(str(local), revision, gguf_file, local=True)
    if _HUB_ID.match(text) and not text.startswith(("./", "../", "~")):
        return ModelSource(text, revision, gguf_file, local=False)
    raise ModelError(
        f"{setting}: {text} not found (expected a model folder, a .gguf file or a Hub id org/name)"
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# What a broken folder raises inside transformers/safetensors/gguf: wrong or missing files, unknown
# model types, shape mismatches, truncated tensors (safetensors' own error is a plain Exception subclass).
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError)


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False):
    """The tokenizer of ``source``, with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.name_or_path, trust_remote_code=trust_remote_code, **source.pretrained_kwargs()
        )
    except _LOAD_ERRORS as e:
        raise ModelError(f"cannot load a tokenizer from {source}: {_one_line(e)}") from e
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer):
    """Give a tokenizer a pad token when it has none (EOS, else UNK); returns it."""
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out everywhere; any id works, EOS is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token else tokenizer.unk_token
    return tokenizer


def _zero_stochastic(config) -> None:
    """Zero every dropout-like float of a config and its sub-configs (before the model is built)."""
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and not isinstance(value, bool) and _STOCHASTIC.search(key):
            setattr(config, key, 0.0)
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a nested config
            _zero_stochastic(value)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout module and every dropout-like float attribute of the model and its config."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if isinstance(value, float) and _STOCHASTIC.search(key):
                setattr(module, key, 0.0)
    config = getattr(unwrap_causal_lm(model), "config", None)
    if config is not None:
        _zero_stochastic(config)


def _attn_implementation(config, requested: str | None) -> str | None:
    """``auto`` -> sdpa where the model class supports it, else eager."""
    if requested != "auto":
        return requested
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if cls is not None and not getattr(cls, "_supports_sdpa", False):
        return "eager"
    return "sdpa"


def load_model(
    source: ModelSource,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "auto",
    dropout: bool = False,
    trust_remote_code: bool = False,
    output_router_logits: bool | None = None,
) -> nn.Module:
    """A causal LM in fp32 master weights (bf16 is applied by autocast), dropout off unless asked.

    A LoRA adapter folder (``adapter_config.json``, no ``config.json``: a LoRA run's ``final/``) loads its
    base model (``base_model_name_or_path``, resolved like any model source) with the adapter merged in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    base = _adapter_base(source)
    if base is not None:
        model = load_model(
            resolve_source(base, setting=f"{source}/adapter_config.json base_model_name_or_path"),
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            dropout=dropout,
            trust_remote_code=trust_remote_code,
            output_router_logits=output_router_logits,
        )
        try:
            from peft import PeftModel
        except ImportError:
            raise ModelError(f"{source} is a LoRA adapter: pip install 'preftune[lora]'") from None
        try:
            return PeftModel.from_pretrained(model, source.name_or_path).merge_and_unload()
        except _LOAD_ERRORS as e:
            raise ModelError(f"cannot load the LoRA adapter {source}: {_one_line(e)}") from e
    kwargs = source.pretrained_kwargs()
    try:
        config = AutoConfig.from_pretrained(
            source.name_or_path, trust_remote_code=trust_remote_code, **kwargs
        )
    except _LOAD_ERRORS as e:
        raise ModelError(f"cannot load a model config from {source}: {_one_line(e)}") from e
    if not dropout:
        _zero_stochastic(config)
    if output_router_logits is not None:
        if not hasattr(config, "output_router_logits"):
            if output_router_logits:
                raise ModelError(
                    f"model.output_router_logits: {type(config).__name__} has no MoE router"
                )
        else:
            config.output_router_logits = output_router_logits
    attn = _attn_implementation(config, attn_implementation)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source.name_or_path,
            config=config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **({"attn_implementation": attn} if attn else {}),
            **kwargs,
        )
    except _LOAD_ERRORS as e:
        raise ModelError(f"cannot load a causal LM from {source}: {_one_line(e)}") from e
    # transformers initialises weights the files lack at random and only warns: a partly random model
    # (a truncated shard set, a config of another size) would train without complaint.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelError(
            f"model {source}: its weight files lack {len(missing)} tensor(s) the config needs "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); expected the complete "
            "weights of this config (a missing shard, or config.json of another model?)"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if source.gguf_file and quantizer is not None:
        # GGUF weights arrive dequantised to plain fp32, but transformers keeps a "gguf quantizer" attached
        # that refuses save_pretrained; detach it so the run ends in an ordinary safetensors folder.
        quantizer.remove_quantization_config(model)
    if not dropout:
        disable_dropout(model)
    model.config.use_cache = False
    return model.to(device)


def _adapter_base(source: ModelSource) -> str | None:
    """The base model of a local LoRA adapter folder, else None."""
    folder = Path(source.name_or_path)
    if not source.local or source.gguf_file or (folder / "config.json").is_file():
        return None
    adapter = folder / "adapter_config.json"
    if not adapter.is_file():
        return None
    try:
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ModelError(f"{adapter}: unreadable ({_one_line(e)})") from e
    if not base:
        raise ModelError(f"{adapter}: no base_model_name_or_path (which model does it adapt?)")
    return str(base)


def prepare_model(
    model: nn.Module,
    *,
    device: torch.device,
    dropout: bool = False,
    output_router_logits: bool | None = None,
) -> nn.Module:
    """A causal LM given in memory, made what :func:`load_model` returns: fp32 master weights (bf16 comes
    from autocast), every dropout-like setting off unless asked, no KV cache; the router term as asked."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise ModelError(
            f"model: expected a transformers causal LM (PreTrainedModel), got {type(model).__name__}"
        )
    if output_router_logits is not None:
        if not hasattr(config, "output_router_logits"):
            if output_router_logits:
                raise ModelError(
                    f"model.output_router_logits: {type(config).__name__} has no MoE router"
                )
        else:
            config.output_router_logits = output_router_logits
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        log.info("model: %s converted to fp32 master weights", type(model).__name__)
        model = model.float()
    if not dropout:
        disable_dropout(model)
    config.use_cache = False
    return model.to(device)


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` the MLP and norm modules of every decoder layer, in place; returns how many.

    Attention is left alone: the shared-prompt layout passes its segment plan as Python data, which would
    make a compiled attention recompile per batch. Measured on the 2-core CPU (SmolLM-135M shape,
    prompt-heavy, 2 pairs): no step-time gain and ~20 s of compilation, hence opt-in.
    """
    count = 0
    for name, module in unwrap_causal_lm(model).named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("mlp", "input_layernorm", "post_attention_layernorm"):
            module.compile(dynamic=True)
            count += 1
    return count
