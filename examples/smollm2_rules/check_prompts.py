"""Validate the prompt sets: rows parse, every rule is a known rule with valid arguments, train and
held-out are disjoint (no shared prompt, no shared topic, low word overlap); print the distribution.

    python examples/smollm2_rules/check_prompts.py        # exit status 1 on any problem
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

from preftune.judges import RULES, JudgeError, _rule_call

HERE = Path(__file__).resolve().parent
FILES = {"train": HERE / "train_prompts.jsonl", "heldout": HERE / "heldout_prompts.jsonl"}
MIN_ROWS = {"train": 160, "heldout": 110}
MAX_PROMPT_WORDS = 40
# Rules an empty or one-word answer cannot pass by accident (a floor, content, a count, a phrase);
# every row needs one, so that answering shorter never passes a prompt.
SUBSTANCE = {
    "min_words",
    "min_sentences",
    "include",
    "regex",
    "yes_no",
    "number",
    "bullets",
    "json",
    "starts_with",
    "ends_with",
}
MAX_OVERLAP = 0.5  # Jaccard of content-word sets, held-out row vs its nearest train row
STOP = frozenset(  # words that say nothing about a prompt's topic or wording
    re.findall(
        r"[a-z]+",
        "a an the and or of to in on at for with by is are was be it its your you me my this "
        "that what which who how why do does did can as from into than then not no any all only "
        "each one two three four five six",
    )
)


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOP}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def load(split: str, problems: list[str]) -> list[dict]:
    rows = []
    for n, line in enumerate(FILES[split].read_text().splitlines(), 1):
        where = f"{FILES[split].name}:{n}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append(f"{where}: not JSON ({e})")
            continue
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            problems.append(f"{where}: no prompt")
        if not isinstance(row.get("category"), str) or not row["category"]:
            problems.append(f"{where}: no category")
        if not isinstance(row.get("rules"), list) or not row["rules"]:
            problems.append(f"{where}: rules must be a non-empty list")
            continue
        for entry in row["rules"]:
            if not isinstance(entry, dict) or set(entry) != {"name", "args"}:
                problems.append(f"{where}: rule {entry!r} is not {{'name': ..., 'args': ...}}")
            try:
                _, check = _rule_call(entry)
                check("a sample answer.")  # the arguments work, not only bind
            except (JudgeError, TypeError, ValueError, re.error) as e:
                problems.append(f"{where}: {e}")
        if not SUBSTANCE & {e.get("name") for e in row["rules"] if isinstance(e, dict)}:
            problems.append(f"{where}: no floor or content rule ({', '.join(sorted(SUBSTANCE))})")
        if len(row.get("prompt", "").split()) > MAX_PROMPT_WORDS:
            problems.append(f"{where}: prompt over {MAX_PROMPT_WORDS} words")
        row["_where"] = where
        rows.append(row)
    if len(rows) < MIN_ROWS[split]:
        problems.append(f"{split}: {len(rows)} rows, need at least {MIN_ROWS[split]}")
    seen: dict[str, str] = {}
    for row in rows:
        key = " ".join(row["prompt"].lower().split())
        if key in seen:
            problems.append(f"{row['_where']}: same prompt as {seen[key]}")
        seen[key] = row["_where"]
    return rows


def table(title: str, counts: dict[str, Counter]) -> None:
    keys = sorted(set().union(*counts.values()))
    print(f"\n{title:<14}" + "".join(f"{s:>9}" for s in counts))
    for k in keys:
        print(f"{k:<14}" + "".join(f"{counts[s][k]:>9}" for s in counts))
    print(f"{'total':<14}" + "".join(f"{sum(c.values()):>9}" for c in counts.values()))


def main() -> int:
    problems: list[str] = []
    data = {split: load(split, problems) for split in FILES}
    train, held = data["train"], data["heldout"]

    train_text = {" ".join(r["prompt"].lower().split()) for r in train}
    for r in held:
        if " ".join(r["prompt"].lower().split()) in train_text:
            problems.append(f"{r['_where']}: prompt also in train")
    shared_topics = {r.get("topic") for r in train} & {r.get("topic") for r in held}
    if shared_topics - {None}:
        problems.append(f"topics in both splits: {sorted(shared_topics - {None})}")
    train_words = [(content_words(r["prompt"]), r) for r in train]
    worst = []
    for r in held:
        words = content_words(r["prompt"])
        score, nearest = max(
            ((jaccard(words, w), t) for w, t in train_words), key=lambda pair: pair[0]
        )
        worst.append((score, r["prompt"], nearest["prompt"]))
        if score > MAX_OVERLAP:
            problems.append(
                f"{r['_where']}: word overlap {score:.2f} with train {nearest['_where']} "
                f"({nearest['prompt']!r})"
            )
    worst.sort(reverse=True)
    mean = sum(s for s, *_ in worst) / len(worst) if worst else 0.0

    table("category", {s: Counter(r["category"] for r in rows) for s, rows in data.items()})
    table("topic", {s: Counter(r.get("topic", "?") for r in rows) for s, rows in data.items()})
    table(
        "rule",
        {s: Counter(e["name"] for r in rows for e in r["rules"]) for s, rows in data.items()},
    )
    used = {e["name"] for rows in data.values() for r in rows for e in r["rules"]}
    unused = ", ".join(sorted(set(RULES) - used)) or "none"
    print(f"\nrules used: {len(used)} of {len(RULES)} known (unused: {unused})")
    print(
        f"held-out vs nearest train prompt, content-word Jaccard: mean {mean:.2f}, "
        f"max {worst[0][0]:.2f} (limit {MAX_OVERLAP})"
    )
    for score, h, t in worst[:3]:
        print(f"  {score:.2f}  {h!r}\n        ~ {t!r}")
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for p in problems:
            print("  " + p)
        return 1
    print("\nOK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
