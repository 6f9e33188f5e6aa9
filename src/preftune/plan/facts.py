"""What the plan reads without weights: the model's architecture and parameter counts (built on the
``meta`` device from its config), the training pairs' token lengths and the longest micro-batch a run
forms from them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from preftune.config import Config
from preftune.plan.units import _count, _line

#: Epochs whose micro-batches are enumerated to find the longest (beyond: the same shuffle statistics).
MAX_EPOCHS_SCANNED = 8


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs of a model, read from its config (``meta`` device: no weights, no memory)."""

    model_type: str
    hidden: int  # h
    intermediate: int  # i: MLP width per token (MoE: experts per token x expert width)
    layers: int  # L
    heads: int  # n
    kv_heads: int
    head_dim: int
    vocab: int  # V
    params: int  # P, tied weights once
    layer_params: int  # the largest decoder layer
    root_params: int  # everything outside the decoder layers (embeddings, LM head, final norm)
    lora_params: int = 0  # adapters model.lora would add (whether or not it is enabled)
    lora_out_width: int = 0  # Σ output width of the adapted linear layers, per decoder layer
    tied: bool = True
    logit_softcap: bool = False
    sharing_note: str | None = None  # why the shared prompt cannot be used (None: predicted to be)
    file_bytes: int = 0  # the weight files' size on disk (the load phase maps them)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def describe(self) -> str:
        return (
            f"{self.model_type}, {_count(self.params)} parameters: hidden {self.hidden}, "
            f"{self.layers} layers, {self.heads}/{self.kv_heads} heads, MLP {self.intermediate}, "
            f"vocab {self.vocab}{', tied' if self.tied else ''}"
        )


