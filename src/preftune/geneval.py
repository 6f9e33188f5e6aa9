"""Generation-based evaluation: sample answers on held-out prompts, judge them, compare with a reference.

For each decoding (``greedy``: one answer per prompt; ``sampled``: K answers at a temperature), over the
held-out prompts:

- ``pass_rate``: share of answers with a judge score of 1.0 or more (every rule passed; a 0/1 reward's
  successes); ``mean_score``: the mean judge score;
- ``win_rate``: answer k of the policy against answer k of the reference model for the same prompt and
  seed, under the same judge: 1 for a higher score, 0.5 for a tie, averaged (0.5 = no better);
- ``mean_words``, ``mean_tokens``, ``truncated``: answer length (length exploitation is a known DPO failure:
  a gain in pass rate should not come from shorter or longer answers alone) and the share cut at
  ``max_new_tokens``;
- ``kl``: the mean over the policy's answers of ``log π(y|x) − log π_ref(y|x)`` (nats per answer), from the
  sampled token ids. For answers drawn from π at temperature 1 this is an unbiased estimate of
  ``KL(π ‖ π_ref)``; at another temperature, or greedy, it is the log-ratio on the answers the policy gives.

Answers are written to ``out_dir`` (``<name>-<decoding>.jsonl``, resumable by :func:`preftune.sampling.
sample_to_file`), so a rerun reuses them and the reference's answers are sampled once.

:class:`TrainingGenEval` is the same eval at the eval points of ``preftune train`` (the ``geneval`` config
section): policy metrics only, answers under ``<run>/geneval/step-N/``, the training RNG and the policy's
train/eval mode left as they were.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from preftune.judges import judge_rows
from preftune.model import PaddedLayout
from preftune.pairs import read_samples
from preftune.sampling import HFGenerator, PromptRecord, SamplingSettings, sample_to_file

__all__ = [
    "TrainingGenEval",
    "answer_logps",
    "eval_decodings",
    "generation_eval",
    "sample_answers",
]


def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[PromptRecord],
    settings: SamplingSettings,
    path: Path,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict]:
    """The answers of ``model`` (a samples file at ``path``, resumed when it exists), read back."""
    model.eval()
    sample_to_file(
        HFGenerator(model, tokenizer, settings),
        tokenizer,
        prompts,
        path,
        settings,
        batch_size=batch_size,
        progress=progress,
    )
    return sorted(read_samples(path), key=lambda r: r["index"])


@torch.no_grad()
def answer_logps(
    model: Any, tokenizer: Any, rows: list[dict], *, chat: bool, batch_size: int = 16
) -> list[list[float]]:
    """``log π(y | x)`` of every answer of every row (summed over the sampled ids, EOS included).

    Each answer is forwarded once: two answers of the same prompt go in as the chosen and rejected rows of
    one pair (a prompt's odd answer out is paired with itself). ``batch_size``: pairs per forward."""
    from preftune.sampling import _prompt_ids

    layout = PaddedLayout(pad_token_id=tokenizer.pad_token_id, chunk_size=1024)
    module = layout.module(model)
    model.eval()
    examples, where = [], []  # where: (row, answer of the chosen side, answer of the rejected side)
    for r, row in enumerate(rows):
        prompt_ids = _prompt_ids(tokenizer, row["prompt"], chat)
        ids = row["completion_ids"]
        for k in range(0, len(ids), 2):
            j = k + 1 if k + 1 < len(ids) else k
            examples.append(
                {"prompt_ids": prompt_ids, "chosen_ids": ids[k], "rejected_ids": ids[j]}
            )
            where.append((r, k, j))
    out: list[list[float]] = [[0.0] * len(row["completion_ids"]) for row in rows]
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = layout.collate(examples[start : start + batch_size]).to(device)
        logps = layout.logps(module, batch)
        values = zip(logps.chosen_logps.tolist(), logps.rejected_logps.tolist())
        for (r, k, j), (chosen, rejected) in zip(where[start : start + batch_size], values):
            out[r][k], out[r][j] = chosen, rejected
    return out


def _words(text: str) -> int:
    return len(re.findall(r"\w+(?:['’]\w+)*", text))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def eval_decodings(
    *, chat: bool, max_new_tokens: int, samples: int, temperature: float, seed: int
) -> dict[str, SamplingSettings]:
    """A generation eval's decodings: ``greedy`` (one answer per prompt) and, with ``samples`` > 0,
    ``sampled`` (``samples`` answers per prompt at ``temperature``, seeded by ``seed``)."""
    greedy = SamplingSettings(
        num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0, chat=chat
    )
    decodings = {"greedy": greedy}
    if samples:
        decodings["sampled"] = replace(
            greedy, num_samples=samples, temperature=temperature, seed=seed
        )
    return decodings


def generation_eval(
    policy: Any,
    tokenizer: Any,
    prompts: list[PromptRecord],
    judge: Any,
    *,
    decodings: dict[str, SamplingSettings],
    out_dir: Path,
    reference: Any = None,
    reference_dir: Path | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, float]:
    """The metrics of the module docstring, ``<decoding>/<metric>``, for each of ``decodings``.

    ``reference``: the reference model (win rate and KL; None: policy metrics only); its answers are kept in
    ``reference_dir`` (default ``out_dir``), so a loop samples them once for all rounds.
    """
    out_dir, reference_dir = Path(out_dir), Path(reference_dir or out_dir)
    metrics: dict[str, float] = {}
    kl_rows: dict[str, list[dict]] = {}  # decoding -> the policy's answers, for one pooled KL pass
    for name, settings in decodings.items():
        # The model against itself (a loop's round 0): its answers are the reference's, kept for later.
        same = reference is policy
        who = "reference" if same else "policy"
        rows = sample_answers(
            policy, tokenizer, prompts, replace(settings, model=who),
            (reference_dir if same else out_dir) / f"{who}-{name}.jsonl",
            batch_size=batch_size, progress=progress,
        )  # fmt: skip
        judged = judge_rows(judge, rows)
        answers = [c for row in rows for c in row["completions"]]
        scores = [s for row in rows for s in row["scores"] if s is not None]
        m = {
            "pass_rate": judged.pass_rate,
            "mean_score": judged.mean_score,
            "mean_words": _mean([_words(a) for a in answers]),
            "mean_tokens": _mean([t for row in rows for t in row["completion_tokens"]]),
            "truncated": _mean(
                [float(f == "length") for row in rows for f in row["finish_reasons"]]
            ),
            "answers": float(len(answers)),
            "judge_failures": float(judged.failed_samples),
        }
        if not scores:
            m["pass_rate"] = m["mean_score"] = float("nan")
        if same:  # the same answers, a log-ratio of 0
            m["win_rate"], m["kl"] = 0.5, 0.0
        elif reference is not None:
            ref_rows = sample_answers(
                reference, tokenizer, prompts, replace(settings, model="reference"),
                reference_dir / f"reference-{name}.jsonl", batch_size=batch_size, progress=progress,
            )  # fmt: skip
            judge_rows(judge, ref_rows)
            wins = []
            for row, ref_row in zip(rows, ref_rows):
                for s, r in zip(row["scores"], ref_row["scores"]):
                    if s is not None and r is not None:
                        wins.append(1.0 if s > r else 0.5 if s == r else 0.0)
            m["win_rate"] = _mean(wins)
            kl_rows[name] = rows
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
    for name, ratios in _log_ratios(policy, reference, tokenizer, kl_rows, decodings, batch_size):
        metrics[f"{name}/kl"] = _mean(ratios)
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}


