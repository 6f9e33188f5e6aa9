"""preftune.pairs and ``preftune pairs``: best-vs-worst and all-pairs selection, every drop reason
counted, truncated and unscored samples left out, the pair file in the shape of the prompts (read back by
preftune's own data loader, weights included), and one-line CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny import make_char_tokenizer, write_jsonl

from preftune.cli import main
from preftune.pairs import make_pairs


def _row(index, scores, *, texts=None, reasons=None, chat=False, prompt=None):
    k = len(scores)
    return {
        "index": index,
        "prompt": prompt if prompt is not None else f"p{index}",
        "completions": texts or [f"answer {index}.{j}" for j in range(k)],
        "completion_tokens": [10 + j for j in range(k)],
        "finish_reasons": reasons or ["stop"] * k,
        "settings": {"chat": chat},
        "scores": scores,
    }


ROWS = [
    _row(0, [0.5, 1.0, 0.0, 1.0]),  # best: sample 1 (first of the tied best), worst: sample 2
    _row(1, [0.5, 0.5, 0.5]),  # all_equal
    _row(2, [None, None]),  # no_scores
    _row(3, [1.0, None]),  # single_sample
    _row(4, [0.6, 0.5]),  # below_margin at margin 0.2
    _row(5, [1.0, 0.0], texts=["same", "same"]),  # identical_text
    _row(6, [1.0, 0.0, 0.5], reasons=["length", "stop", "stop"]),  # the truncated best is left out
]


def test_best_worst_pairs_and_drop_reasons():
    pairs, report = make_pairs(ROWS, margin=0.2)
    assert [(p["index"], p["chosen"], p["rejected"]) for p in pairs] == [
        (0, "answer 0.1", "answer 0.2"),
        (6, "answer 6.2", "answer 6.1"),
    ]
    assert report.drops == {
        "no_scores": 1,
        "single_sample": 1,
        "all_equal": 1,
        "below_margin": 1,
        "identical_text": 1,
    }
    assert report.excluded_samples == {"unscored": 3, "truncated": 1, "empty": 0}
    assert report.pairs == 2 and report.prompts_with_pairs == 2 and report.prompts == 7
    assert (report.chosen_tokens, report.rejected_tokens) == (11.5, 11.5)
    kept, report = make_pairs(ROWS, keep_truncated=True)
    assert kept[-1]["chosen"] == "answer 6.0" and report.excluded_samples["truncated"] == 0
    assert report.drops["below_margin"] == 0 and len(kept) == 3  # prompt 4 passes at margin 0


def test_all_pairs_above_a_margin():
    rows = [_row(0, [1.0, 0.0, 0.5, 1.0])]
    pairs, report = make_pairs(rows, mode="all", margin=0.25, weight=True)
    got = [(p["chosen"][-1], p["rejected"][-1], p["weight"]) for p in pairs]
    assert got == [
        ("0", "1", 1.0),
        ("0", "2", 0.5),
        ("2", "1", 0.5),
        ("3", "1", 1.0),
        ("3", "2", 0.5),
    ]
    assert report.pair_drops == {"tied": 1, "below_margin": 0, "identical_text": 0}
    _, report = make_pairs(rows, mode="all", margin=0.75)
    assert report.pair_drops["below_margin"] == 3 and report.pairs == 2
    with pytest.raises(ValueError, match="not one of best-worst, all"):
        make_pairs(rows, mode="best")


def test_pair_file_shape_follows_the_prompts_and_trains(tmp_path):
    from preftune.config import DataConfig
    from preftune.data import load_preference_data
    from preftune.pairs import write_jsonl as write_pairs

    msgs = [{"role": "system", "content": "be short"}, {"role": "user", "content": "hi?"}]
    rows = [
        _row(0, [1.0, 0.0], chat=True),
        _row(1, [0.0, 2.0], chat=True, prompt=msgs),
        _row(2, [1.0, 0.5], chat=False),
    ]
    pairs, _ = make_pairs(rows, weight=True)
    assert pairs[0]["prompt"] == [{"role": "user", "content": "p0"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "answer 0.0"}]
    assert pairs[1]["prompt"] == msgs and pairs[1]["weight"] == 2.0
    assert pairs[2]["prompt"] == "p2" and pairs[2]["chosen"] == "answer 2.0"
    tokenizer = make_char_tokenizer(tmp_path / "tok")
    chat_file, plain_file = tmp_path / "chat.jsonl", tmp_path / "plain.jsonl"
    write_pairs(pairs[:2], chat_file)
    write_pairs(pairs[2:], plain_file)
    for path, n in ((chat_file, 2), (plain_file, 1)):
        cfg = DataConfig(train_files=[str(path)], weight_column="weight")
        cfg.cache_dir = str(tmp_path / "cache")
        data = load_preference_data(cfg, tokenizer)
        assert len(data.train) == n and not any(data.drops.values())
        weights = [round(w, 6) for w in data.train["weight"]]
        assert weights == [p["weight"] for p in (pairs[:2] if n == 2 else pairs[2:])]
    text = tokenizer.decode(data.train[0]["chosen_ids"], skip_special_tokens=True)
    assert text.replace(" ", "") == "answer2.0"


def _cli(capsys, *argv):
    code = main(["pairs", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_pairs_judges_writes_and_reports(tmp_path: Path, capsys):
    rows = [_row(i, [None] * 3, texts=["yes.", "No!", "maybe"]) for i in range(3)]
    for row in rows:
        del row["scores"]
        row["fields"] = {"rules": ["lowercase"]}
    samples = write_jsonl(tmp_path / "s.jsonl", rows)
    out, report = tmp_path / "pairs.jsonl", tmp_path / "drops.json"
    code, stdout, _ = _cli(
        capsys, samples, "--judge", "rules:", "--out", out, "--report", report, "--no-progress"
    )
    assert code == 0, stdout
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("yes.", "No!")] * 3
    assert "3 pairs from 3 of 3 prompts" in stdout
    assert json.loads(report.read_text())["drops"]["all_equal"] == 0
    assert "scores" not in samples.read_text()  # --judge scores in memory only


def test_cli_pairs_one_line_errors(tmp_path: Path, capsys):
    unscored = [_row(0, [None, None])]
    del unscored[0]["scores"]
    equal = write_jsonl(tmp_path / "equal.jsonl", [_row(0, [1.0, 1.0])])
    bad = _row(0, [1.0, 0.0])
    bad["scores"] = [1.0]  # one score for two completions
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps(_row(0, [1.0, 0.0])) + "\n" + '{"index": 1, "pro')
    cases = {
        "has no scores: run 'preftune judge": [write_jsonl(tmp_path / "u.jsonl", unscored)],
        "no pairs: 0 pairs from 0 of 1 prompts; prompts dropped: all_equal 1": [equal],
        "line 2: incomplete last line": [partial],
        "line 1: not a samples line": [write_jsonl(tmp_path / "b.jsonl", [bad])],
        "--margin must be a number >= 0": [equal, "--margin", "-1"],
        "samples file not found": [tmp_path / "none.jsonl"],
        "unknown kind 'rule'": [equal, "--judge", "rule:"],
        "argument --mode: invalid choice": [equal, "--mode", "best"],
    }
    for needle, argv in cases.items():
        code, _, err = _cli(capsys, *argv, "--out", tmp_path / "o.jsonl")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("preftune: error:"), err
        assert needle in lines[0], (needle, err)
    assert not (tmp_path / "o.jsonl").exists()
