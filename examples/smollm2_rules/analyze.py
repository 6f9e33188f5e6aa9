"""Where the held-out gain of a `preftune loop` run comes from: per category, and with answer length held fixed.

Reads the answers the loop kept (``reference-answers/`` for the initial model, ``round-N/eval/`` for the
policy after round N), scores them again with the ``rules`` judge, and prints markdown:

1. pass rate and mean words per round, greedy and sampled, with answer counts;
2. per constraint category (the prompts' ``category`` tag): greedy pass rate and words, initial -> each round;
3. length held fixed: the initial model's answers are cut into word-count bins (terciles, sampled and greedy
   together), and each round's pass rate is shown per bin. A gain that came from answering shorter or longer
   would show as a shift of answers between bins with flat pass rates inside them; a real gain raises the
   rates inside the bins. The last column is the pass rate the round would have from its length shift
   alone (the initial model's rate in each bin, weighted by the round's answers per bin).

    python examples/smollm2_rules/analyze.py runs/smollm2_rules
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from preftune.judges import judge_rows, load_judge

DECODINGS = ("greedy", "sampled")


def _words(text: str) -> int:
    return len(re.findall(r"\S+", text))


def _answers(path: Path, judge) -> list[dict]:
    """One dict per answer: category, words, passed (score 1.0 = every rule of the prompt)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    judge_rows(judge, rows)
    out = []
    for row in rows:
        category = (row.get("fields") or {}).get("category", "?")
        for text, score in zip(row["completions"], row["scores"]):
            if score is not None:
                out.append({"category": category, "words": _words(text), "passed": score >= 1.0})
    return out


def _rate(answers: list[dict]) -> str:
    if not answers:
        return "–"
    passed = sum(a["passed"] for a in answers)
    return f"{100 * passed / len(answers):.1f} % ({passed}/{len(answers)})"


def _mean_words(answers: list[dict]) -> str:
    return f"{statistics.fmean(a['words'] for a in answers):.1f}" if answers else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the loop's output folder (train.output_dir)")
    args = parser.parse_args()
    judge = load_judge("rules:")
    # stage name -> decoding -> answers
    stages: dict[str, dict[str, list[dict]]] = {}
    ref = args.run / "reference-answers"
    stages["initial"] = {d: _answers(ref / f"reference-{d}.jsonl", judge) for d in DECODINGS}
    for round_dir in sorted(args.run.glob("round-*"), key=lambda p: int(p.name.split("-")[1])):
        files = {d: round_dir / "eval" / f"policy-{d}.jsonl" for d in DECODINGS}
        if all(f.is_file() for f in files.values()):
            stages[round_dir.name] = {d: _answers(f, judge) for d, f in files.items()}
    names = list(stages)

    print("## Held-out pass rate and length per round\n")
    print("| stage | greedy pass | sampled pass | words greedy | words sampled |")
    print("|---|---|---|---|---|")
    for name in names:
        g, s = stages[name]["greedy"], stages[name]["sampled"]
        print(f"| {name} | {_rate(g)} | {_rate(s)} | {_mean_words(g)} | {_mean_words(s)} |")

    print("\n## Per category (greedy pass rate, mean words)\n")
    print("| category | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    by_cat = {
        name: _group(stages[name]["greedy"], lambda a: a["category"]) for name in names
    }  # stage -> category -> answers
    for cat in sorted(by_cat["initial"]):
        cells = []
        for name in names:
            answers = by_cat[name].get(cat, [])
            passed = sum(a["passed"] for a in answers)
            cells.append(f"{passed}/{len(answers)}, {_mean_words(answers)} w")
        print(f"| {cat} | " + " | ".join(cells) + " |")

    print("\n## Length held fixed (greedy and sampled answers together)\n")
    initial = stages["initial"]["greedy"] + stages["initial"]["sampled"]
    words = sorted(a["words"] for a in initial)
    cuts = [words[len(words) // 3], words[2 * len(words) // 3]]
    labels = [f"< {cuts[0]} words", f"{cuts[0]}–{cuts[1] - 1} words", f">= {cuts[1]} words"]
    print("| stage | " + " | ".join(labels) + " | all | from the length shift alone |")
    print("|---|" + "---|" * (len(labels) + 2))
    base = _group(initial, lambda a: bisect.bisect_right(cuts, a["words"]))
    base_rate = {i: statistics.fmean(a["passed"] for a in base[i]) for i in range(3)}
    for name in names:
        answers = stages[name]["greedy"] + stages[name]["sampled"]
        bins = _group(answers, lambda a: bisect.bisect_right(cuts, a["words"]))
        # The initial model's pass rate in each bin, weighted by how many of this stage's answers fall in it.
        shift_only = sum(base_rate[i] * len(bins.get(i, [])) for i in range(3)) / len(answers)
        cells = [_rate(bins.get(i, [])) for i in range(3)]
        print(
            f"| {name} | " + " | ".join(cells) + f" | {_rate(answers)} | {100 * shift_only:.1f} % |"
        )


def _group(answers: list[dict], key) -> dict:
    out: dict = defaultdict(list)
    for a in answers:
        out[key(a)].append(a)
    return out


if __name__ == "__main__":
    main()
