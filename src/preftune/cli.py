"""Command line: ``preftune train | demo | data | eval | generate | plot``.

Every heavy import (torch, transformers, the trainer) happens inside the subcommand that needs it, so that
``preftune --help`` answers at once.

Exit codes: 0 success; 2 usage, config or data error (one line ``preftune: error: ...`` on stderr, no
traceback); 1 a failure during training (message and the last checkpoint); 130 interrupted.
``PREFTUNE_DEBUG=1`` re-raises instead, with the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from preftune.config import ConfigError

__all__ = ["UsageError", "build_parser", "main", "parse_sweep"]

PROG = "preftune"


class UsageError(Exception):
    """A bad command line or input path: reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """Raises UsageError instead of printing usage and exiting, so that main() owns the message format."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _fmt(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip("\n"), "  ")


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


# ---------------------------------------------------------------------------------------------------
# Subcommands


def cmd_train(args: argparse.Namespace) -> int:
    from preftune.config import format_config, load_config

    cfg = load_config(_existing_file(args.config, "config file"), args.overrides)
    if args.print_config:
        print(format_config(cfg))
        return 0
    from preftune.trainer import train

    result = train(cfg)  # TrainResult(output_dir, final_model_dir, last_checkpoint, steps, ...)
    run_dir = Path(_first_attr(result, "output_dir") or cfg.train.output_dir)
    final = _first_attr(result, "final_model_dir")
    print(f"trained {_first_attr(result, 'steps')} steps; run folder: {run_dir}")
    print(f"final model: {final if final else '(not saved: train.save_final=false)'}")
    print(f"metrics:     {run_dir / 'metrics.jsonl'}  (plot: preftune plot {run_dir})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from preftune.demo import run_demo

    sweep: dict[str, list[float]] | None = None
    for item in args.sweep or []:
        sweep = {**(sweep or {}), **item}
    run_dir = run_demo(args.out, seed=args.seed, quick=args.quick, sweep=sweep)
    print(f"demo report: {run_dir}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from preftune.config import Config, apply_overrides, load_config, validate

    target = _existing_path(args.target, "config or data file")
    if target.suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(target, args.overrides)
    else:
        cfg = Config()
        cfg.data.train_files = [str(target)]
        cfg = apply_overrides(cfg, args.overrides)
        validate(cfg)
    tok_dir = args.tokenizer or cfg.model.tokenizer_path or cfg.model.path
    if not tok_dir:
        raise UsageError("no tokenizer: pass --tokenizer DIR (or model.path=DIR)")
    from preftune.describe import describe_dataset, format_description

    tokenizer = _load_tokenizer(tok_dir, trust_remote_code=cfg.model.trust_remote_code)
    d = describe_dataset(cfg, tokenizer, examples=args.examples)
    print(format_description(d))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model_dir = _model_dir(args.model)
    ref_dir = _model_dir(args.ref) if args.ref else None
    data_file = _existing_path(args.data, "data file")
    if args.beta <= 0:
        raise UsageError(f"--beta must be > 0, got {args.beta}")
    from transformers.utils import logging as hf_logging

    from preftune.evaluation import evaluate_model

    hf_logging.disable_progress_bar()
    metrics = evaluate_model(
        str(model_dir),
        str(data_file),
        ref_dir=str(ref_dir) if ref_dir else None,
        beta=args.beta,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    if args.json:
        print(json.dumps({k: _jsonable(v) for k, v in metrics.items()}, indent=2))
        return 0
    print(f"model: {model_dir}")
    print(f"ref:   {ref_dir or '(none: rewards are beta * mean per-token log-prob, as in SimPO)'}")
    print(f"data:  {data_file}  (beta={args.beta})")
    print(_table(metrics))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    model_dir = _model_dir(args.model)
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        from preftune.generation import read_prompts

        try:
            prompts = read_prompts(_existing_file(args.prompts, "prompts file"))
        except ValueError as e:
            raise UsageError(str(e)) from e
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from transformers.utils import logging as hf_logging

    from preftune.generation import generate, load_for_generation

    hf_logging.disable_progress_bar()  # no "Loading weights" bar around a few lines of output
    try:
        model, tokenizer = load_for_generation(model_dir)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a model from {model_dir}: {e}") from e
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"the tokenizer in {model_dir} has no chat template; drop --chat")
    completions = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
        batch_size=args.batch_size,
    )
    for i, (prompt, completion) in enumerate(zip(prompts, completions), 1):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
        else:
            print(f"=== prompt {i} ===\n{prompt}\n=== completion {i} ===\n{completion}\n")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    run_dir = _existing_path(args.run_dir, "run folder")
    _existing_file(run_dir / "metrics.jsonl", "metrics file")
    from preftune.tracking import plot_run

    try:
        png = plot_run(run_dir, Path(args.out) if args.out else None)
    except ValueError as e:  # e.g. a metrics file without any rows
        raise UsageError(str(e)) from e
    print(png)
    return 0


# ---------------------------------------------------------------------------------------------------
# Helpers


def _existing_path(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} not found: {p}")
    return p


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    p = _existing_path(path, what)
    if not p.is_file():
        raise UsageError(f"{what} is not a file: {p}")
    return p


def _model_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"model folder not found: {p}")
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise UsageError(f"not a Hugging Face model folder (no config.json): {p}")
    return p


def _load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"tokenizer folder not found: {p}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(p), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a tokenizer from {p}: {e}") from e


def _first_attr(obj: Any, *names: str) -> Any:
    for name in names:
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


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


# ---------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        formatter_class=_fmt,
        description="Preference tuning (DPO and its family) for Hugging Face causal LMs.",
        epilog=_examples(
            """
            preftune demo                                  # offline demo, about 3 minutes on CPU
            preftune data configs/dpo.yaml                 # check and describe the data
            preftune train configs/dpo.yaml loss.beta=0.05 # train with an override
            preftune plot runs/dpo                         # curves of a run to a PNG
            """
        )
        + "\n\nexit codes: 0 ok, 1 training failed, 2 usage/config/data error, 130 interrupted."
        "\nPREFTUNE_DEBUG=1 shows tracebacks.",
    )
    from preftune import __version__

    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "train",
        help="train from a YAML config with key.sub=value overrides",
        formatter_class=_fmt,
        description="Train a policy from a YAML config; key.sub=value arguments override its fields.",
        epilog=_examples(
            """
            preftune train configs/dpo.yaml
            preftune train configs/dpo.yaml loss.beta=0.05 optim.lr=1e-6 train.output_dir=runs/b005
            preftune train configs/dpo.yaml loss.name=[sigmoid,sft] loss.weights=[1.0,1.0]
            preftune train configs/dpo.yaml --print-config   # resolved config with field docs
            """
        ),
    )
    p.add_argument("config", metavar="CONFIG.yaml", help="run config (see configs/)")
    p.add_argument(
        "overrides", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. loss.beta=0.05"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "demo",
        help="built-in offline demo: DPO on a tiny model, before/after report",
        formatter_class=_fmt,
        description="Build (or reuse) a tiny model, sample preference pairs from it, train it with DPO "
        "and report the task reward before and after, with curves.",
        epilog=_examples(
            """
            preftune demo
            preftune demo --out runs/demo --seed 1
            preftune demo --quick                          # shortened run (smoke test)
            preftune demo --sweep beta=0.05,0.1,0.5        # reward-vs-KL frontier over beta
            """
        ),
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
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "data",
        help="validate and describe a dataset without training",
        formatter_class=_fmt,
        description="Load, tokenize and check a preference dataset the way training would; report rows "
        "kept and dropped (per reason), token-length percentiles, padding share at the configured "
        "batch size, and a few rendered examples with the response in ⟦brackets⟧.",
        epilog=_examples(
            """
            preftune data configs/dpo.yaml
            preftune data configs/dpo.yaml data.max_length=2048 train.batch_size=16
            preftune data pairs.jsonl --tokenizer models/Qwen2.5-0.5B-Instruct --examples 5
            """
        ),
    )
    p.add_argument("target", metavar="CONFIG.yaml|DATAFILE", help="a run config or a data file")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer folder (default: the config's model)"
    )
    p.add_argument(
        "--examples", type=int, default=3, metavar="N", help="examples to render (default: 3)"
    )
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "eval",
        help="implicit-reward accuracy, margins and log-probs on a preference file",
        formatter_class=_fmt,
        description="Score a model on preference pairs. With --ref, rewards are beta * (log pi - log "
        "pi_ref) and accuracy is the share of pairs whose chosen reward is higher; without it, only "
        "the policy's log-probs are reported.",
        epilog=_examples(
            """
            preftune eval --model runs/dpo/final --ref models/Qwen2.5-0.5B-Instruct --data test.jsonl
            preftune eval --model runs/dpo/final --data test.jsonl --json
            """
        ),
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model folder to evaluate")
    p.add_argument("--ref", metavar="DIR", help="reference model folder (default: none)")
    p.add_argument("--data", required=True, metavar="FILE", help="preference data file")
    p.add_argument("--beta", type=float, default=0.1, help="reward scale beta (default: 0.1)")
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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "generate",
        help="generate completions for prompts (greedy or sampled)",
        formatter_class=_fmt,
        description="Generate with a local model folder on CPU (fp32), batched with left padding. "
        "Temperature 0 is greedy; otherwise sampling with --temperature and --top-p. EOS and other "
        "settings come from the model's generation_config.",
        epilog=_examples(
            """
            preftune generate --model runs/dpo/final --prompt "Write a haiku about rain." --chat
            preftune generate --model runs/dpo/final --prompts prompts.txt --temperature 0.7 --top-p 0.9
            preftune generate --model runs/dpo/final --prompts prompts.jsonl --json   # JSONL {prompt, completion}
            """
        ),
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one prompt")
    src.add_argument(
        "--prompts", metavar="FILE", help="prompts file: one per line (.txt) or JSONL with 'prompt'"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default: 64")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--chat", action="store_true", help="wrap prompts with the chat template")
    p.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="prompts per batch (default: 8)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "plot",
        help="training/eval curves of a run folder to a PNG",
        formatter_class=_fmt,
        description="Plot loss, reward accuracy, margins and chosen/rejected log-probs from a run's "
        "metrics.jsonl.",
        epilog=_examples(
            """
            preftune plot runs/dpo
            preftune plot runs/dpo --out dpo-curves.png
            """
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder with metrics.jsonl")
    p.add_argument("--out", metavar="PNG", help="output file (default: RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # `train cfg.yaml --print-config a=1`: argparse leaves overrides after an option unparsed.
    if extras and hasattr(args, "overrides") and all(_OVERRIDE.match(x) for x in extras):
        args.overrides = [*args.overrides, *extras]
        extras = []
    if extras:
        where = f"{PROG} {args.command}" if args.command else PROG
        raise UsageError(f"unrecognized arguments: {' '.join(extras)} (see '{where} --help')")
    return args


# ---------------------------------------------------------------------------------------------------
# Entry point


def _error_kind(exc: BaseException) -> str | None:
    """'usage' (exit 2), 'training' (exit 1) or None (a bug: let the traceback through)."""
    if isinstance(exc, (UsageError, ConfigError, FileNotFoundError)):
        return "usage"
    # DataError / TrainingError can only have been raised if their module was imported.
    data = sys.modules.get("preftune.data")
    if data is not None and isinstance(exc, getattr(data, "DataError", ())):
        return "usage"
    trainer = sys.modules.get("preftune.trainer")
    if trainer is not None and isinstance(exc, getattr(trainer, "TrainingError", ())):
        return "training"
    return None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename}"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("PREFTUNE_DEBUG", "") not in ("", "0")
    try:
        try:
            args = _parse(argv)
        except SystemExit as e:  # --help / --version
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        kind = _error_kind(exc)
        if kind is None or debug:
            raise
        if kind == "usage":
            print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"{PROG}: training failed: {_one_line(exc)}", file=sys.stderr)
        ckpt = getattr(exc, "last_checkpoint", None)
        if ckpt is not None:
            print(f"last checkpoint: {ckpt} (resume with train.resume=auto)", file=sys.stderr)
        else:
            print("no checkpoint was saved", file=sys.stderr)
        return 1
