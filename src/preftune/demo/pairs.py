"""Preference pairs the DPO-paper way: sample the base model's own answers, let the judge rank them.

For each training prompt we draw ``samples_per_prompt`` answers from the model at ``temperature``,
score them with :func:`preftune.demo.task.reward`, and pair a best-scoring answer (chosen) with a
strictly worse one (rejected). Prompts where every sample scores the same (all right or all wrong) give
no pair; they are counted and reported, because their share says whether the base model is in the
useful "sometimes right" regime. Pairs are written as JSONL rows ``{"prompt", "chosen", "rejected"}``
(plain text, no special tokens: the data loader adds BOS/EOS like for any other dataset).

    python -m preftune.demo.pairs --model DIR --out pairs.jsonl --prompts 512 --split train --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

from preftune.demo import task
from preftune.demo.sampling import generate_answers, load_model_and_tokenizer

__all__ = ["build_pairs", "judge_pairs", "main", "make_pairs_file", "write_pairs"]


def judge_pairs(
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    *,
    seed: int = 0,
    max_pairs_per_prompt: int = 1,
    partial: bool = False,
) -> tuple[list[dict], dict]:
    """Turn sampled answers into pairs; returns ``(pairs, stats)``.

    Chosen is drawn from the distinct answers with the highest reward, rejected from the distinct
    non-empty answers with a strictly lower one (an empty answer is wrong too, but some loaders drop
    empty responses). Up to ``max_pairs_per_prompt`` distinct (chosen, rejected) combinations per prompt.
    ``stats`` counts prompts, pairs, the sample accuracy and the prompts without a pair, by reason.
    """
    rng = random.Random(seed)
    pairs: list[dict] = []
    stats = {
        "prompts": len(prompts),
        "pairs": 0,
        "all_correct": 0,
        "all_wrong": 0,
        "no_pair_other": 0,
    }
    n_samples = n_right = 0
    for prompt, samples in zip(prompts, answers, strict=True):
        scores = {a: task.reward(prompt, a, partial=partial) for a in samples}
        right = [task.is_correct(prompt, a) for a in samples]
        n_samples += len(samples)
        n_right += sum(right)
        best = max(scores.values())
        chosen = sorted(a for a, s in scores.items() if s == best)
        rejected = sorted(a for a, s in scores.items() if s < best and a.strip())
        if not rejected:
            reason = (
                "all_correct" if all(right) else "all_wrong" if not any(right) else "no_pair_other"
            )
            stats[reason] += 1
            continue
        combos = [(c, r) for c in chosen for r in rejected]
        for c, r in rng.sample(combos, min(max_pairs_per_prompt, len(combos))):
            pairs.append({"prompt": prompt, "chosen": c, "rejected": r})
    stats["pairs"] = len(pairs)
    stats["no_pair"] = stats["all_correct"] + stats["all_wrong"] + stats["no_pair_other"]
    stats["sample_accuracy"] = n_right / max(n_samples, 1)
    return pairs, stats


def build_pairs(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    samples_per_prompt: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    max_pairs_per_prompt: int = 1,
    partial: bool = False,
    seed: int = 0,
    batch_size: int = 512,
) -> tuple[list[dict], dict]:
    """Sample answers from ``model`` and judge them (:func:`judge_pairs`); ``stats`` adds timings."""
    if (
        max_new_tokens is None
    ):  # room for the longest right answer + EOS; a longer answer is wrong anyway
        max_new_tokens = max(len(task.target(p)) for p in prompts) + 1
    t0 = time.perf_counter()
    answers = generate_answers(
        model,
        tokenizer,
        prompts,
        num_samples=samples_per_prompt,
        do_sample=True,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    sample_seconds = time.perf_counter() - t0
    pairs, stats = judge_pairs(
        prompts, answers, seed=seed, max_pairs_per_prompt=max_pairs_per_prompt, partial=partial
    )
    stats |= {
        "samples_per_prompt": samples_per_prompt,
        "temperature": temperature,
        "sample_seconds": round(sample_seconds, 2),
    }
    return pairs, stats


def write_pairs(pairs: Sequence[dict], path: str | Path) -> Path:
    """Write pairs as JSONL (one ``{"prompt", "chosen", "rejected"}`` object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")
    return path


def make_pairs_file(
    model_dir: str | Path,
    out_path: str | Path,
    *,
    n_prompts: int = 512,
    split: str = "train",
    prompt_seed: int = 0,
    digits: int = task.DEFAULT_DIGITS,
    **kwargs,
) -> dict:
    """Draw ``n_prompts`` prompts of ``split``, build pairs from ``model_dir``, write JSONL; returns stats.

    ``kwargs`` go to :func:`build_pairs` (``samples_per_prompt``, ``temperature``, ``seed``, ...).
    """
    model, tokenizer = load_model_and_tokenizer(model_dir)
    prompts = task.sample_prompts(n_prompts, split=split, seed=prompt_seed, digits=digits)
    pairs, stats = build_pairs(model, tokenizer, prompts, **kwargs)
    write_pairs(pairs, out_path)
    return stats | {"path": str(out_path), "split": split}


def main(argv: list[str] | None = None) -> int:
    """Command-line wrapper around :func:`make_pairs_file`; prints the stats as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder to sample from")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--prompts", type=int, default=512, help="number of distinct prompts")
    p.add_argument("--split", choices=["train", "heldout"], default="train")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt draw")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and pair choice")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-pairs-per-prompt", type=int, default=1)
    a = p.parse_args(argv)
    stats = make_pairs_file(
        a.model,
        a.out,
        n_prompts=a.prompts,
        split=a.split,
        prompt_seed=a.prompt_seed,
        seed=a.seed,
        samples_per_prompt=a.samples_per_prompt,
        temperature=a.temperature,
        max_pairs_per_prompt=a.max_pairs_per_prompt,
    )
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
