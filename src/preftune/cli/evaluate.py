"""``preftune eval``: score a model on preference pairs (implicit-reward accuracy, margins, log-probs), or,
with ``--judge`` and ``--prompts``, by generation (the same as ``preftune geneval``).

The command's wiring lives here: a run's parts built from paths (:func:`evaluate_model`), then the metric
maths of :func:`preftune.evaluation.evaluate`, the same loss and reduction as in training.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from preftune.cli._common import (
    UsageError,
    add_command,
    existing_path,
    model_source,
    quiet_transformers,
)
from preftune.cli.onpolicy import add_generation_eval_options, cmd_geneval

__all__ = ["add_commands", "cmd_eval", "evaluate_model"]

#: The loss scored with a reference; ``--beta`` defaults to its registry default (stated once, in losses/).
_LOSS = "sigmoid"


def evaluate_model(
    model: str,
    data_file: str,
    *,
    ref: str | None,
    beta: float,
    batch_size: int,
    max_length: int,
    loss: str = _LOSS,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """Implicit-reward accuracy and margins of ``model`` against ``ref`` on ``data_file``'s pairs.

    ``model`` and ``ref`` are model folders, .gguf files, Hub ids or LoRA adapter folders. Without a
    reference there is no implicit reward: the row holds the model's log-probs (summed and per-token
    averaged) and ``avg_logp_accuracy``, the share of pairs whose chosen response has the higher mean
    per-token log-prob.
    """
    from preftune.build import build_objective, build_tokenizer
    from preftune.config import Config
    from preftune.data import load_preference_data
    from preftune.evaluation import evaluate
    from preftune.model import choose_layout, load_model, resolve_device, resolve_source
    from preftune.reference import CopyReference

    cfg = Config()
    cfg.model.path = model
    cfg.model.trust_remote_code = trust_remote_code
    cfg.data.train_files = [data_file]
    cfg.data.max_length = max_length
    cfg.data.max_prompt_length = max_length // 2
    cfg.loss.name = [loss if ref else "simpo"]
    cfg.loss.beta = beta
    if not ref:
        cfg.loss.params = {"gamma_beta_ratio": 0.0}
    device = resolve_device("auto")
    tokenizer = build_tokenizer(cfg)
    data = load_preference_data(cfg.data, tokenizer)
    policy_model = load_model(
        resolve_source(model, setting="--model"), device=device, trust_remote_code=trust_remote_code
    )
    ref_model = None
    if ref:
        ref_model = load_model(
            resolve_source(ref, setting="--ref"), device=device, trust_remote_code=trust_remote_code
        )
    others = [ref_model] if ref_model is not None else []
    layout = choose_layout(
        policy_model,
        *others,
        pad_token_id=tokenizer.pad_token_id,
        chunk_size=cfg.train.chunk_size,
        check_determinism=False,  # eval mode: dropout is inactive whatever its settings
    )
    reference = CopyReference(ref_model, layout, copy=False) if ref_model is not None else None
    row = evaluate(
        layout.module(policy_model),
        reference,
        data.train,
        layout,
        build_objective(cfg),
        batch_size=batch_size,
        device=device,
        split="train",
    )
    row["pairs"] = float(len(data.train))
    if not ref:  # SimPO with γ = 0 compared β·mean log-probs: say what that measured
        row["avg_logp_accuracy"] = row.pop("rewards/accuracies")
        for key in [k for k in row if k.startswith("rewards/") or k == "loss"]:
            row.pop(key)
    return row


def cmd_eval(args: argparse.Namespace) -> int:
    generation = [f"--{k}" for k in ("prompts", "judge", "out") if getattr(args, k)]
    if generation:
        if args.data:
            raise UsageError(
                f"--data scores preference pairs, {' '.join(generation)} evaluates by generation: "
                "give one of the two"
            )
        missing = [f"--{k}" for k in ("prompts", "judge", "out") if not getattr(args, k)]
        if missing:
            raise UsageError(
                f"a generation eval needs --prompts FILE, --judge SPEC and --out DIR; missing {', '.join(missing)}"
            )
        if args.batch_size is None:
            args.batch_size = 16
        return cmd_geneval(args)
    if not args.data:
        raise UsageError(
            "give --data FILE (preference pairs) or --prompts FILE --judge SPEC --out DIR (generation)"
        )
    if args.batch_size is None:
        args.batch_size = 8
    model = model_source(args.model, "--model")
    ref = model_source(args.ref, "--ref") if args.ref else None
    data_file = existing_path(args.data, "data file")
    beta = _default_beta() if args.beta is None else args.beta
    if beta <= 0:
        raise UsageError(f"--beta must be > 0, got {beta}")
    quiet_transformers()
    metrics = evaluate_model(
        args.model,
        str(data_file),
        ref=args.ref,
        beta=beta,
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
    print(f"data:  {data_file}  (beta={beta})")
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


def _default_beta() -> float:
    """The DPO loss's β from the loss registry (imported lazily: ``--help`` must not import torch)."""
    from preftune.losses import LOSSES

    return float(LOSSES[_LOSS].defaults["beta"])


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "eval",
        cmd_eval,
        help="implicit-reward accuracy, margins and log-probs on a preference file",
        description="Score a model on preference pairs (--data). With --ref, rewards are beta * (log "
        "pi - log pi_ref) and accuracy is the share of pairs whose chosen reward is higher; without "
        "it, the policy's log-probs and avg_logp_accuracy (the share of pairs whose chosen response "
        "has the higher mean per-token log-prob). With --prompts, --judge and --out instead, evaluate "
        "by generation, as preftune geneval does: judge pass rate or mean score, greedy and sampled, "
        "and with --ref the win rate against the reference's answers and the KL to it. "
        "--model/--ref take folders, .gguf files, Hub ids and LoRA adapter folders.",
        example_lines="""
            preftune eval --model runs/dpo/final --ref models/Qwen2.5-0.5B-Instruct --data test.jsonl
            preftune eval --model runs/dpo/final --data test.jsonl --json
            preftune eval --model runs/dpo/final --ref models/base --judge rules: \\
                --prompts heldout.jsonl --out runs/geneval
            """,
    )
    p.add_argument(
        "--model", required=True, metavar="MODEL", help="model folder, .gguf file or Hub id"
    )
    p.add_argument("--ref", metavar="MODEL", help="reference model (default: none)")
    p.add_argument("--data", metavar="FILE", help="preference data file")
    p.add_argument(
        "--beta",
        type=float,
        help=f"reward scale beta, with --ref (default: the {_LOSS} loss's default beta)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="pairs per batch (default: 8), or prompts per generation batch (default: 16)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=1024,
        metavar="N",
        help="max tokens per prompt+response (default: 1024)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_generation_eval_options(p.add_argument_group("generation eval"), required=False)
