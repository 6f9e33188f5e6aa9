"""``preftune data``: check and describe a dataset the way training would read it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from preftune.cli._common import (
    add_command,
    existing_path,
)

__all__ = ["add_commands", "cmd_data"]


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
