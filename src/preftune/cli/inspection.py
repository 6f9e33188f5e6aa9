"""``preftune data`` (check and describe a dataset) and ``preftune eval`` (score a model on pairs)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from preftune.cli._common import (
    UsageError,
    add_command,
    existing_path,
    model_source,
    quiet_transformers,
)

__all__ = ["add_commands", "cmd_data", "cmd_eval"]


def cmd_data(args: argparse.Namespace) -> int:
    from preftune.config import Config, apply_overrides, load_config, validate
    from preftune.data.hub import looks_like_hub_id

    target = Path(args.target)
    if target.suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(existing_path(target, "config file"), args.overrides)
    else:
        if not (looks_like_hub_id(args.target) and not target.exists()):
            existing_path(target, "config or data file")
        cfg = Config()
        cfg.data.train_files = [args.target]
        cfg = apply_overrides(cfg, args.overrides)
        if not any(o.strip().startswith("loss.name") for o in args.overrides) and (
            cfg.data.unpair or cfg.data.shape == "unpaired"
        ):
            cfg.loss.name = ["kto"]  # a data file read as unpaired rows: described for KTO
        validate(cfg)
    if args.tokenizer:
        cfg.model.tokenizer_path = args.tokenizer
    if not (cfg.model.tokenizer_path or cfg.model.path):
        return _check_without_tokenizer(cfg)
    from preftune.build import build_tokenizer
    from preftune.describe import describe_dataset, format_description

    tokenizer = build_tokenizer(cfg)
    d = describe_dataset(cfg, tokenizer, examples=args.examples)
    print(format_description(d))
    return 0


def _check_without_tokenizer(cfg: Any) -> int:
    """Validate every record (schema, shapes, bad rows); a bad row or file is an error after the report."""
    from preftune.data import DataError
    from preftune.describe import check_dataset, format_check

    d = check_dataset(cfg)
    print(format_check(d))
    problems = [f["error"] for f in d["files"] if f["error"]]  # each names its file
    if d["bad"]:
        problems.append(f"{d['bad']} bad rows (first: {d['bad_rows'][0]})")
    if problems:
        raise DataError("; ".join(problems))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model = model_source(args.model, "--model")
    ref = model_source(args.ref, "--ref") if args.ref else None
    data_file = existing_path(args.data, "data file")
    if args.beta <= 0:
        raise UsageError(f"--beta must be > 0, got {args.beta}")
    from preftune.evaluation import evaluate_model

    quiet_transformers()
    metrics = evaluate_model(
        args.model,
        str(data_file),
        ref=args.ref,
        beta=args.beta,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    if args.json:
        print(json.dumps({k: _jsonable(v) for k, v in metrics.items()}, indent=2))
        return 0
    print(f"model: {model}")
    print(
        f"ref:   {ref or '(none: no implicit reward; avg_logp_accuracy = share of pairs whose chosen '}"
        f"{'' if ref else 'response has the higher mean per-token log-prob)'}"
    )
    print(f"data:  {data_file}  (beta={args.beta})")
    print(_table(metrics))
    return 0


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _table(metrics: dict[str, Any]) -> str:
    width = max((len(k) for k in metrics), default=6)
    rows = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    for key, value in metrics.items():
        value = _jsonable(value)
        if key == "pairs" and isinstance(value, float) and value.is_integer():
            value = int(value)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        rows.append(f"{key:<{width}}  {shown:>12}")
    return "\n".join(rows)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "data",
        cmd_data,
        help="validate and describe a dataset without training",
        description="Load, tokenize and check a preference dataset the way training would; report rows "
        "kept and dropped (per reason), rows per source after mixing, token-length percentiles, padding "
        "share at the configured batch size, and a few rendered examples with the response in "
        "⟦brackets⟧. Without a tokenizer, validate every record instead: schema, shapes, bad rows "
        "(file, line, field) and character-length percentiles (exit 2 if any row is bad).",
        example_lines="""
            preftune data pairs.jsonl
            preftune data configs/dpo.yaml
            preftune data configs/dpo.yaml data.max_length=2048 train.batch_size=16
            preftune data pairs.jsonl --tokenizer models/Qwen2.5-0.5B-Instruct --examples 5
            HF_HUB_OFFLINE=1 preftune data org/name --tokenizer models/Qwen2.5-0.5B-Instruct
            """,
    )
    p.add_argument(
        "target",
        metavar="CONFIG.yaml|DATAFILE|ORG/NAME",
        help="a run config, a data file or a Hub dataset id",
    )
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer folder, .gguf file or Hub id (default: the config's model)",
    )
    p.add_argument(
        "--examples", type=int, default=3, metavar="N", help="examples to render (default: 3)"
    )

    p = add_command(
        sub,
        "eval",
        cmd_eval,
        help="implicit-reward accuracy, margins and log-probs on a preference file",
        description="Score a model on preference pairs. With --ref, rewards are beta * (log pi - log "
        "pi_ref) and accuracy is the share of pairs whose chosen reward is higher; without it, the "
        "policy's log-probs and avg_logp_accuracy (the share of pairs whose chosen response has the "
        "higher mean per-token log-prob). --model/--ref take folders, .gguf files, Hub ids and LoRA "
        "adapter folders.",
        example_lines="""
            preftune eval --model runs/dpo/final --ref models/Qwen2.5-0.5B-Instruct --data test.jsonl
            preftune eval --model runs/dpo/final --data test.jsonl --json
            """,
    )
    p.add_argument(
        "--model", required=True, metavar="MODEL", help="model folder, .gguf file or Hub id"
    )
    p.add_argument("--ref", metavar="MODEL", help="reference model (default: none)")
    p.add_argument("--data", required=True, metavar="FILE", help="preference data file")
    p.add_argument(
        "--beta", type=float, default=0.1, help="reward scale beta, with --ref (default: 0.1)"
    )
    p.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="pairs per batch (default: 8)"
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=1024,
        metavar="N",
        help="max tokens per prompt+response (default: 1024)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
