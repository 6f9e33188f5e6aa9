"""Typed run configuration: nested dataclasses, loaded from YAML with ``key.sub=value`` overrides.

Every field carries a one-line ``help`` so that ``preftune train --print-config`` can document the resolved
config. Unknown keys and ill-typed values raise :class:`ConfigError` naming the key and suggesting the
closest valid one; cross-field rules (a reference-free loss with a reference configured, ...) are checked in
:func:`validate`. The generic coercion, override and YAML machinery lives in :mod:`preftune._configio`,
the ``data`` section (`DataConfig`, its `SourceConfig` entries and their checks) in
:mod:`preftune.data.spec`; import everything from here. Names other tools use are hinted (`KEY_HINTS`: a
``model.lora.rank`` suggests ``model.lora.r``) or resolved (`LOSS_ALIASES`: ``loss.name=dpo`` is sigmoid).
"""

from __future__ import annotations

import logging
import math
import re
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
    suggest,
)
from preftune._configio import apply_overrides as _apply_overrides
from preftune.data.spec import (
    EXCLUSIVE,
    FORMAT_CHOICES,
    SHAPE_CHOICES,
    DataConfig,
    SourceConfig,
    check_data,
    check_examples,
)
from preftune.loopspec import LoopConfig, check_loop

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
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


# ---------------------------------------------------------------------------------------------------
# Loading


log = logging.getLogger("preftune.config")

#: Names other tools use (TRL's DPOConfig, peft's LoraConfig, transformers' TrainingArguments) -> the key
#: here, for the unknown-key message. A bare name matches in any section; ``[]`` stands for a list index.
KEY_HINTS = {
    "model.lora.rank": "model.lora.r", "model.lora.lora_alpha": "model.lora.alpha",
    "model.lora.lora_dropout": "model.lora.dropout", "learning_rate": "optim.lr",
    "per_device_train_batch_size": "train.batch_size", "num_train_epochs": "train.epochs",
    "gradient_accumulation_steps": "train.grad_accum", "lr_scheduler_type": "optim.scheduler",
    "loss_type": "loss.name", "label_smoothing": "loss.params.label_smoothing",
    "logging_steps": "log.log_every", "eval_steps": "train.eval_every",
    "save_steps": "train.save_every", "save_total_limit": "train.keep_last",
    "model_name_or_path": "model.path", "use_peft": "model.lora.enabled",
    "lora_r": "model.lora.r", "lora_alpha": "model.lora.alpha", "ref_model": "reference.path",
    "precompute_ref_log_probs": "reference.strategy", "dataset_name": "data.train_files",
    "data.sources[].name": "data.sources[].config", "data.eval_sources[].name": "data.eval_sources[].config",
}  # fmt: skip
#: Loss names other tools use -> the registry's name; resolved on loading (the resolved config records it).
LOSS_ALIASES = {"dpo": "sigmoid"}


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested plain data; unknown keys and bad types raise ConfigError."""
    return _resolve_aliases(build(Config, data or {}, hints=KEY_HINTS))


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply ``key.sub=value`` overrides (see :func:`preftune._configio.apply_overrides`): names from other
    tools are hinted, ``null`` resets a setting to its default, and of two exclusive settings
    (``data.eval_files`` / ``data.eval_fraction``) the later one wins, with a log line."""
    return _resolve_aliases(_apply_overrides(cfg, overrides, hints=KEY_HINTS, exclusive=EXCLUSIVE))


