"""preftune.judges and ``preftune judge``: each rule on passing and failing answers, python judges (a
file or a module, with the record), a tiny random reward model (batched = one by one), failures retried
per sample, reported with the prompt index and counted, and one-line errors for bad specs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _tiny import make_char_tokenizer, write_jsonl

from preftune.cli import main
from preftune.judges import RULES, JudgeError, judge_rows, load_judge

# (rule entry, an answer that passes, one that fails)
RULE_CASES = [
    ("lowercase", "all lower case.", "Not lower."),
    ("uppercase", "SHOUT!", "Shout"),
    ({"name": "min_words", "args": {"n": 3}}, "one two three", "one two"),
    ({"name": "max_words", "args": [2]}, "it's fine", "one two three"),
    ({"name": "min_sentences", "args": 2}, "One. Two!", "Just one."),
    ({"name": "max_sentences", "args": 1}, "Just one.", "One. Two? Three."),
    ({"name": "max_chars", "args": 5}, "short", "too long"),
    ({"name": "include", "args": {"text": ["paris", "France"]}}, "Paris, France", "Paris"),
    ({"name": "include", "args": {"text": "cat", "whole_word": True}}, "a cat.", "concatenate"),
    ({"name": "exclude", "args": {"text": "sorry"}}, "Sure.", "Sorry, no."),
    ({"name": "starts_with", "args": "yes"}, "Yes, it is.", "Well, yes."),
    ({"name": "ends_with", "text": "Done."}, "All good. Done.", "Done. All good."),
    ("json", '```json\n{"a": 1}\n```', "{'a': 1}"),
    ({"name": "no_letter", "args": "e"}, "a big cat", "the cat"),
    ("no_comma", "no commas here", "one, two"),
    ("quoted", '"quoted"', 'not "quoted"'),
    ({"name": "bullets", "args": 2}, "* a\n- b", "* a\n* b\n* c"),
    ({"name": "regex", "args": r"^\d{3}$"}, "123", "12a"),
    ({"name": "yes_no", "args": "no"}, "No, ice is cold.", "Yes."),
    ({"name": "number", "args": 1234.5}, "2 + 3 ... so 1,234.5", "1234.5 is not it: 7"),
]


def test_each_rule_passes_and_fails():
    judge = load_judge("rules:")
    for entry, good, bad in RULE_CASES:
        assert judge.score("p", [good, bad, "   "], record={"rules": [entry]}) == [1.0, 0.0, 0.0], (
            entry
        )
    assert {e if isinstance(e, str) else e["name"] for e, _, _ in RULE_CASES} == set(RULES)


def test_rules_score_is_the_share_passed_and_reads_json_cells():
    judge = load_judge("rules:checks")
    rules = json.dumps(["lowercase", {"name": "max_words", "args": {"n": 2}}])
    assert judge.score("p", ["two words", "Two words", "Three Long words"], {"checks": rules}) == [
        1.0,
        0.5,
        0.0,
    ]


def _rows(n=3, k=2, **fields):
    return [
        {
            "index": i,
            "prompt": f"p{i}",
            "completions": [f"c{i}{j}" for j in range(k)],
            "fields": fields,
        }
        for i in range(n)
    ]


def test_python_judge_from_a_file_or_a_module_gets_the_record(tmp_path, monkeypatch):
    code = (
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class Unused:\n"
        "    x: int = 0\n"
        "def exact(prompt, completions, record):\n"
        "    return [float(c == record['answer']) for c in completions]\n"
        "def length(prompt, completions):\n"
        "    return [len(c) for c in completions]\n"
    )
    (tmp_path / "my_rewards.py").write_text(code)
    by_file = load_judge(f"python:{tmp_path / 'my_rewards.py'}:exact")
    assert by_file.score("q", ["4", "5"], record={"answer": "4"}) == [1.0, 0.0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_judge("python:my_rewards:length")
    assert by_module.score("q", ["ab", "abc"], record={"x": 1}) == [2, 3]


def test_a_failing_sample_is_skipped_counted_and_reported(tmp_path):
    code = (
        "import math\n"
        "def score(prompt, completions):\n"
        "    if prompt == 'p1' and 'c11' in completions:\n"
        "        raise RuntimeError('boom on c11')\n"
        "    if prompt == 'p2':\n"
        "        return [math.nan for c in completions]\n"
        "    return [len(c) for c in completions]\n"
    )
    (tmp_path / "flaky.py").write_text(code)
    rows = _rows()
    report = judge_rows(load_judge(f"python:{tmp_path / 'flaky.py'}:score"), rows)
    assert [r["scores"] for r in rows] == [[3.0, 3.0], [3.0, None], [None, None]]
    assert rows[1]["judge_errors"] == {"1": "RuntimeError: boom on c11"}
    assert report.failed_samples == 3 and report.samples == 6 and report.prompts == 3
    assert report.failures[0] == (1, 1, "RuntimeError: boom on c11")
    assert report.failures[1][:2] == (2, None) and "non-finite" in report.failures[1][2]
    assert report.mean_score == 3.0 and report.pass_rate == 1.0
    rules = judge_rows(load_judge("rules:"), r := _rows(1, rules=["lowercse"]))
    assert r[0]["scores"] == [None, None] and "did you mean 'lowercase'" in rules.failures[0][2]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nonsense", "expected python:MODULE:FUNCTION, reward-model:PATH or rules:"),
        ("rule:", "unknown kind 'rule' (did you mean 'rules'?)"),
        ("python:json", "expected python:MODULE:FUNCTION"),
        ("python:no_such_module_xyz:f", "cannot import no_such_module_xyz (ModuleNotFoundError"),
        ("python:json:lods", "json has no function 'lods' (did you mean 'loads'?)"),
        ("python:/nope/r.py:f", "file /nope/r.py not found"),
        ("reward-model:/nope/rm", "cannot load a reward model"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(JudgeError) as info:
        load_judge(spec)
    assert message in str(info.value)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("rm")
    tokenizer = make_char_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.eos_token_id,  # pad = EOS, as many chat models have it
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.score.weight.data.normal_(0, 1.0)  # a visible spread of scores
    model.save_pretrained(folder)
    return folder, model, tokenizer


def test_reward_model_batched_equals_one_by_one(reward_model):
    folder, model, tokenizer = reward_model
    judge = load_judge(f"reward-model:{folder}", batch_size=3)
    completions = ["yes.", "no, never", "a much longer answer here", "x", "</s>"]
    scores = judge.score("is it?", completions)
    expected = []
    for c in completions:  # each alone, unpadded: the last token's score
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "is it?"}, {"role": "assistant", "content": c}],
            tokenize=False,
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model.model(ids).last_hidden_state
            expected.append(float(model.score(hidden)[0, -1, 0]))
    assert len(set(scores)) == len(scores)
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(scores, expected))


def test_reward_model_needs_one_label(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    make_char_tokenizer(tmp_path)
    config = LlamaConfig(
        vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(JudgeError, match="has 2 labels; a reward model has one"):
        load_judge(f"reward-model:{tmp_path}")


def test_cli_judge_writes_scores_and_reports_failures(tmp_path, capsys):
    rows = _rows(2, rules=["lowercase"])
    rows[0]["completions"] = ["fine", "Not fine"]
    rows[1]["fields"] = {"rules": "not json"}
    samples = write_jsonl(tmp_path / "s.jsonl", rows)
    assert main(["judge", str(samples), "--judge", "rules:", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    scored = [json.loads(line) for line in samples.read_text().splitlines()]
    assert scored[0]["scores"] == [1.0, 0.0] and scored[0]["judge"] == "rules:"
    assert scored[1]["scores"] == [None, None]
    assert "judge failed on prompt 1 (every sample)" in err
    assert "2 samples not scored" in out and "mean score 0.5" in out
    for argv, needle in [
        ([str(samples), "--judge", "magic:"], "unknown kind 'magic'"),
        ([str(tmp_path / "none.jsonl"), "--judge", "rules:"], "samples file not found"),
        (
            [str(samples), "--judge", "python:os:getcwd", "--no-progress"],
            "on every sample (prompt 0",
        ),
    ]:
        assert main(["judge", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("preftune: error:") and needle in lines[0]
