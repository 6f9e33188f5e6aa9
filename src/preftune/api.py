"""The Python API: train from a notebook with a config (object, dict or YAML) and the objects a user has.

```python
from preftune import load_config, train

cfg = load_config("configs/dpo.yaml", ["loss.beta=0.05", "train.output_dir=runs/nb"])
result = train(cfg, model=model, tokenizer=tokenizer, train_data=pairs)   # pairs: a list of dicts
print(result.final_model_dir, result.final_eval)
```

In-memory data (a ``datasets.Dataset`` or a list of dicts in any shape preftune reads) is written once to a
content-addressed file under the cache (``$PREFTUNE_CACHE/inline/``) and read from there like any file: the
same validation, tokenization cache, drop counts and run fingerprint (a resumed run checks that the data
is the same). An in-memory model is used as is (converted to fp32 master weights when it is not);
its weights' hash stands for it in the run's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune.callbacks import Callback
from preftune.config import Config, config_from_dict, load_config, validate
from preftune.trainer import TrainResult

__all__ = ["train"]


def _as_config(config: Config | Mapping | str | Path | None, overrides: Sequence[str]) -> Config:
    from preftune.config import apply_overrides

    if isinstance(config, Config):
        cfg = apply_overrides(config, overrides) if overrides else config
        validate(cfg)
        return cfg
    if isinstance(config, Mapping):
        cfg = apply_overrides(config_from_dict(dict(config)), overrides)
        validate(cfg)
        return cfg
    return load_config(config, overrides)


def _materialize(rows: Any, cache_dir: str | None, split: str) -> str:
    """In-memory rows -> a file preftune reads, named by its content (written once, atomically)."""
    from preftune.build import cache_root

    folder = cache_root(cache_dir) / "inline"
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(rows, "to_parquet") and hasattr(rows, "_fingerprint"):  # a datasets.Dataset
        path = folder / f"{split}-{rows._fingerprint}.parquet"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            rows.to_parquet(str(tmp))
            tmp.replace(path)
        return str(path)
    if not isinstance(rows, Iterable) or isinstance(rows, (str, bytes, Mapping)):
        raise TypeError(
            f"{split}_data: expected a datasets.Dataset or a list of dicts, got {type(rows).__name__}"
        )
    text = "".join(json.dumps(dict(r), ensure_ascii=False, default=str) + "\n" for r in rows)
    path = folder / f"{split}-{hashlib.sha256(text.encode()).hexdigest()[:32]}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return str(path)


def train(
    config: Config | Mapping | str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train a policy and return the :class:`~preftune.trainer.TrainResult` (run folder, final model folder,
    last checkpoint, steps, final eval metrics).

    Args:
        config: a :class:`Config`, a nested dict, a YAML path, or None (the defaults).
        overrides: ``"section.key=value"`` strings applied on top (as on the command line).
        model: a transformers ``PreTrainedModel`` to train instead of loading ``model.path``.
        tokenizer: its tokenizer (needed with ``model`` unless ``model.path`` / ``tokenizer_path`` name one).
        train_data, eval_data: a ``datasets.Dataset`` or a list of dicts (pairs, conversations, unpaired
            rows...) instead of ``data.train_files`` / ``data.eval_files``.
        callbacks: :class:`preftune.callbacks.Callback` objects whose ``on_step_end(step, metrics, batch)``
            runs after every optimizer step (timing, watching metrics, which pairs formed a step).
    """
    cfg = _as_config(config, overrides)
    if model is not None and tokenizer is None and not (cfg.model.tokenizer_path or cfg.model.path):
        raise ValueError("train: a model given in memory needs its tokenizer (tokenizer=...)")
    if train_data is not None:
        cfg.data.train_files = [_materialize(train_data, cfg.data.cache_dir, "train")]
    if eval_data is not None:
        cfg.data.eval_files = [_materialize(eval_data, cfg.data.cache_dir, "eval")]
        cfg.data.eval_fraction = 0.0
    validate(cfg)
    from preftune import trainer

    return trainer.train(cfg, model=model, tokenizer=tokenizer, callbacks=callbacks)
