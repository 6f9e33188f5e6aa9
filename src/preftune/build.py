"""Build the parts of a run from its config: tokenizer, policy, reference, optimizer, schedule, loss.

The training loop in :mod:`preftune.trainer` only wires these together.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from preftune.config import Config, resolved_reference_strategy
from preftune.data import pair_lengths
from preftune.data.cache import cache_base
from preftune.distributed import DistContext
from preftune.distributed.wrap import shard_frozen
from preftune.losses import UNPAIRED_LOSSES, compute_loss
from preftune.model import (
    Layout,
    ModelError,
    ModelSource,
    choose_layout,
    compile_blocks,
    load_model,
    load_tokenizer,
    prepare_model,
    resolve_source,
)
from preftune.model.arch import lora_exclusions, router_aux
from preftune.objective import KTOObjective, Objective
from preftune.reference import (
    AdapterReference,
    CopyReference,
    PrecomputedReference,
    Reference,
    hash_weights,
    precompute_logps,
)

__all__ = [
    "autocast_factory",
    "build_layout",
    "build_loss_fn",
    "build_objective",
    "build_optimizer",
    "build_policy_model",
    "build_reference",
    "build_scheduler",
    "build_tokenizer",
    "cache_root",
    "check_vocab",
    "load_reference_model",
    "model_source",
    "warmup_steps",
]

log = logging.getLogger(__name__)


def cache_root(explicit: str | None) -> Path:
    """Where precomputed reference tables and in-memory rows go: the one cache folder (data.cache owns it)."""
    return cache_base(explicit)


def model_source(cfg: Config) -> ModelSource:
    m = cfg.model
    return resolve_source(m.path, revision=m.revision, gguf_file=m.gguf_file)


def build_tokenizer(cfg: Config):
    """The run's tokenizer: ``model.tokenizer_path`` when set, else the model's own (GGUF included)."""
    m = cfg.model
    if m.tokenizer_path:
        source = resolve_source(m.tokenizer_path, setting="model.tokenizer_path", kind="tokenizer")
    else:
        source = resolve_source(
            m.path, revision=m.revision, gguf_file=m.gguf_file, kind="tokenizer"
        )
    return load_tokenizer(source, trust_remote_code=m.trust_remote_code)


def autocast_factory(
    cfg: Config, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on GPU (fp32 master weights); plain fp32 on CPU unless asked otherwise."""
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext
    if device.type == "cpu":
        log.warning("%s autocast on CPU is far slower than fp32 on most CPUs", dtype)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch_dtype)


def build_policy_model(
    cfg: Config, device: torch.device, model: nn.Module | None = None
) -> nn.Module:
    """The trainable model: loaded from ``model.path`` (or the ``model`` given in memory), dropout off,
    LoRA-wrapped when configured, in training mode."""
    if model is not None:
        model = prepare_model(
            model,
            device=device,
            dropout=cfg.model.dropout,
            output_router_logits=cfg.model.output_router_logits,
        )
    else:
        model = load_model(
            model_source(cfg),
            device=device,
            attn_implementation=cfg.model.attn_implementation,
            dropout=cfg.model.dropout,
            trust_remote_code=cfg.model.trust_remote_code,
            output_router_logits=cfg.model.output_router_logits,
        )
    if cfg.model.output_router_logits and router_aux(model) is None:
        raise ModelError(
            f"model.output_router_logits: {type(model).__name__} computes no router load-balancing "
            "loss in transformers; set it to null"
        )
    if cfg.model.lora.enabled:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError(
                "model.lora.enabled needs peft: pip install 'preftune[lora]'"
            ) from None
        lora = cfg.model.lora
        targets: list[str] | str = lora.target_modules
        exclude = None
        if targets == ["all-linear"]:  # peft's own: the model's linear layers, whatever their names
            targets, exclude = "all-linear", lora_exclusions(model) or None
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout if cfg.model.dropout else 0.0,
                target_modules=targets,
                exclude_modules=exclude,
                task_type="CAUSAL_LM",
            ),
        )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.lora.enabled:
            model.enable_input_require_grads()
    model.train()
    if cfg.train.compile:
        log.info("torch.compile: %d modules", compile_blocks(model))
    return model


