"""On-policy data: ``preftune sample`` (K answers per prompt), ``preftune judge`` (score them) and
``preftune pairs`` (best against worst, ready for ``preftune train``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from preftune.cli._common import (
    UsageError,
    add_command,
    existing_file,
    model_source,
    quiet_transformers,
)

__all__ = [
    "add_commands",
    "add_generation_eval_options",
    "cmd_geneval",
    "cmd_judge",
    "cmd_pairs",
    "cmd_sample",
]


def _usage(exc: BaseException) -> UsageError:
    return UsageError(" ".join(str(exc).split()))


def cmd_sample(args: argparse.Namespace) -> int:
    from preftune.sampling import SamplingError, SamplingSettings, read_prompts, sample_to_file

    source = model_source(args.model, "--model")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    settings = SamplingSettings(
        model=args.model,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        backend=args.backend,
    )
    try:
        settings.check()  # before minutes of model loading
        prompts = read_prompts(args.prompts, column=args.prompt_column)
        quiet_transformers()
        from preftune.model import load_tokenizer

        tokenizer = load_tokenizer(source)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        chat = {"auto": has_template, "on": True, "off": False}[args.chat]
        if chat and not has_template:
            raise SamplingError(f"--chat on: the tokenizer of {source} has no chat template")
        if not chat and any(not isinstance(p.prompt, str) for p in prompts):
            what = (
                "--chat off" if has_template else f"the tokenizer of {source} has no chat template"
            )
            raise SamplingError(f"prompts hold chat messages, but {what}")
        settings = SamplingSettings(**{**settings.__dict__, "chat": chat})
        if args.backend == "vllm":
            from preftune.sampling import VLLMGenerator

            generator = VLLMGenerator(source, tokenizer, settings)
        else:
            from preftune.generation import load_for_generation
            from preftune.sampling import HFGenerator

            model, tokenizer = load_for_generation(source)
            generator = HFGenerator(model, tokenizer, settings)
        report = sample_to_file(
            generator,
            tokenizer,
            prompts,
            args.out,
            settings,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except SamplingError as e:
        raise _usage(e) from e
    if report.written == 0:
        print(f"{args.out}: all {report.prompts} prompts already sampled")
    else:
        print(
            f"{args.out}: {report.written} prompts x {settings.num_samples} samples written "
            f"({report.already_done} were already there); {report.tokens} tokens in "
            f"{report.seconds:.1f} s ({report.tokens_per_s:.1f} tokens/s); "
            f"{report.truncated} cut at --max-new-tokens"
        )
    return 0


def _judge(spec: str, rows: list[dict], args: argparse.Namespace):
    from preftune.judges import JudgeError, judge_rows, load_judge

    if args.judge_batch_size < 1:
        raise UsageError(f"--judge-batch-size must be >= 1, got {args.judge_batch_size}")
    try:
        judge = load_judge(spec, device=args.device, batch_size=args.judge_batch_size)
    except JudgeError as e:
        raise _usage(e) from e
    report = judge_rows(judge, rows, progress=not args.no_progress)
    if report.failures and report.failed_samples == report.samples:
        # Nothing scored: a broken judge (or spec), not a bad sample: stop before writing anything.
        index, _, why = report.failures[0]
        raise UsageError(f"judge {spec!r} failed on every sample (prompt {index}: {why})")
    for index, k, why in report.failures[:10]:
        where = f"prompt {index}" + (f", sample {k}" if k is not None else " (every sample)")
        print(f"preftune: judge failed on {where}: {why}", file=sys.stderr)
    if len(report.failures) > 10:
        print(f"preftune: ... and {len(report.failures) - 10} more failures", file=sys.stderr)
    line = (
        f"judged {report.samples} samples of {report.prompts} prompts ({spec}): "
        f"mean score {report.mean_score:.4g}, score >= 1: {100 * report.pass_rate:.1f} %"
    )
    if report.failed_samples:
        line += f"; {report.failed_samples} samples not scored (judge failed, skipped)"
    return report, line


def cmd_judge(args: argparse.Namespace) -> int:
    from preftune.pairs import read_samples, write_jsonl

    rows = read_samples(existing_file(args.samples, "samples file"))
    _, line = _judge(args.judge, rows, args)
    out = args.out or args.samples
    write_jsonl(rows, out)
    print(f"{line} -> {out}")
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    from preftune.pairs import make_pairs, read_samples, write_jsonl

    if not (args.margin >= 0 and math.isfinite(args.margin)):
        raise UsageError(f"--margin must be a number >= 0, got {args.margin}")
    rows = read_samples(existing_file(args.samples, "samples file"))
    if args.judge:
        print(_judge(args.judge, rows, args)[1])
    elif not any("scores" in row for row in rows):
        raise UsageError(
            f"{args.samples} has no scores: run 'preftune judge {args.samples} --judge SPEC' "
            "first, or pass --judge SPEC"
        )
    pairs, report = make_pairs(
        rows,
        mode=args.mode,
        margin=args.margin,
        weight=args.weight,
        keep_truncated=args.keep_truncated,
    )
    if not pairs:
        raise UsageError(f"no pairs: {report.summary()}")
    write_jsonl(pairs, args.out)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report.__dict__, f, indent=2)
    print(f"{report.summary()} -> {args.out}")
    return 0


def cmd_loop(args: argparse.Namespace) -> int:
    from preftune.config import load_config

    cfg = load_config(existing_file(args.config, "config file"), args.overrides)
    from preftune.loop import run_loop

    root = run_loop(cfg)
    print(f"loop report: {root / 'loop_report.md'}")
    print(f"final model: {root / f'round-{cfg.loop.rounds}' / 'run' / 'final'}")
    return 0


def cmd_geneval(args: argparse.Namespace) -> int:
    """``preftune geneval``: sample on held-out prompts, judge, compare with a reference model."""

    if args.samples < 0:
        raise UsageError(f"--samples must be >= 0, got {args.samples}")
    try:
        from preftune.geneval import eval_decodings, generation_eval
        from preftune.judges import load_judge
        from preftune.model import load_model, load_tokenizer, resolve_device, resolve_source
        from preftune.sampling import read_prompts

        judge = load_judge(args.judge)
        prompts = read_prompts(args.prompts)
    except ValueError as e:
        raise _usage(e) from None
    device = resolve_device("auto")
    source = resolve_source(args.model, setting="--model")
    tokenizer = load_tokenizer(source)
    policy = load_model(source, device=device).eval()
    reference = (
        load_model(resolve_source(args.ref, setting="--ref"), device=device).eval()
        if args.ref
        else None
    )
    decodings = eval_decodings(
        chat=bool(getattr(tokenizer, "chat_template", None)) and args.chat != "off",
        max_new_tokens=args.max_new_tokens, samples=args.samples, temperature=args.temperature,
        seed=args.seed,
    )  # fmt: skip
    metrics = generation_eval(
        policy, tokenizer, prompts, judge, decodings=decodings, out_dir=Path(args.out),
        reference=reference, batch_size=args.batch_size, progress=not args.no_progress,
    )  # fmt: skip
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        width = max(len(k) for k in metrics)
        for key, value in metrics.items():
            print(f"{key:<{width}}  {value:.4f}")
    return 0


def _judge_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--judge",
        required=required,
        metavar="SPEC",
        help="python:MODULE:FUNCTION | reward-model:PATH_OR_HUB_ID | rules:[COLUMN]",
    )
    p.add_argument("--device", default="auto", help="reward model device (default: auto)")
    p.add_argument(
        "--judge-batch-size", type=int, default=16, metavar="N", help="reward model batch size"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "sample",
        cmd_sample,
        help="sample K answers per prompt from a model (resumable JSONL)",
        description="Sample K completions per prompt: batched, left-padded, KV-cached, prompts sorted "
        "by length. Prompts: a 'prompt' column (strings or chat messages) of any data file preftune "
        "reads. A killed run continues where it stopped, and writes the same file as an "
        "uninterrupted one; a sample depends on (seed, prompt index, sample number), not on the "
        "batch (up to float rounding).",
        example_lines="""
            preftune sample --model models/chat --prompts prompts.jsonl --out samples.jsonl -k 8
            preftune sample --model model.gguf --prompts p.parquet --out s.jsonl --temperature 0.7 --top-p 0.9
            """,
    )
    p.add_argument("--model", required=True, help="model folder, .gguf file or Hub id")
    p.add_argument("--prompts", required=True, nargs="+", metavar="FILE", help="data file(s)")
    p.add_argument("--out", required=True, metavar="JSONL", help="samples file (appended)")
    p.add_argument("-k", "--num-samples", type=int, default=4, metavar="K", help="default: 4")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="default: 1.0 (off)")
    p.add_argument("--top-k", type=int, default=0, help="default: 0 (off)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default: 128")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument(
        "--chat", choices=("auto", "on", "off"), default="auto", help="chat template (auto: if any)"
    )
    p.add_argument("--prompt-column", default="prompt", metavar="NAME", help="default: prompt")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="prompts per batch, K rows each (default: 8)",
    )
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="default: hf")
    p.add_argument("--overwrite", action="store_true", help="start the output file afresh")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add_command(
        sub,
        "judge",
        cmd_judge,
        help="score the samples of a samples file with a judge",
        description="Score every completion of a samples file (higher is better) and write the scores "
        "into it ('scores', one per completion; null where the judge failed, which is reported and "
        "skipped).",
        example_lines="""
            preftune judge samples.jsonl --judge rules:
            preftune judge samples.jsonl --judge python:my_rewards:exact_answer --out scored.jsonl
            preftune judge samples.jsonl --judge reward-model:models/rm
            """,
    )
    p.add_argument("samples", metavar="SAMPLES", help="preftune sample output")
    p.add_argument("--out", metavar="JSONL", help="write here (default: SAMPLES, in place)")
    _judge_options(p, required=True)

    p = add_command(
        sub,
        "pairs",
        cmd_pairs,
        help="scored samples -> preference pairs for preftune train",
        description="Pair the best with the worst sample of each prompt (or every pair above a "
        "margin); ties, all-equal prompts and truncated answers are dropped and counted.",
        example_lines="""
            preftune pairs samples.jsonl --out pairs.jsonl
            preftune pairs samples.jsonl --judge rules: --mode all --margin 0.25 --weight --out pairs.jsonl
            preftune train configs/dpo.yaml data.train_files=[pairs.jsonl]
            """,
    )
    p.add_argument("samples", metavar="SAMPLES", help="samples file with scores (or use --judge)")
    p.add_argument("--out", required=True, metavar="JSONL", help="pair file")
    p.add_argument("--mode", choices=("best-worst", "all"), default="best-worst")
    p.add_argument("--margin", type=float, default=0.0, help="keep pairs with a score gap > this")
    p.add_argument("--weight", action="store_true", help="a 'weight' column = the score margin")
    p.add_argument(
        "--keep-truncated", action="store_true", help="pair answers cut at max_new_tokens too"
    )
    p.add_argument("--report", metavar="JSON", help="counts per drop reason as JSON")
    _judge_options(p, required=False)

    p = add_command(
        sub,
        "loop",
        cmd_loop,
        help="iterative on-policy DPO: rounds of sample, judge, pairs, train, evaluate",
        description="Run (or continue) loop.rounds rounds from a config: each round samples "
        "loop.samples answers per prompt from the current policy, judges them (loop.judge), trains "
        "on best-vs-worst pairs (a normal run folder), and evaluates on loop.eval_prompts by "
        "generation. A killed loop continues where it stopped. Writes loop_report.md and rounds.png.",
        example_lines="""
            preftune loop examples/smollm2_rules/loop.yaml
            preftune loop loop.yaml loop.rounds=3 loop.samples=12
            """,
    )
    p.add_argument("config", metavar="CONFIG.yaml", help="run config with a loop section")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")

    p = add_command(
        sub,
        "geneval",
        cmd_geneval,
        help="generation-based eval: pass rate, win rate, length and KL on held-out prompts",
        description="Sample answers (greedy, and --samples per prompt at --temperature) on held-out "
        "prompts, score them with a judge, and with --ref compare against the reference model's "
        "answers (win rate under the same judge, KL to the reference on the model's answers).",
        example_lines="""
            preftune geneval --model runs/loop/round-2/run/final --ref models/base \\
                --prompts heldout.jsonl --judge rules: --samples 4 --out runs/geneval
            """,
    )
    p.add_argument(
        "--model", required=True, help="model folder, .gguf file, Hub id or adapter folder"
    )
    p.add_argument("--ref", help="reference model (win rate and KL); default: none")
    add_generation_eval_options(p, required=True)
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="default: 16")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_generation_eval_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """The options of a generation-based eval, shared by ``preftune geneval`` and ``preftune eval --judge``."""
    p.add_argument(
        "--prompts", required=required, nargs="+", metavar="FILE", help="held-out prompts"
    )
    p.add_argument(
        "--judge", required=required, metavar="SPEC", help="rules: | python:M:F | reward-model:P"
    )
    p.add_argument(
        "--out", required=required, metavar="DIR", help="answers are kept here (resumable)"
    )
    p.add_argument("--samples", type=int, default=4, help="sampled answers per prompt (default: 4)")
    p.add_argument("--temperature", type=float, default=0.8, help="default: 0.8")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default: 64")
    p.add_argument("--seed", type=int, default=1, help="sampling seed (default: 1)")
    p.add_argument(
        "--chat", choices=("auto", "off"), default="auto", help="apply the chat template"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