def _log_ratios(policy, reference, tokenizer, kl_rows, decodings, batch_size):
    """``(decoding, [log π − log π_ref per answer])``: the answers of every decoding of a prompt pooled, so
    that they pair up in :func:`answer_logps` (greedy + 2 sampled: 2 pairs per prompt instead of 3)."""
    by_chat: dict[bool, list[str]] = {}
    for name in kl_rows:
        by_chat.setdefault(decodings[name].chat, []).append(name)
    for chat, names in by_chat.items():
        pooled = []
        for rows in zip(*(kl_rows[n] for n in names), strict=True):
            if len({r["index"] for r in rows}) != 1:
                raise ValueError("generation eval: the decodings' answer files hold other prompts")
            ids = [a for r in rows for a in r["completion_ids"]]
            pooled.append({"prompt": rows[0]["prompt"], "completion_ids": ids})
        pol = answer_logps(policy, tokenizer, pooled, chat=chat, batch_size=batch_size)
        ref = answer_logps(reference, tokenizer, pooled, chat=chat, batch_size=batch_size)
        ratios = {n: [] for n in names}
        for i, (ps, qs) in enumerate(zip(pol, ref)):
            k = 0
            for n in names:
                count = len(kl_rows[n][i]["completion_ids"])
                ratios[n].extend(p - q for p, q in zip(ps[k : k + count], qs[k : k + count]))
                k += count
        yield from ratios.items()


class TrainingGenEval:
    """The ``geneval`` section of a run: prompts read and judge loaded at construction (before any model
    loads, so that a bad file or judge fails in seconds), then ``self(model, tokenizer, step)`` at each eval
    point returns ``geneval/<decoding>/<metric>``."""

    def __init__(self, spec: Any, run_dir: Path):
        from preftune.judges import load_judge
        from preftune.sampling import read_prompts

        self.spec, self.out = spec, Path(run_dir) / "geneval"
        self.judge = load_judge(spec.judge)
        self.prompts = read_prompts(spec.prompts)

    def __call__(self, model: Any, tokenizer: Any, step: int) -> dict[str, float]:
        spec = self.spec
        decodings = eval_decodings(
            chat=bool(getattr(tokenizer, "chat_template", None)), max_new_tokens=spec.max_new_tokens,
            samples=spec.samples, temperature=spec.temperature, seed=spec.seed,
        )  # fmt: skip
        was_training = model.training
        # Sampling draws from its own seeded generators; fork_rng keeps a stray draw off the training stream.
        devices = (
            [model.device] if getattr(model, "device", None) and model.device.type == "cuda" else []
        )
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                metrics = generation_eval(
                    model, tokenizer, self.prompts, self.judge, decodings=decodings,
                    out_dir=self.out / f"step-{step}", batch_size=spec.batch_size,
                )  # fmt: skip
        finally:
            model.train(was_training)
        return {f"geneval/{k}": v for k, v in metrics.items()}