def load_reference_model(cfg: Config, device: torch.device) -> nn.Module | None:
    """The separate reference model of ``reference.path`` (copy / precomputed), else None."""
    if not cfg.reference.path or resolved_reference_strategy(cfg) not in ("copy", "precomputed"):
        return None
    source = resolve_source(cfg.reference.path, setting="reference.path")
    return load_model(
        source,
        device=device,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def check_vocab(cfg: Config, tokenizer, model: nn.Module, setting: str = "model.path") -> None:
    """A tokenizer with more tokens than the model has embeddings would index past the table (a CUDA
    assert or a crash mid-run): a :class:`ModelError` naming both sizes, before training starts."""
    embeddings = model.get_input_embeddings()
    if embeddings is None or not hasattr(embeddings, "num_embeddings"):
        return
    n_tokens, n_rows = len(tokenizer), embeddings.num_embeddings
    if n_tokens > n_rows:
        where = (
            "model.tokenizer_path" if cfg.model.tokenizer_path else "the tokenizer of model.path"
        )
        path = cfg.reference.path if setting == "reference.path" else cfg.model.path
        raise ModelError(
            f"{where} has {n_tokens} tokens but {setting} {path} has only {n_rows} embeddings; "
            f"expected a tokenizer of at most {n_rows} tokens (the model's own)"
        )


def build_layout(
    cfg: Config, tokenizer, policy_model: nn.Module, ref_model: nn.Module | None = None
) -> Layout:
    """The run's layout, proven on the policy (and a separate reference model) by the setup probe."""
    return choose_layout(
        policy_model,
        *([ref_model] if ref_model is not None else []),
        pad_token_id=tokenizer.pad_token_id,
        chunk_size=cfg.train.chunk_size,
        keep_bytes=cfg.train.keep_logits_mb * 2**20,
        prefix_sharing=cfg.train.prefix_sharing,
        check_determinism=not cfg.model.dropout,
        extras=build_objective(cfg).extras,
    )


def build_reference(
    cfg: Config,
    policy: nn.Module,
    layout: Layout,
    data,
    *,
    ref_model: nn.Module | None = None,
    device: torch.device,
    autocast,
    progress: bool = True,
    dist: DistContext | None = None,
) -> Reference | None:
    """The configured reference strategy, built from θ₀ (call before loading a checkpoint).

    ``policy`` is the layout's log-prob module around the policy; ``ref_model`` a separate reference model
    (:func:`load_reference_model`), else the reference is the starting policy. Under torchrun (``dist``) a
    copy is sharded like the policy with FSDP, and precomputed log-probs are computed in parallel: each rank
    its share of the pairs, gathered into one table; rank 0 writes the cache.
    """
    dist = dist or DistContext(device=device)
    strategy = resolved_reference_strategy(cfg)
    if strategy == "none":
        return None
    if strategy == "adapter":
        return AdapterReference(policy, layout)
    source = ref_model if ref_model is not None else policy.model
    if strategy == "copy":
        reference = CopyReference(source, layout)
        shard_frozen(dist, reference.module)
        return reference
    # precomputed: the key covers weights, tokenized data, and every setting that changes the numbers.
    import hashlib

    settings = (
        f"{data.fingerprint}|{cfg.model.dtype}|{cfg.model.attn_implementation}|{device.type}|"
        f"{layout.name}|{layout.chunked_head}|{','.join(sorted(layout.extras))}"
    )
    key = hashlib.sha256(f"{hash_weights(source)}|{settings}".encode()).hexdigest()[:32]
    root = cache_root(cfg.reference.cache_dir)
    rows = {"train": len(data.train), "eval": len(data.eval) if data.eval is not None else 0}
    cached = PrecomputedReference.load(root, key, rows=rows)
    if dist.all(cached is not None):
        log.info("reference log-probs: cache hit %s", PrecomputedReference.cache_path(root, key))
        return cached
    module = shard_frozen(dist, CopyReference(source, layout).module)
    tables = {}
    for split, dataset in (("train", data.train), ("eval", data.eval)):
        if dataset is None or len(dataset) == 0:
            continue
        owned, work = dist.shard_indices(pair_lengths(dataset))
        table = precompute_logps(
            module,
            dataset,
            layout,
            batch_size=cfg.reference.batch_size,
            device=device,
            autocast=autocast,
            progress=progress,
            desc=f"reference log-probs ({split})",
            indices=work,
        )
        tables[split] = dist.gather_table(table, owned)
    del module  # the reference model is not needed again
    ref = PrecomputedReference(tables, key)
    if dist.is_main:
        path = ref.save(root)
        log.info("reference log-probs: computed and cached at %s", path)
    dist.barrier()
    return ref


def build_objective(cfg: Config) -> Objective | KTOObjective:
    """The micro-batch objective: the configured loss with its options (LD-DPO, WPO) and reduction, or
    KTO's on unpaired rows."""
    if cfg.loss.name[0] in UNPAIRED_LOSSES:  # validated: an unpaired loss stands alone
        hparams = {**UNPAIRED_LOSSES[cfg.loss.name[0]].defaults, **cfg.loss.params}
        if cfg.loss.beta is not None:
            hparams["beta"] = cfg.loss.beta
        return KTOObjective(**{k: float(v) for k, v in hparams.items()})
    return Objective(build_loss_fn(cfg), ld_alpha=cfg.loss.ld_alpha, wpo=cfg.loss.wpo_weighting)


def build_loss_fn(cfg: Config) -> Callable:
    """``compute_loss`` with the configured names, weights and hyperparameters bound."""
    hparams = dict(cfg.loss.params)
    if cfg.loss.beta is not None:
        hparams["beta"] = cfg.loss.beta
    names = cfg.loss.name[0] if len(cfg.loss.name) == 1 else list(cfg.loss.name)
    return functools.partial(compute_loss, names, weights=cfg.loss.weights, **hparams)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def warmup_steps(cfg: Config, total_steps: int) -> int:
    o = cfg.optim
    return o.warmup_steps if o.warmup_steps is not None else int(o.warmup_ratio * total_steps)


def build_scheduler(cfg: Config, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    warmup = warmup_steps(cfg, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if o.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if o.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