def model_facts(cfg: Config) -> ModelFacts:
    """:class:`ModelFacts` of ``model.path`` (folder, .gguf or Hub id), with ``model.lora``'s adapters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from preftune.model import ModelError, resolve_source

    m = cfg.model
    source = resolve_source(m.path, revision=m.revision, gguf_file=m.gguf_file)
    kwargs = source.pretrained_kwargs()
    try:
        config = AutoConfig.from_pretrained(
            source.name_or_path, trust_remote_code=cfg.model.trust_remote_code, **kwargs
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"model.path: cannot read the config of {source}: {_line(e)}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=cfg.model.trust_remote_code
            )
    except (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError) as e:
        raise ModelError(
            f"model.path: cannot build {type(config).__name__} on the meta device: {_line(e)}"
        ) from None
    facts = facts_from_model(model, lora=cfg.model.lora)
    return _with_file_bytes(facts, source)


def facts_from_model(model, lora=None) -> ModelFacts:
    """:class:`ModelFacts` of a (meta-device) causal LM; ``lora``: a LoraConfig-like section to count."""
    from preftune.model.arch import decoder_layer_classes, sharing_refusal, split_lm_head

    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = sum(p.numel() for p in model.parameters())
    layer_types = decoder_layer_classes(model)
    layers = [m for m in model.modules() if isinstance(m, layer_types)] if layer_types else []
    layer_sizes = [sum(p.numel() for p in m.parameters()) for m in layers]
    hidden = int(_first(text, ("hidden_size", "n_embd", "d_model")) or 0)
    heads = int(_first(text, ("num_attention_heads", "n_head")) or 1)
    kv_heads = int(_first(text, ("num_key_value_heads", "num_kv_heads")) or heads)
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv_heads = 1
    head_dim = int(getattr(text, "head_dim", None) or hidden // max(heads, 1))
    n_layers = len(layers) or int(_first(text, ("num_hidden_layers", "n_layer")) or 0)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and inp is not None and out.weight is inp.weight
    vocab = int(getattr(text, "vocab_size", 0) or (inp.weight.shape[0] if inp is not None else 0))
    head = split_lm_head(model)
    lora_params, lora_width = _lora_counts(model, lora) if lora is not None else (0, 0)
    return ModelFacts(
        model_type=str(getattr(config, "model_type", type(model).__name__)),
        hidden=hidden,
        intermediate=_mlp_width(text, layers[0] if layers else None, hidden),
        layers=n_layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        params=params,
        layer_params=max(layer_sizes, default=0),
        root_params=params - sum(layer_sizes),
        lora_params=lora_params,
        lora_out_width=lora_width // max(n_layers, 1),
        tied=tied,
        logit_softcap=head is not None and head.logit_softcap is not None,
        sharing_note=sharing_refusal(model),
    )


def _first(obj, names: Sequence[str]):
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _mlp_width(text, layer, hidden: int) -> int:
    """Per-token MLP width: the config's, times the experts each token visits for MoE models."""
    experts_per_token = _first(text, ("num_experts_per_tok", "moe_topk", "top_k"))
    width = _first(text, ("moe_intermediate_size", "expert_intermediate_size"))
    if experts_per_token and width:
        shared = _first(text, ("shared_expert_intermediate_size",)) or 0
        n_shared = _first(text, ("n_shared_experts", "num_shared_experts")) or 0
        return experts_per_token * width + max(shared, n_shared * width)
    width = _first(text, ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim"))
    if experts_per_token and width:
        return experts_per_token * width
    if width:
        return width
    # From the block itself: the widest projection out of the hidden size (GPT-2 c_fc, Falcon 4h, ...).
    widest = 0
    for module in layer.modules() if layer is not None else ():
        shape = _linear_shape(module)
        if shape and shape[0] == hidden and shape[1] != hidden:
            widest = max(widest, shape[1])
    return widest or 4 * hidden


def _linear_shape(module) -> tuple[int, int] | None:
    """(in, out) of a linear layer (nn.Linear, or GPT-2's Conv1D with its transposed weight)."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.weight.shape[0]), int(module.nf)
    return None


def _lora_counts(model, lora) -> tuple[int, int]:
    """(parameters, Σ output widths) of the adapters: r · (in + out) per adapted linear layer of the
    decoder (peft's all-linear: every linear layer but the LM head; else the named ones)."""
    head = model.get_output_embeddings()
    targets = list(lora.target_modules)
    params = width = 0
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is None or module is head:
            continue
        if targets != ["all-linear"] and name.rsplit(".", 1)[-1] not in targets:
            continue
        params += lora.r * (shape[0] + shape[1])
        width += shape[1]
    return params, width


def _with_file_bytes(facts: ModelFacts, source) -> ModelFacts:
    import dataclasses
    from pathlib import Path

    folder = Path(source.name_or_path)
    if not source.local or not folder.is_dir():
        return facts
    files = [folder / source.gguf_file] if source.gguf_file else list(folder.glob("*.safetensors"))
    files = files or list(folder.glob("*.bin"))
    size = sum(f.stat().st_size for f in files if f.is_file())
    return dataclasses.replace(facts, file_bytes=size)


@dataclass(frozen=True)
class MicroBatch:
    """The decoder input of the longest micro-batch: ``rows`` × ``length`` tokens (padding included)."""

    pairs: int
    rows: int
    length: int
    scored: int  # response tokens through the LM head
    rejected_kv: int  # shared prompt: Σ (P + R), the keys/values the rejected pieces concatenate
    source: str  # where the shape comes from

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    def describe(self) -> str:
        return (
            f"{self.pairs} pairs = {self.rows} row{'s' if self.rows != 1 else ''} x "
            f"{self.length} tokens, {self.scored} scored"
        )


def lengths_of(dataset) -> Any:
    """``[n, 3]`` int64 array of (prompt, chosen, rejected) token counts of a tokenized split."""
    import numpy as np

    names = ("prompt_ids", "chosen_ids", "rejected_ids")
    if hasattr(
        dataset, "with_format"
    ):  # datasets.Dataset: list lengths from Arrow, no Python lists
        import pyarrow.compute as pc

        table = dataset.with_format("arrow")[:]
        cols = [pc.list_value_length(table[n]).to_numpy(zero_copy_only=False) for n in names]
    else:
        cols = [[len(ex[n]) for ex in dataset] for n in names]
    return np.stack([np.asarray(c, dtype=np.int64) for c in cols], axis=1).reshape(-1, 3)


def data_lengths(cfg: Config) -> Any:
    """Token lengths of the training pairs, tokenized as training would (through the data cache)."""
    from preftune.build import build_tokenizer
    from preftune.data import load_preference_data

    data = load_preference_data(cfg.data, build_tokenizer(cfg), seed=cfg.train.seed, warn=False)
    return lengths_of(data.train)


def _shape(triples, layout: str) -> tuple[int, int, int, int]:
    """(rows, length, scored, rejected_kv) of a micro-batch of (P, C, R) triples in ``layout``."""
    scored = sum(c + r for _, c, r in triples)
    if layout == "padded":
        width = max(p + max(c, r) for p, c, r in triples)
        return 2 * len(triples), width, scored, 0
    return 1, sum(p + c + r for p, c, r in triples), scored, sum(p + r for p, _, r in triples)


def longest_micro_batch(
    cfg: Config,
    layout: str,
    lengths=None,
    *,
    world_size: int = 1,
    batch_size: int | None = None,
    by_length: bool = False,
) -> MicroBatch:
    """The micro-batch with the most decoder tokens this run forms (with ``lengths``: every epoch it runs,
    up to :data:`MAX_EPOCHS_SCANNED`, every rank), else ``data.max_length``'s upper bound.
    ``by_length``: batches cut from the pairs in length order (the reference precompute): the longest."""
    b = batch_size or cfg.train.batch_size
    if lengths is None or len(lengths) == 0:
        big = cfg.data.max_length
        triples = [(1, big - 1, big - 1)] * b
        if layout == "padded":
            triples = [(0, big, big)] * b
        rows, length, scored, kv = _shape(triples, layout)
        return MicroBatch(b, rows, length, scored, kv, "upper bound from data.max_length")
    from preftune.data import batch_indices

    triples = [tuple(int(x) for x in row) for row in lengths]
    pair_len = [p + max(c, r) for p, c, r in triples]
    if by_length:
        order = sorted(range(len(triples)), key=pair_len.__getitem__)
        last = [triples[i] for i in order[-b:]]
        rows, length, scored, kv = _shape(last, layout)
        return MicroBatch(len(last), rows, length, scored, kv, "the data: its longest pairs")
    micro_per_epoch = math.ceil(len(triples) / (b * world_size))
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.train.grad_accum)
    if cfg.train.max_steps:
        epochs = math.ceil(cfg.train.max_steps / steps_per_epoch)
    else:
        epochs = math.ceil(cfg.train.epochs)
    best, seen = None, 0
    for epoch in range(min(max(epochs, 1), MAX_EPOCHS_SCANNED)):
        for rank in range(world_size):
            for idx in batch_indices(
                pair_len,
                b,
                seed=cfg.train.seed,
                epoch=epoch,
                group_by_length=cfg.data.group_by_length,
                rank=rank,
                world_size=world_size,
            ):
                if not idx:
                    continue
                seen += 1
                shape = _shape([triples[i] for i in idx], layout)
                key = (shape[0] * shape[1], shape[2])
                if best is None or key > best[0]:
                    best = (key, len(idx), shape)
    assert best is not None
    _, pairs, (rows, length, scored, kv) = best
    return MicroBatch(pairs, rows, length, scored, kv, f"the data: longest of {seen} micro-batches")