def _resolve_aliases(cfg: Config) -> Config:
    for i, name in enumerate(cfg.loss.name):
        if name in LOSS_ALIASES:
            cfg.loss.name[i] = LOSS_ALIASES[name]
            log.info("loss.name: %r is an alias of %r", name, LOSS_ALIASES[name])
    return cfg


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load YAML (or start from defaults when ``path`` is None), apply overrides, validate."""
    cfg = config_from_dict(read_yaml_mapping(path) if path is not None else {})
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------
# Validation


_CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.format": FORMAT_CHOICES,
    "data.shape": SHAPE_CHOICES,
    "data.prompt_truncation": ("left", "right"),
    "data.on_drop": ("count", "error"),
    "reference.strategy": ("auto", "copy", "precomputed", "adapter", "none"),
    "reference.sync.mode": ("none", "soft", "hard"),
    "optim.scheduler": ("linear", "cosine", "constant"),
    "train.parallel": ("auto", "ddp", "fsdp"),
}


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def resolved_reference_strategy(cfg: Config) -> str:
    """The reference strategy after ``auto``: none for reference-free losses, adapter with LoRA, else copy."""
    from preftune.losses import ALL_LOSSES as LOSSES

    needs_ref = any(LOSSES[n].needs_reference for n in cfg.loss.name if n in LOSSES)
    strategy = cfg.reference.strategy
    if strategy != "auto":
        return strategy
    if not needs_ref:
        return "none"
    return "adapter" if cfg.model.lora.enabled else "copy"


def validate(cfg: Config) -> None:
    """Cross-field checks; raise ConfigError naming the keys involved. Loss aliases are resolved first."""
    _resolve_aliases(cfg)
    check_data(cfg.data)
    check_loop(cfg.loop)
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(
                f"{key}: expected one of {', '.join(choices)}, got {value!r}{suggest(str(value), choices)}"
            )
    from preftune.losses import ALL_LOSSES as LOSSES

    if not cfg.loss.name:
        raise ConfigError("loss.name: give at least one loss")
    for name in cfg.loss.name:
        if name not in LOSSES:
            raise ConfigError(
                f"loss.name: unknown loss '{name}'{suggest(name, LOSSES)}; known: {', '.join(LOSSES)}"
            )
    from preftune.losses import UNPAIRED_LOSSES

    unpaired = [n for n in cfg.loss.name if n in UNPAIRED_LOSSES]
    if unpaired and len(cfg.loss.name) > 1:
        raise ConfigError(
            f"loss.name: {unpaired[0]} trains on unpaired rows and cannot be combined with "
            f"{[n for n in cfg.loss.name if n not in unpaired]}"
        )
    check_examples(cfg.data, bool(unpaired), ",".join(cfg.loss.name))
    if cfg.loss.weights is not None and len(cfg.loss.weights) != len(cfg.loss.name):
        raise ConfigError(
            f"loss.weights: {len(cfg.loss.weights)} weights for {len(cfg.loss.name)} losses {cfg.loss.name}"
        )
    accepted = sorted({k for n in cfg.loss.name for k in LOSSES[n].defaults} - {"beta"})
    string_keys = {k for spec in LOSSES.values() for k in spec.choices}  # e.g. f_divergence
    for key, value in cfg.loss.params.items():
        if key == "beta":
            raise ConfigError("loss.params.beta: set beta as loss.beta")
        if isinstance(value, str) and key not in string_keys:
            raise ConfigError(f"loss.params.{key}: expected a number, got {value!r}")
        if key not in accepted:
            raise ConfigError(
                f"loss.params.{key}: not a hyperparameter of {cfg.loss.name}{suggest(key, accepted)}; "
                f"accepted: {', '.join(accepted) or 'none besides loss.beta'}"
            )
        choices = next(
            (LOSSES[n].choices[key] for n in cfg.loss.name if key in LOSSES[n].choices), None
        )
        if choices is not None and value not in choices:
            raise ConfigError(
                f"loss.params.{key}: expected one of {', '.join(choices)}, got {value!r}"
                f"{suggest(str(value), choices)}"
            )
    _validate_loss_options(cfg)
    needs_ref = any(LOSSES[n].needs_reference for n in cfg.loss.name)
    strategy = cfg.reference.strategy
    if not needs_ref and strategy not in ("auto", "none"):
        raise ConfigError(
            f"reference.strategy: '{strategy}' configured but loss {cfg.loss.name} is reference-free; "
            "set reference.strategy=none (or auto)"
        )
    if needs_ref and strategy == "none":
        raise ConfigError(
            f"reference.strategy: loss {cfg.loss.name} needs a reference; use copy, precomputed or adapter"
        )
    if strategy == "adapter" and not cfg.model.lora.enabled:
        raise ConfigError("reference.strategy: 'adapter' needs model.lora.enabled=true")
    _check_ranges(cfg)
    if cfg.data.max_prompt_length is not None and cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            f"data.max_prompt_length ({cfg.data.max_prompt_length}) must be < data.max_length "
            f"({cfg.data.max_length}) so that responses keep at least one token"
        )
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {cfg.optim.betas}")
    for i, beta in enumerate(cfg.optim.betas):
        if not 0.0 <= beta < 1.0:  # NaN fails too
            raise ConfigError(f"optim.betas: each must be in [0, 1), got {beta} at position {i}")
    if not _DEVICE.match(cfg.train.device):
        raise ConfigError(
            f"train.device: expected auto, cpu, cuda, cuda:N or mps, got {cfg.train.device!r}"
            f"{suggest(cfg.train.device, ('auto', 'cpu', 'cuda', 'mps'))}"
        )
    _check_resume_setting(cfg.train.resume)
    # log.report_to: known trackers, and the library of each installed (before any model loads).
    from preftune.tracking import check_report_to

    check_report_to(cfg.log)


#: (key, lowest allowed, whether the lowest is allowed, may be null). Every bound also refuses NaN and
#: infinity: a NaN learning rate trains nothing and exits 0; an infinite one destroys the weights.
_RANGES: tuple[tuple[str, float, bool, bool], ...] = (
    ("train.batch_size", 1, True, False),
    ("train.grad_accum", 1, True, False),
    ("train.keep_last", 1, True, False),
    ("train.chunk_size", 1, True, False),
    ("train.max_steps", 1, True, True),
    ("train.epochs", 0, False, False),
    ("train.eval_every", 1, True, True),
    ("train.save_every", 1, True, True),
    ("train.eval_batch_size", 1, True, True),
    ("log.log_every", 1, True, False),
    ("optim.lr", 0, False, False),
    ("optim.eps", 0, False, False),
    ("optim.weight_decay", 0, True, False),
    ("optim.max_grad_norm", 0, False, True),
    ("optim.warmup_steps", 0, True, True),
    ("loss.beta", 0, False, True),
    ("data.max_length", 2, True, False),
    ("data.max_prompt_length", 1, True, True),
    ("reference.batch_size", 1, True, False),
    ("model.lora.r", 1, True, False),
    ("model.lora.alpha", 0, False, False),
)
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check_ranges(cfg: Config) -> None:
    for key, low, inclusive, nullable in _RANGES:
        value = _get(cfg, key)
        if value is None and nullable:
            continue
        ok = math.isfinite(value) and (value >= low if inclusive else value > low)
        if not ok:
            low_text = f"{low:g}"
            want = f">= {low_text}" if inclusive else f"> {low_text}"
            if nullable:
                want += " or null"
            raise ConfigError(f"{key}: must be {want}, got {value}")
    for key, lo, hi in (
        ("data.eval_fraction", 0.0, 1.0),
        ("optim.warmup_ratio", 0.0, 1.0),
        ("model.lora.dropout", 0.0, 1.0),
    ):
        value = _get(cfg, key)
        if not lo <= value < hi:  # NaN fails too
            raise ConfigError(f"{key}: must be in [{lo:g}, {hi:g}), got {value}")
    if cfg.loss.weights is not None and not all(math.isfinite(w) for w in cfg.loss.weights):
        raise ConfigError(f"loss.weights: must be finite numbers, got {cfg.loss.weights}")
    for name, value in cfg.loss.params.items():
        if not isinstance(value, str) and not math.isfinite(value):
            raise ConfigError(f"loss.params.{name}: must be a finite number, got {value}")


def _check_resume_setting(resume: str) -> None:
    """``auto | never | force`` or a checkpoint folder that exists (checked here, before any model loads)."""
    if resume in ("auto", "never", "force"):
        return
    path = Path(resume).expanduser()
    if not (path / "COMPLETE").is_file():  # preftune.checkpoint's marker of a complete checkpoint
        what = "is not a complete checkpoint folder" if path.is_dir() else "not found"
        raise ConfigError(
            f"train.resume: {resume} {what}; expected auto, never, force or a checkpoint folder "
            "(RUN/checkpoints/step-N)"
            f"{suggest(resume, ('auto', 'never', 'force')) if not path.exists() else ''}"
        )


def _validate_loss_options(cfg: Config) -> None:
    """WPO / LD-DPO / TR-DPO: the options that apply on top of a loss, and where they cannot."""
    from preftune.losses import ALL_LOSSES as LOSSES

    uses = {LOSSES[n].uses for n in cfg.loss.name}
    if cfg.loss.wpo_weighting and any(n.startswith("aot") for n in cfg.loss.name):
        raise ConfigError(
            "loss.wpo_weighting: AOT's terms are sorted quantiles, not pairs, so they cannot be "
            "weighted per pair"
        )
    if cfg.loss.ld_alpha is not None:
        if not 0.0 <= cfg.loss.ld_alpha <= 1.0:  # NaN fails too
            raise ConfigError(f"loss.ld_alpha: must be in [0, 1] or null, got {cfg.loss.ld_alpha}")
        if uses != {"sums"}:
            raise ConfigError(
                f"loss.ld_alpha: LD-DPO reweights summed log-probs; {cfg.loss.name} uses "
                "length-averaged ones"
            )
    sync = cfg.reference.sync
    if sync.mode != "none":
        if resolved_reference_strategy(cfg) != "copy":
            raise ConfigError(
                f"reference.sync.mode: {sync.mode} updates a reference copy; it needs "
                f"reference.strategy=copy, not {resolved_reference_strategy(cfg)}"
            )
        if not 0.0 < sync.alpha <= 1.0:
            raise ConfigError(f"reference.sync.alpha: must be in (0, 1], got {sync.alpha}")
        if sync.every < 1:
            raise ConfigError(f"reference.sync.every: must be >= 1, got {sync.every}")
