"""Typed run configuration: nested dataclasses, loaded from YAML with ``key.sub=value`` overrides.

Every field carries a one-line ``help`` so that ``preftune train --print-config`` can document the resolved
config. Unknown keys and ill-typed values raise :class:`ConfigError` naming the key and suggesting the
closest valid one; cross-field rules (a reference-free loss with a reference configured, ...) are checked in
:func:`validate`. The generic coercion, override and YAML machinery lives in :mod:`preftune._configio`,
the ``data`` section (`DataConfig`, its `SourceConfig` entries and their checks) in
:mod:`preftune.data.spec`, :func:`validate` and its rules in :mod:`preftune.config_checks`; import everything
from here. Names other tools use are hinted (`KEY_HINTS`: a ``model.lora.rank`` suggests
``model.lora.r``) or resolved (`LOSS_ALIASES`: ``loss.name=dpo`` is sigmoid).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune._configio import (
    ConfigError,
    build,
    config_to_dict,
    format_config,
    read_yaml_mapping,
    setting,
)
from preftune._configio import apply_overrides as _apply_overrides
from preftune.config_checks import (
    KEY_HINTS,
    _resolve_aliases,
    resolved_reference_strategy,
    validate,
)
from preftune.config_checks import LOSS_ALIASES as LOSS_ALIASES
from preftune.data.spec import EXCLUSIVE, DataConfig, SourceConfig
from preftune.loopspec import GenEvalConfig, LoopConfig

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "GenEvalConfig",
    "LogConfig",
    "LoopConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ReferenceConfig",
    "SourceConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "format_config",
    "load_config",
    "resolved_reference_strategy",
    "validate",
]


_f = setting


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "train LoRA adapters (needs the `peft` extra) instead of all weights")
    r: int = _f(16, "LoRA rank")
    alpha: float = _f(32.0, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = _f(0.05, "dropout on the LoRA input")
    target_modules: list[str] = _f(
        ["all-linear"],
        "module names that receive adapters; all-linear = every linear layer of the decoder "
        "(the model's own names, whatever its architecture; never the LM head)",
    )
    merge_on_save: bool = _f(False, "also save the merged full model beside the adapter")


@dataclass
class ModelConfig:
    path: str = _f(
        "",
        "the starting policy: a local Hugging Face model folder, a .gguf file, or a Hub id org/name "
        "(offline: from the local Hub cache)",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) when path is a Hub id")
    gguf_file: str | None = _f(
        None, "GGUF file inside the model folder / Hub repo (dequantised to fp32; needs `gguf`)"
    )
    tokenizer_path: str | None = _f(
        None, "tokenizer folder, .gguf file or Hub id (default: the model's)"
    )
    dtype: str = _f("auto", "auto | float32 | bfloat16: auto = fp32 on CPU, bf16 autocast on GPU")
    attn_implementation: str | None = _f(
        "auto",
        "attention backend passed to from_pretrained: auto = sdpa where the model supports it, "
        "else eager; or sdpa | eager | flash_attention_2 | flex_attention",
    )
    output_router_logits: bool | None = _f(
        None,
        "MoE models: add the router load-balancing loss (router_aux_loss_coef x aux) to the "
        "training loss; null = as the model's config says",
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    dropout: bool = _f(False, "keep the model's dropout on (off by default, as in the DPO paper)")
    trust_remote_code: bool = _f(False, "allow custom modelling code from the model folder")
    lora: LoraConfig = _f(LoraConfig, "LoRA settings")


@dataclass
class LossConfig:
    name: list[str] = _f(["sigmoid"], "loss name or list of names (e.g. [sigmoid, sft])")
    weights: list[float] | None = _f(None, "one weight per loss name (default all 1.0)")
    beta: float | None = _f(None, "beta of the loss (default: the loss's paper default)")
    params: dict[str, float | str] = _f(
        {},
        "other hyperparameters by name, e.g. {label_smoothing: 0.1} or {f_divergence: js, f_alpha: 0.5}",
    )
    wpo_weighting: bool = _f(
        False,
        "WPO (Zhou et al. 2024): weight each pair by its responses' length-normalised policy "
        "probability (detached; the paper's sampled-token alignment)",
    )
    ld_alpha: float | None = _f(
        None,
        "LD-DPO (Liu et al. 2024): scale the log-probs of the longer response's tokens beyond the "
        "shorter one's length by this alpha in [0, 1] (policy and reference); null = off",
    )


@dataclass
class ReferenceSyncConfig:
    mode: str = _f("none", "none | soft | hard: TR-DPO reference updates from the policy")
    alpha: float = _f(0.6, "soft: ref <- alpha * policy + (1 - alpha) * ref (TR-DPO's α)")
    every: int = _f(512, "update the reference every N optimizer steps (TR-DPO's τ)")


@dataclass
class ReferenceConfig:
    strategy: str = _f("auto", "auto | copy | precomputed | adapter | none")
    path: str | None = _f(None, "reference model folder (default: model.path)")
    batch_size: int = _f(8, "pairs per batch when precomputing reference log-probs")
    cache_dir: str | None = _f(
        None, "precomputed log-prob cache (default $PREFTUNE_CACHE or ~/.cache/preftune)"
    )
    sync: ReferenceSyncConfig = _f(
        ReferenceSyncConfig,
        "TR-DPO (Gorbatovski et al. 2024): update the copy reference in training",
    )


@dataclass
class OptimConfig:
    lr: float = _f(5e-7, "peak learning rate (DPO paper: 5e-7 to 1e-6 full fine-tuning)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    scheduler: str = _f("linear", "linear | cosine | constant (after warm-up)")
    warmup_ratio: float = _f(0.1, "share of steps spent warming up linearly from 0")
    warmup_steps: int | None = _f(None, "warm-up steps (overrides warmup_ratio)")
    max_grad_norm: float | None = _f(1.0, "clip the global gradient norm (null: no clipping)")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/preftune", "run folder: config, metrics, checkpoints, final model")
    seed: int = _f(42, "seed for init, data order and dropout")
    epochs: float = _f(1.0, "passes over the training pairs")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides epochs)")
    batch_size: int = _f(8, "pairs per micro-batch per device")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    eval_every: int | None = _f(None, "evaluate every N steps (null: only at the end)")
    eval_batch_size: int | None = _f(None, "pairs per eval batch (default: batch_size)")
    save_every: int | None = _f(None, "checkpoint every N steps (null: only at the end)")
    keep_last: int = _f(2, "checkpoints to keep")
    resume: str = _f(
        "auto",
        "auto = continue from the newest intact checkpoint if the folder has one (refused if the settings "
        "changed) | never = start afresh | force = resume even though settings changed (recorded) | "
        "PATH of a checkpoint folder",
    )
    overwrite: bool = _f(
        False,
        "clear a non-empty output_dir for a fresh start (never needed to resume; a folder holding files "
        "a run does not write is never cleared)",
    )
    skip_nonfinite: bool = _f(
        False, "skip steps with a non-finite loss or gradient instead of stopping"
    )
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps")
    chunk_size: int = _f(1024, "response tokens per LM-head chunk")
    keep_logits_mb: int = _f(
        512,
        "when the policy's response tokens x vocab fp32 fit this many MiB, the LM head keeps its "
        "logits from forward to backward instead of recomputing them there; 0 = always recompute",
    )
    prefix_sharing: bool | None = _f(
        None,
        "compute the prompt once for chosen and rejected: null = where a setup probe proves it exact "
        "for this model, true = require it (error if not exact), false = two padded rows per pair",
    )
    compile: bool = _f(
        False, "torch.compile each decoder layer's MLP and norms (opt-in; no gain measured on CPU)"
    )
    parallel: str = _f("auto", "auto | ddp | fsdp (under torchrun)")
    fsdp_cpu_offload: bool = _f(False, "offload FSDP parameters to CPU")
    save_final: bool = _f(True, "save the final model folder")


@dataclass
class LogConfig:
    log_every: int = _f(10, "print a metrics line every N steps")
    progress: bool = _f(True, "show a progress bar")
    report_to: list[str] = _f(
        ["tensorboard"],
        "trackers that also get the metrics, besides metrics.jsonl: any of tensorboard, wandb, mlflow, "
        "trackio (each an extra: pip install 'preftune[wandb]'); [none] or [] for metrics.jsonl only",
    )
    run_name: str | None = _f(None, "the run's name in the trackers (default: output_dir's name)")
    project: str | None = _f(
        None,
        "W&B project / MLflow experiment / trackio project (default: $WANDB_PROJECT or "
        "$MLFLOW_EXPERIMENT_NAME when set, else preftune)",
    )
    tensorboard: bool | None = _f(
        None, "deprecated, use log.report_to: false drops tensorboard from it, true adds it"
    )
    diagnostics: bool = _f(True, "watch metrics and warn about known failure patterns")


@dataclass
class Config:
    model: ModelConfig = _f(ModelConfig, "the policy model")
    data: DataConfig = _f(DataConfig, "preference data")
    loss: LossConfig = _f(LossConfig, "the loss (or weighted sum of losses)")
    reference: ReferenceConfig = _f(ReferenceConfig, "how the reference log-probs are obtained")
    optim: OptimConfig = _f(OptimConfig, "optimizer and schedule")
    train: TrainConfig = _f(TrainConfig, "training loop")
    log: LogConfig = _f(LogConfig, "logging")
    loop: LoopConfig = _f(LoopConfig, "iterative on-policy DPO (preftune loop); ignored by train")
    geneval: GenEvalConfig = _f(
        GenEvalConfig, "generation eval on held-out prompts at train's eval points (optional)"
    )


# ---------------------------------------------------------------------------------------------------
# Loading


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested plain data; unknown keys and bad types raise ConfigError."""
    return _resolve_aliases(build(Config, data or {}, hints=KEY_HINTS))


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply ``key.sub=value`` overrides (see :func:`preftune._configio.apply_overrides`): names from other
    tools are hinted, ``null`` resets a setting to its default, and of two exclusive settings
    (``data.eval_files`` / ``data.eval_fraction``) the later one wins, with a log line."""
    return _resolve_aliases(_apply_overrides(cfg, overrides, hints=KEY_HINTS, exclusive=EXCLUSIVE))


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load YAML (or start from defaults when ``path`` is None), apply overrides, validate."""
    cfg = config_from_dict(read_yaml_mapping(path) if path is not None else {})
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg
