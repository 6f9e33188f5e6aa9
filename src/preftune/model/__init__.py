"""The model-and-layout layer: everything between a model the user names and per-pair log-probs.

Modules: ``loading`` (where models live, tokenizer, dropout off), ``arch`` (architecture facts: decoder,
LM head, decoder layers, router term), ``attention`` (per-segment attention for the shared prompt),
``batches`` (typed batches and their collators), ``forward`` (the log-prob modules), ``probe`` (the setup
probe that proves each fast path exact), ``layout`` (the run's :class:`Layout`, chosen once).
"""

from .arch import LMHead, decoder_layer_classes, find_decoder, split_lm_head, unwrap_causal_lm
from .batches import PaddedBatch, PairBatch, SharedBatch, collate_padded, collate_shared
from .forward import PaddedLogps, SequenceLogps, SharedPromptLogps
from .layout import Layout, PaddedLayout, SharedPromptLayout, choose_layout
from .loading import (
    ModelError,
    ModelSource,
    compile_blocks,
    disable_dropout,
    load_model,
    load_tokenizer,
    prepare_model,
    prepare_tokenizer,
    resolve_device,
    resolve_source,
)

__all__ = [
    "LMHead",
    "Layout",
    "ModelError",
    "ModelSource",
    "PaddedBatch",
    "PaddedLayout",
    "PaddedLogps",
    "PairBatch",
    "SequenceLogps",
    "SharedBatch",
    "SharedPromptLayout",
    "SharedPromptLogps",
    "choose_layout",
    "collate_padded",
    "collate_shared",
    "compile_blocks",
    "decoder_layer_classes",
    "disable_dropout",
    "find_decoder",
    "load_model",
    "load_tokenizer",
    "prepare_model",
    "prepare_tokenizer",
    "resolve_device",
    "resolve_source",
    "split_lm_head",
    "unwrap_causal_lm",
]
