"""preftune.describe and ``preftune data``: rows per source, warnings, validation without a tokenizer."""

from __future__ import annotations

import pytest
from _data_helpers import STANDARD, char_tokenizer, conversational, write_jsonl

from preftune.cli import main
from preftune.config import load_config
from preftune.describe import describe_dataset, format_description

TOK = char_tokenizer()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tok_dir(tmp_path):
    path = tmp_path / "tok"
    TOK.save_pretrained(str(path))
    return path


def pairs(tag, n):
    return [{"prompt": f"{tag} {i}?", "chosen": f" y{i}", "rejected": f" n{i}"} for i in range(n)]


def test_rows_per_source_after_mixing(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", pairs("a", 8))
    write_jsonl(tmp_path / "b.jsonl", conversational(6))
    cfg = load_config(
        None,
        [
            f"data.train_files=[{tmp_path / 'a.jsonl'}]",
            f"data.sources=[{{path: {tmp_path / 'b.jsonl'}, fraction: 0.5}}]",
            "data.eval_fraction=0.25",
            f"data.cache_dir={tmp_path / 'c'}",
        ],
    )
    d = describe_dataset(cfg, TOK, examples=0)
    assert [(s["records"], s["selected"]) for s in d["sources"]] == [(8, 8), (6, 3)]
    assert sum(s["train"] + s["eval"] for s in d["sources"]) == d["rows_kept"] == 11
    text = format_description(d)
    assert "rows per source (after mixing):" in text
    b = next(line for line in text.splitlines() if line.strip().startswith(str(tmp_path / "b")))
    assert b.split()[1:4] == ["train", "6", "3"]
    # plain-text prompts (a.jsonl) for a tokenizer with a chat template: one warning, one line
    assert d["warnings"] == [
        f"{tmp_path / 'a.jsonl'}: 8 of 8 prompts are plain text: the tokenizer's chat template was "
        "not applied (set data.shape=conversational to apply it; a string prompt becomes one user "
        "message)"
    ]
    assert f"warning:   {d['warnings'][0]}" in text


def test_no_warning_without_a_template_or_for_rendered_prompts(tmp_path):
    rendered = [{"prompt": "<|user|>hi</s><|assistant|>", "chosen": "a</s>", "rejected": "b</s>"}]
    write_jsonl(tmp_path / "r.jsonl", rendered)
    write_jsonl(tmp_path / "s.jsonl", STANDARD)
    for name, tok in (("r.jsonl", TOK), ("s.jsonl", char_tokenizer(chat_template=None))):
        cfg = load_config(
            None, [f"data.train_files=[{tmp_path / name}]", f"data.cache_dir={tmp_path / 'c'}"]
        )
        d = describe_dataset(cfg, tok, examples=0)
        assert d["warnings"] == [] and "rows per source" not in format_description(d)


def test_data_without_a_tokenizer_validates_the_file(capsys, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", pairs("g", 5))
    code, out, err = run(capsys, "data", str(good))
    assert code == 0, err
    assert f"train file: {good}  (jsonl, shape standard)" in out
    assert "schema: prompt: str, chosen: str, rejected: str" in out
    assert "records: 5 read, 5 valid, 0 bad" in out
    assert "characters per pair (valid records, n=5)" in out and "no tokenizer:" in out

    bad = write_jsonl(tmp_path / "bad.jsonl", [*pairs("g", 2), {"prompt": "x", "chosen": ["y"]}])
    code, out, err = run(capsys, "data", str(bad))
    assert code == 2
    assert f"{bad}, line 3: field 'chosen' must be a string" in out
    assert err.startswith("preftune: error: 1 bad rows (first: ") and err.count("\n") == 1

    (tmp_path / "empty.jsonl").write_text("")
    code, out, err = run(capsys, "data", str(tmp_path / "empty.jsonl"))
    assert code == 2 and err == (
        f"preftune: error: {tmp_path / 'empty.jsonl'}: the file is empty; expected preference records\n"
    )


def test_data_with_a_tokenizer_describes_as_before(capsys, tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "p.jsonl", pairs("p", 4))
    argv = ["data", str(path), "--tokenizer", str(tok_dir), f"data.cache_dir={tmp_path / 'c'}"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "rows:      4 read -> 4 kept (4 train, 0 eval)" in out and "--- example 1" in out
    assert "warning:   " in out and "chat template was not applied" in out
