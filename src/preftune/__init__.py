"""preftune: preference tuning (DPO and its family) for Hugging Face causal LMs.

The public Python API (imported lazily, so that ``preftune --help`` stays fast)::

    from preftune import Config, load_config, train, LOSSES, compute_loss

``train(config, overrides, model=..., tokenizer=..., train_data=..., eval_data=..., callbacks=...)`` takes
a config (object, dict or YAML path) and, where a user has them, objects in memory (:mod:`preftune.api`);
callbacks watch every optimizer step (:mod:`preftune.callbacks`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: name -> module that defines it
_PUBLIC = {
    "Config": "preftune.config",
    "ConfigError": "preftune.config",
    "load_config": "preftune.config",
    "config_from_dict": "preftune.config",
    "train": "preftune.api",
    "TrainResult": "preftune.trainer",
    "TrainingError": "preftune.trainer",
    "LOSSES": "preftune.losses",
    "UNPAIRED_LOSSES": "preftune.losses",
    "LossOutput": "preftune.losses",
    "compute_loss": "preftune.losses",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'preftune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
