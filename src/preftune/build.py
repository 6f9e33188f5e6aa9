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
from preftune.distributed import DistContext
from preftune.losses import compute_loss
from preftune.modeling import SequenceLogpsModel, compile_blocks, load_model, logps_module
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
    "build_loss_fn",
    "build_optimizer",
    "build_policy",
    "build_reference",
    "build_scheduler",
    "build_tokenizer",
    "cache_root",
    "warmup_steps",
]

log = logging.getLogger(__name__)


def cache_root(explicit: str | None) -> Path:
    import os

    if explicit:
        return Path(explicit)
    return Path(os.environ.get("PREFTUNE_CACHE", Path.home() / ".cache" / "preftune"))


def build_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer_path or cfg.model.path
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out everywhere; any id works, EOS is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


def build_policy(cfg: Config, device: torch.device) -> tuple[nn.Module, SequenceLogpsModel]:
    """The trainable model (LoRA-wrapped when configured) and the log-prob module around it."""
    model = load_model(
        cfg.model.path,
        device=device,
        attn_implementation=cfg.model.attn_implementation,
        dropout=cfg.model.dropout,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if cfg.model.lora.enabled:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError(
                "model.lora.enabled needs peft: pip install 'preftune[lora]'"
            ) from None
        lora = cfg.model.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout if cfg.model.dropout else 0.0,
                target_modules=lora.target_modules,
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
    return model, logps_module(
        model, chunk_size=cfg.train.chunk_size, prefix_sharing=cfg.train.prefix_sharing
    )


def build_reference(
    cfg: Config,
    policy: SequenceLogpsModel,
    data,
    collate,
    *,
    device: torch.device,
    autocast,
    progress: bool = True,
    dist: DistContext | None = None,
) -> Reference | None:
    """The configured reference strategy, built from θ₀ (call before loading a checkpoint).

    Under torchrun (``dist``) a copy is sharded like the policy with FSDP, and precomputed log-probs are
    computed in parallel: each rank its share of the pairs, gathered into one table; rank 0 writes the cache.
    """
    dist = dist or DistContext(device=device)
    strategy = resolved_reference_strategy(cfg)
    if strategy == "none":
        return None
    if strategy == "adapter":
        return AdapterReference(policy)
    if cfg.reference.path:
        source = load_model(
            cfg.reference.path,
            device=dist.load_device,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    else:
        source = policy.model
    if strategy == "copy":
        reference = CopyReference(
            source, chunk_size=cfg.train.chunk_size, prefix_sharing=policy.shared_layout
        )
        dist.shard_frozen(reference.module)
        return reference
    # precomputed: the key covers weights, tokenized data, and every setting that changes the numbers.
    import hashlib

    settings = f"{data.fingerprint}|{cfg.model.dtype}|{cfg.model.attn_implementation}|{device.type}"
    key = hashlib.sha256(f"{hash_weights(source)}|{settings}".encode()).hexdigest()[:32]
    root = cache_root(cfg.reference.cache_dir)
    cached = PrecomputedReference.load(root, key)
    if dist.all(cached is not None):
        log.info("reference log-probs: cache hit %s", PrecomputedReference.cache_path(root, key))
        return cached
    module = dist.shard_frozen(
        CopyReference(
            source, chunk_size=cfg.train.chunk_size, prefix_sharing=policy.shared_layout
        ).module
    )
    tables = {}
    for split, dataset in (("train", data.train), ("eval", data.eval)):
        if dataset is None or len(dataset) == 0:
            continue
        owned, work = dist.shard_indices(pair_lengths(dataset))
        table = precompute_logps(
            module,
            dataset,
            collate,
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
