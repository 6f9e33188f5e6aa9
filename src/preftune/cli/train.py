"""``preftune train`` (a YAML config with overrides), ``preftune plan`` (its memory plan, no training) and
``preftune demo`` (the built-in offline demo)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from preftune.cli._common import UsageError, add_command, existing_file

__all__ = ["add_commands", "cmd_demo", "cmd_plan", "cmd_train", "parse_sweep"]


def cmd_train(args: argparse.Namespace) -> int:
    from preftune.config import format_config, load_config

    cfg = load_config(existing_file(args.config, "config file"), args.overrides)
    if args.print_config:
        print(format_config(cfg))
        return 0
    from preftune.trainer import train

    result = train(cfg)  # TrainResult(output_dir, final_model_dir, last_checkpoint, steps, ...)
    if os.environ.get("RANK") not in (None, "0"):  # under torchrun, rank 0 alone reports
        return 0
    run_dir = Path(result.output_dir)
    final = result.final_model_dir
    print(f"trained {result.steps} steps; run folder: {run_dir}")
    print(f"final model: {final if final else '(not saved: train.save_final=false)'}")
    print(f"metrics:     {run_dir / 'metrics.jsonl'}  (plot: preftune plot {run_dir})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from preftune.config import load_config

    if args.devices is not None and args.devices < 1:
        raise UsageError(f"--devices: must be >= 1, got {args.devices}")
    if args.available_gib is not None and not args.available_gib > 0:
        raise UsageError(f"--available-gib: must be > 0, got {args.available_gib}")
    cfg = load_config(existing_file(args.config, "config file"), args.overrides)
    from preftune.plan import GIB, MEASURE, data_lengths, format_plan, plan_memory

    lengths = None
    if not args.no_data and (cfg.data.train_files or getattr(cfg.data, "sources", None)):
        lengths = data_lengths(cfg)
    available = MEASURE if args.available_gib is None else int(args.available_gib * GIB)
    plan = plan_memory(
        cfg, lengths=lengths, world_size=args.devices, device=args.device, available=available
    )
    print(format_plan(plan))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from preftune.demo import run_demo

    sweep: dict[str, list[float]] | None = None
    for item in args.sweep or []:
        sweep = {**(sweep or {}), **item}
    run_dir = run_demo(args.out, seed=args.seed, quick=args.quick, sweep=sweep)
    print(f"demo report: {run_dir}")
    return 0


def parse_sweep(text: str) -> dict[str, list[float]]:
    """``beta=0.05,0.1,0.5`` -> ``{"beta": [0.05, 0.1, 0.5]}``; argparse turns errors into usage errors."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", key) or not values.strip():
        raise argparse.ArgumentTypeError(
            f"expected KEY=V1,V2,... (e.g. beta=0.05,0.1,0.5), got {text!r}"
        )
    try:
        numbers = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"sweep values for '{key}' must be numbers separated by commas, got {values!r}"
        ) from None
    if not numbers:
        raise argparse.ArgumentTypeError(f"no values for '{key}' in {text!r}")
    return {key: numbers}


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "train",
        cmd_train,
        help="train from a YAML config with key.sub=value overrides",
        description="Train a policy from a YAML config; key.sub=value arguments override its fields.",
        example_lines="""
            preftune train configs/dpo.yaml
            preftune train configs/dpo.yaml loss.beta=0.05 optim.lr=1e-6 train.output_dir=runs/b005
            preftune train configs/dpo.yaml loss.name=[sigmoid,sft] loss.weights=[1.0,1.0]
            preftune train configs/dpo.yaml --print-config   # resolved config with field docs
            """,
    )
    p.add_argument("config", metavar="CONFIG.yaml", help="run config (see configs/)")
    p.add_argument(
        "overrides", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. loss.beta=0.05"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    p = add_command(
        sub,
        "plan",
        cmd_plan,
        help="memory plan of a config: per-device bytes, whether it fits, what would make it fit",
        description="Estimate what training a config holds per device (weights, gradients, optimizer "
        "state, reference, activations of the longest micro-batch, LM head) from the model's config and "
        "the data's token lengths, without loading weights; say whether it fits this machine's free "
        "memory (CUDA) or RAM (CPU), and the cheapest changes that would make it fit.",
        example_lines="""
            preftune plan configs/dpo.yaml model.path=models/my-0.5b-chat
            preftune plan configs/dpo.yaml --no-data                  # data.max_length's upper bound
            preftune plan configs/dpo.yaml --device cuda --devices 8 --available-gib 80 train.parallel=fsdp
            """,
    )
    p.add_argument("config", metavar="CONFIG.yaml", help="run config (see configs/)")
    p.add_argument(
        "overrides", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. train.batch_size=4"
    )
    p.add_argument(
        "--no-data",
        action="store_true",
        help="plan from data.max_length instead of the data's longest micro-batch",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), help="plan for this device (default: train.device)"
    )
    p.add_argument(
        "--devices", type=int, metavar="N", help="processes/GPUs (default: WORLD_SIZE or 1)"
    )
    p.add_argument(
        "--available-gib",
        type=float,
        metavar="GIB",
        help="memory per device to plan against (default: measured here)",
    )

    p = add_command(
        sub,
        "demo",
        cmd_demo,
        help="built-in offline demo: DPO on a tiny model, before/after report",
        description="Build (or reuse) a tiny model, sample preference pairs from it, train it with DPO "
        "and report the task reward before and after, with curves.",
        example_lines="""
            preftune demo
            preftune demo --out runs/demo --seed 1
            preftune demo --quick                          # shortened run (smoke test)
            preftune demo --sweep beta=0.05,0.1,0.5        # reward-vs-KL frontier over beta
            """,
    )
    p.add_argument(
        "--out", default="runs/demo", metavar="DIR", help="run folder (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    p.add_argument(
        "--sweep",
        type=parse_sweep,
        action="append",
        metavar="KEY=V1,V2,...",
        help="train one model per value and draw the reward-vs-KL frontier (repeatable)",
    )
