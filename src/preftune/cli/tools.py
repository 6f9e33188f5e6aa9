"""``preftune generate`` (completions from a model folder) and ``preftune plot`` (a run's curves)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from preftune.cli._common import (
    UsageError,
    add_command,
    existing_file,
    existing_path,
    model_source,
    quiet_transformers,
    usage_errors,
)

__all__ = ["add_commands", "cmd_generate", "cmd_plot"]


def cmd_generate(args: argparse.Namespace) -> int:
    source = model_source(args.model, "--model")
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        from preftune.generation import read_prompts

        with usage_errors(ValueError):
            prompts = read_prompts(existing_file(args.prompts, "prompts file"))
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from preftune.generation import generate, load_for_generation

    quiet_transformers()
    model, tokenizer = load_for_generation(source)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"the tokenizer of {source} has no chat template; drop --chat")
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
    run_dir = existing_path(args.run_dir, "run folder")
    existing_file(run_dir / "metrics.jsonl", "metrics file")
    from preftune.tracking import plot_run

    with usage_errors(ValueError):  # e.g. a metrics file without any rows
        png = plot_run(run_dir, Path(args.out) if args.out else None)
    print(png)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "generate",
        cmd_generate,
        help="generate completions for prompts (greedy or sampled)",
        description="Generate with a local model folder on CPU (fp32), batched with left padding. "
        "Temperature 0 is greedy; otherwise sampling with --temperature and --top-p. EOS and other "
        "settings come from the model's generation_config.",
        example_lines="""
            preftune generate --model runs/dpo/final --prompt "Write a haiku about rain." --chat
            preftune generate --model runs/dpo/final --prompts prompts.txt --temperature 0.7 --top-p 0.9
            preftune generate --model runs/dpo/final --prompts prompts.jsonl --json   # JSONL {prompt, completion}
            """,
    )
    p.add_argument(
        "--model", required=True, metavar="MODEL", help="model folder, .gguf file or Hub id"
    )
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

    p = add_command(
        sub,
        "plot",
        cmd_plot,
        help="training/eval curves of a run folder to a PNG",
        description="Plot loss, reward accuracy, margins and chosen/rejected log-probs from a run's "
        "metrics.jsonl.",
        example_lines="""
            preftune plot runs/dpo
            preftune plot runs/dpo --out dpo-curves.png
            """,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder with metrics.jsonl")
    p.add_argument("--out", metavar="PNG", help="output file (default: RUN_DIR/curves.png)")
