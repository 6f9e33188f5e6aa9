"""Scored samples -> preference pairs that ``preftune train`` reads as they are (``preftune pairs``).

Which samples take part: those with a score (a judge failure leaves ``None``: ``unscored``) and, unless
``keep_truncated``, those that ended with EOS: a completion cut at ``max_new_tokens`` would, as the chosen
answer, teach the model to stop mid-sentence (training appends EOS or the template's end of turn), so
those are left out (``truncated``). Excluded samples are counted per reason in ``excluded_samples``.

Pairing, per prompt:

- ``best-worst`` (default): the best against the worst sample, kept when ``best - worst > margin``. Among
  tied best (or tied worst) samples the first one (lowest sample number) is taken: samples are i.i.d.,
  so this picks neither the shorter nor the longer one (length exploitation is the known DPO failure).
- ``all``: every pair ``(i, j)`` with ``score_i - score_j > margin``, in sample order.

Prompts without a pair are counted once per reason in ``drops``: ``no_scores`` (no usable sample),
``single_sample``, ``all_equal`` (every usable sample scored the same: nothing to learn),
``below_margin`` (scores differ, but by no more than the margin), ``identical_text`` (the two texts are
the same, so a stochastic judge scored one answer twice). In ``all`` mode the candidate pairs left out of
a prompt that does give pairs are counted in ``pair_drops`` (``tied``, ``below_margin``,
``identical_text``).

Output shape follows how the prompts were sampled: with the chat template (``settings.chat``) a
conversational row (``prompt`` as messages, a string prompt as one user message; ``chosen``/``rejected``
one assistant message each), else a standard row of strings. Extra columns ``index``, ``chosen_score``,
``rejected_score``, and ``weight`` (the score margin) when asked (train with
``data.weight_column=weight``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DROP_REASONS", "MODES", "PairsReport", "make_pairs", "read_samples", "write_jsonl"]

MODES = ("best-worst", "all")
DROP_REASONS = ("no_scores", "single_sample", "all_equal", "below_margin", "identical_text")


@dataclass
class PairsReport:
    prompts: int = 0
    pairs: int = 0
    prompts_with_pairs: int = 0
    drops: dict[str, int] = field(default_factory=dict)  # prompts, per reason
    pair_drops: dict[str, int] = field(default_factory=dict)  # candidate pairs (mode "all")
    excluded_samples: dict[str, int] = field(default_factory=dict)  # unscored, truncated, empty
    chosen_tokens: float = float("nan")  # mean completion tokens of chosen / rejected answers:
    rejected_tokens: float = float("nan")  # a large gap means the judge rewards length

    def summary(self) -> str:
        def show(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in d.items() if v) or "none"

        text = (
            f"{self.pairs} pairs from {self.prompts_with_pairs} of {self.prompts} prompts; "
            f"prompts dropped: {show(self.drops)}; samples excluded: {show(self.excluded_samples)}"
        )
        if any(self.pair_drops.values()):
            text += f"; pairs left out: {show(self.pair_drops)}"
        if self.pairs:
            text += f"; mean tokens chosen {self.chosen_tokens:.1f} / rejected {self.rejected_tokens:.1f}"
        return text


def _usable(row: dict, keep_truncated: bool, excluded: Counter) -> list[int]:
    scores = row.get("scores") or [None] * len(row["completions"])
    reasons = row.get("finish_reasons") or ["stop"] * len(row["completions"])
    keep = []
    for k, score in enumerate(scores):
        if score is None:
            excluded["unscored"] += 1
        elif reasons[k] == "length" and not keep_truncated:
            excluded["truncated"] += 1
        elif not row["completions"][k].strip():  # an empty answer is no response to train on
            excluded["empty"] += 1
        else:
            keep.append(k)
    return keep


def _pair_row(row: dict, i: int, j: int, weight: bool) -> dict:
    scores, texts = row["scores"], row["completions"]
    prompt = row["prompt"]
    if (row.get("settings") or {}).get("chat", False):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        out = {
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": texts[i]}],
            "rejected": [{"role": "assistant", "content": texts[j]}],
        }
    else:
        out = {"prompt": prompt, "chosen": texts[i], "rejected": texts[j]}
    out |= {"index": row["index"], "chosen_score": scores[i], "rejected_score": scores[j]}
    if weight:
        out["weight"] = scores[i] - scores[j]
    return out


def make_pairs(
    rows: Sequence[dict],
    *,
    mode: str = "best-worst",
    margin: float = 0.0,
    weight: bool = False,
    keep_truncated: bool = False,
) -> tuple[list[dict], PairsReport]:
    """Pairs of scored sample rows (``scores`` written by a judge) and what was dropped, per reason."""
    if mode not in MODES:
        raise ValueError(f"pairs mode {mode!r} is not one of {', '.join(MODES)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    report = PairsReport(prompts=len(rows))
    drops, pair_drops, excluded = Counter(), Counter(), Counter()
    pairs: list[dict] = []
    lengths: list[tuple[int, int]] = []
    for row in sorted(rows, key=lambda r: r["index"]):  # sampled longest first; pairs in file order
        keep = _usable(row, keep_truncated, excluded)
        scores, texts = row.get("scores"), row["completions"]
        if not keep:
            drops["no_scores"] += 1
            continue
        if len(keep) == 1:
            drops["single_sample"] += 1
            continue
        values = [scores[k] for k in keep]
        if max(values) == min(values):
            drops["all_equal"] += 1
            continue
        reasons: Counter = Counter()
        if mode == "best-worst":
            best = max(keep, key=lambda k: (scores[k], -k))  # ties: the first sample
            worst = min(keep, key=lambda k: (scores[k], k))
            candidates = [(best, worst)]
        else:
            candidates = [(i, j) for i in keep for j in keep if scores[i] > scores[j]]
            reasons["tied"] = sum(
                1 for a, i in enumerate(keep) for j in keep[a + 1 :] if scores[i] == scores[j]
            )
        found: list[tuple[int, int]] = []
        for i, j in candidates:
            if scores[i] - scores[j] <= margin:
                reasons["below_margin"] += 1
            elif texts[i] == texts[j]:
                reasons["identical_text"] += 1
            else:
                found.append((i, j))
        if not found:
            # The prompt's reason: identical texts only when no candidate failed on the margin.
            drops["below_margin" if reasons["below_margin"] else "identical_text"] += 1
            continue
        pair_drops.update(reasons)
        report.prompts_with_pairs += 1
        tokens = row.get("completion_tokens") or [0] * len(texts)
        for i, j in found:
            pairs.append(_pair_row(row, i, j, weight))
            lengths.append((tokens[i], tokens[j]))
    report.pairs = len(pairs)
    report.drops = {r: drops[r] for r in DROP_REASONS}
    report.excluded_samples = {r: excluded[r] for r in ("unscored", "truncated", "empty")}
    if mode == "all":
        report.pair_drops = {r: pair_drops[r] for r in ("tied", "below_margin", "identical_text")}
    if lengths:
        report.chosen_tokens = sum(c for c, _ in lengths) / len(lengths)
        report.rejected_tokens = sum(r for _, r in lengths) / len(lengths)
    return pairs, report


def read_samples(path: str | Path) -> list[dict]:
    """Rows of a samples file (``preftune sample`` output); DataError names the line."""
    from preftune.data.errors import DataError

    path, rows = Path(path), []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not line.endswith("\n"):
                raise DataError(
                    f"{path}, line {lineno}: incomplete last line (a sampling run still going, or "
                    "killed? run preftune sample again to finish it)"
                )
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}, line {lineno}: malformed JSON ({e})") from None
            comps = row.get("completions") if isinstance(row, dict) else None
            if (
                not isinstance(comps, list)
                or not all(isinstance(c, str) for c in comps)
                or not isinstance(row.get("index"), int)
                or "prompt" not in row
                or not _per_sample(row.get("scores"), comps, (int, float, type(None)))
                or not _per_sample(row.get("finish_reasons"), comps, str)
            ):
                raise DataError(
                    f"{path}, line {lineno}: not a samples line (expected index, prompt, a list of "
                    "completions and, if present, one score and finish reason per completion, as "
                    "preftune sample and preftune judge write them)"
                )
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no samples")
    return rows


def _per_sample(values, completions: list, kinds) -> bool:
    """Absent, or one value of ``kinds`` per completion (a hand-edited file may break this)."""
    if values is None:
        return True
    return (
        isinstance(values, list)
        and len(values) == len(completions)
        and all(isinstance(v, kinds) and not isinstance(v, bool) for v in values)
    )


def write_jsonl(rows: Sequence[dict], path: str | Path) -> None:
    """Write rows atomically (a temp file renamed over ``path``): a kill leaves the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)
