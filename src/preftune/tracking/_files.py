"""Files and formatting shared by the tracking modules: atomic JSON, metrics.jsonl reading, the metrics line."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
#: Metric key of the training throughput (tokens per second, all ranks).
TOKENS_PER_S = "tokens_per_s"
TOKS_KEYS = (TOKENS_PER_S, "tokens/s", "tokens_per_second")


def _scalar(v: Any) -> Any:
    """A plain Python number from a float/int/0-d tensor/numpy scalar; other values pass through."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, str)) or v is None:
        return v
    if hasattr(v, "item"):
        return v.item()
    return v


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "item") and getattr(o, "ndim", 0) == 0:
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    import dataclasses

    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_json(path: str | Path, obj: Any, *, indent: int = 2) -> Path:
    """Write JSON atomically (temporary file, fsync, rename): a kill never leaves a half file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _fmt(v: float, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else str(v)


def _first(metrics: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((metrics[k] for k in keys if k in metrics), None)


def format_line(step: int, metrics: Mapping[str, Any]) -> str:
    """A compact human line: ``step 120 | loss 0.6931 | acc 0.50 | margin 0.012 | logps c -45.2 r -47.8 | ...``.

    Only the metrics present are shown; keys may carry an ``eval/`` prefix.
    """
    m = {k.removeprefix("eval/"): _scalar(v) for k, v in metrics.items()}
    parts = [f"step {step}"]
    if "loss" in m:
        parts.append(f"loss {_fmt(m['loss'], '.4f')}")
    if "rewards/accuracies" in m:
        parts.append(f"acc {_fmt(m['rewards/accuracies'], '.2f')}")
    if "rewards/margins" in m:
        parts.append(f"margin {_fmt(m['rewards/margins'], '.3g')}")
    if "logps/chosen" in m and "logps/rejected" in m:
        c, r = _fmt(m["logps/chosen"], ".1f"), _fmt(m["logps/rejected"], ".1f")
        parts.append(f"logps c {c} r {r}")
    if "grad_norm" in m:
        parts.append(f"grad {_fmt(m['grad_norm'], '.3g')}")
    if "learning_rate" in m:
        parts.append(f"lr {_fmt(m['learning_rate'], '.2e')}")
    for decoding in ("greedy", "sampled"):
        if f"geneval/{decoding}/pass_rate" in m:
            parts.append(f"pass {decoding} {_fmt(m[f'geneval/{decoding}/pass_rate'], '.3f')}")
    toks = _first(m, TOKS_KEYS)
    if toks is not None:
        parts.append(f"{_fmt(toks, '.0f')} tok/s")
    return " | ".join(parts)


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (optionally one split); blank or half-written lines skipped."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and (split is None or row.get("split") == split):
            rows.append(row)
    return rows
