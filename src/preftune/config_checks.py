"""Checks of a run configuration (:class:`preftune.config.Config`): what a key may hold and the cross-field
rules (a reference-free loss with a reference configured, ...), each raising :class:`ConfigError` naming the
keys involved; and the names other tools use, hinted (`KEY_HINTS`: a ``model.lora.rank`` suggests
``model.lora.r``) or resolved (`LOSS_ALIASES`: ``loss.name=dpo`` is sigmoid).

Moved out of :mod:`preftune.config`, which imports everything here and is where to import from; so this
module does not import it, and a config is typed ``Any`` below.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from preftune._configio import ConfigError, suggest
from preftune.data.spec import FORMAT_CHOICES, SHAPE_CHOICES, check_data, check_examples
from preftune.loopspec import check_geneval, check_loop

__all__ = ["KEY_HINTS", "LOSS_ALIASES", "resolved_reference_strategy", "validate"]

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


def _resolve_aliases(cfg: Any) -> Any:
    for i, name in enumerate(cfg.loss.name):
        if name in LOSS_ALIASES:
            cfg.loss.name[i] = LOSS_ALIASES[name]
            log.info("loss.name: %r is an alias of %r", name, LOSS_ALIASES[name])
    return cfg


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


def _get(cfg: Any, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def resolved_reference_strategy(cfg: Any) -> str:
    """The reference strategy after ``auto``: none for reference-free losses, adapter with LoRA, else copy."""
    from preftune.losses import ALL_LOSSES as LOSSES

    needs_ref = any(LOSSES[n].needs_reference for n in cfg.loss.name if n in LOSSES)
    strategy = cfg.reference.strategy
    if strategy != "auto":
        return strategy
    if not needs_ref:
        return "none"
    return "adapter" if cfg.model.lora.enabled else "copy"


def validate(cfg: Any) -> None:
    """Cross-field checks; raise ConfigError naming the keys involved. Loss aliases are resolved first."""
    _resolve_aliases(cfg)
    check_data(cfg.data)
    check_loop(cfg.loop)
    check_geneval(cfg.geneval)
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
    ("train.keep_logits_mb", 0, True, False),
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


def _check_ranges(cfg: Any) -> None:
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


def _validate_loss_options(cfg: Any) -> None:
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
