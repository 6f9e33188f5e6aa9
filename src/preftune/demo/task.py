"""The demo's synthetic task: multi-digit addition, scored by a program.

A prompt is ``"a+b="`` and the answer is the decimal sum, e.g. ``"37+512="`` -> ``"549"``. Addition is
checkable exactly, so the judge that ranks the model's own samples into chosen/rejected pairs (the DPO
paper's recipe) is a few lines instead of a learned reward model, and the headline number ("share of
correct answers") needs no explanation. Written most-significant digit first, the first answer digit
depends on every carry below it, which is what makes a tiny model imperfect at it.

Prompts are split into a *train* and a *held-out* bucket by a hash of the operands, so held-out
prompts are never seen in pre-training or in preference pairs, whatever seed draws them.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence

__all__ = [
    "DEFAULT_DIGITS",
    "HELDOUT_SEED",
    "digit_score",
    "heldout_prompts",
    "is_correct",
    "is_heldout",
    "make_prompt",
    "max_answer_chars",
    "parse_prompt",
    "reward",
    "rewards",
    "sample_prompts",
    "target",
]

DEFAULT_DIGITS = 3
"""Operands are drawn uniformly from ``0 .. 10**digits - 1``."""

HELDOUT_SEED = 20240601
"""Seed of the fixed held-out prompt set, so before/after numbers of different runs are comparable."""

_HELDOUT_BUCKETS = 10  # one operand pair in ten is held out
_PROMPT_RE = re.compile(r"^(\d+)\+(\d+)=$")


def make_prompt(a: int, b: int) -> str:
    """The prompt text for ``a + b``."""
    return f"{a}+{b}="


def parse_prompt(prompt: str) -> tuple[int, int]:
    """Operands of a prompt made by :func:`make_prompt`; ``ValueError`` on anything else."""
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(f"not an addition prompt: {prompt!r} (expected e.g. '12+345=')")
    return int(m.group(1)), int(m.group(2))


def target(prompt: str) -> str:
    """The one correct answer: the sum in canonical decimal (no sign, no leading zeros)."""
    a, b = parse_prompt(prompt)
    return str(a + b)


def max_answer_chars(digits: int = DEFAULT_DIGITS) -> int:
    """Longest correct answer for operands of ``digits`` digits (the sum may gain one digit)."""
    return digits + 1


def is_correct(prompt: str, answer: str) -> bool:
    """Exact match with the canonical sum. Surrounding whitespace is ignored, nothing else is."""
    return answer.strip() == target(prompt)


def digit_score(prompt: str, answer: str) -> float:
    """Partial credit in [0, 1]: share of right-aligned digit positions that match the sum.

    Divided by the longer of answer and target, so extra or missing digits cost credit; an answer that
    is not all digits scores 0. Used for smoother curves; the headline number is :func:`is_correct`.
    """
    answer, want = answer.strip(), target(prompt)
    if not answer.isdigit():
        return 0.0
    hits = sum(x == y for x, y in zip(reversed(answer), reversed(want)))
    return hits / max(len(answer), len(want))


def reward(prompt: str, answer: str, *, partial: bool = False) -> float:
    """The judge: 1.0 for the exact sum else 0.0, or :func:`digit_score` when ``partial``."""
    if partial:
        return digit_score(prompt, answer)
    return float(is_correct(prompt, answer))


def rewards(
    prompts: Sequence[str], answers: Sequence[str], *, partial: bool = False
) -> list[float]:
    """:func:`reward` over aligned lists."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    return [reward(p, a, partial=partial) for p, a in zip(prompts, answers)]


def is_heldout(a: int, b: int) -> bool:
    """Whether the operand pair belongs to the held-out bucket (a stable hash, independent of seeds)."""
    return zlib.crc32(f"{a}+{b}".encode()) % _HELDOUT_BUCKETS == 0


def sample_prompts(
    n: int, *, split: str, seed: int, digits: int = DEFAULT_DIGITS, unique: bool = True
) -> list[str]:
    """``n`` prompts from the ``"train"`` or ``"heldout"`` bucket, reproducible from ``seed``.

    ``unique`` draws without repetition (the default: pairs and evaluations want distinct prompts);
    pre-training streams use ``unique=False``.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want_heldout = split == "heldout"
    hi = 10**digits - 1
    capacity = (hi + 1) ** 2 // (_HELDOUT_BUCKETS if want_heldout else 1)
    if unique and n > capacity // 2:
        raise ValueError(f"{n} unique {split} prompts is too many for {digits}-digit operands")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    out: list[str] = []
    while len(out) < n:
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if is_heldout(a, b) != want_heldout or (unique and (a, b) in seen):
            continue
        seen.add((a, b))
        out.append(make_prompt(a, b))
    return out


def heldout_prompts(
    n: int = 500, *, seed: int = HELDOUT_SEED, digits: int = DEFAULT_DIGITS
) -> list[str]:
    """The fixed held-out evaluation prompts (same ``n``/``seed`` -> same list on every machine)."""
    return sample_prompts(n, split="heldout", seed=seed, digits=digits)
