"""preftune.data.load_preference_data end to end: formats, shapes, weights, errors, drops, eval splits."""

import csv
import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _data_helpers import STANDARD, DataCfg, char_tokenizer, conversational, write_jsonl

from preftune.data import DROP_REASONS, DataError, load_preference_data

TOK = char_tokenizer([("b", "c"), ("t", "h")])


def _cfg(tmp_path, files, **kw):
    return DataCfg(train_files=[str(f) for f in files], cache_dir=str(tmp_path / "cache"), **kw)


def _rows(ds):
    return [
        (r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], r["weight"], r["index"]) for r in ds
    ]


def test_every_format_gives_the_same_tokenized_rows(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", STANDARD)
    (tmp_path / "d.json").write_text(json.dumps(STANDARD))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(STANDARD)
    pq.write_table(pa.Table.from_pylist(STANDARD), tmp_path / "d.parquet")
    datasets.Dataset.from_list(STANDARD).save_to_disk(str(tmp_path / "saved"))

    results = {
        name: load_preference_data(_cfg(tmp_path, [tmp_path / name]), TOK)
        for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved")
    }
    expected = _rows(results["d.jsonl"].train)
    assert len(expected) == 3 and [r[4] for r in expected] == [0, 1, 2]
    for name, data in results.items():
        assert _rows(data.train) == expected, name
        assert data.rows_read == 3 and data.eval is None
        assert data.shapes == {str(tmp_path / name): "standard"}
    first = results["d.jsonl"].train[0]
    assert first["prompt_ids"] + first["chosen_ids"] == [
        *TOK(STANDARD[0]["prompt"] + STANDARD[0]["chosen"])["input_ids"],
        TOK.eos_token_id,
    ]
    assert results["d.jsonl"].train.features["weight"].dtype == "float32"
    assert results["d.jsonl"].train.features["index"].dtype == "int64"


def test_several_files_and_a_glob_in_order(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", STANDARD[:2])
    write_jsonl(tmp_path / "b.jsonl", STANDARD[2:])
    data = load_preference_data(_cfg(tmp_path, [tmp_path / "*.jsonl"]), TOK)
    single = load_preference_data(
        _cfg(tmp_path, [write_jsonl(tmp_path / "all.txt", STANDARD)], format="jsonl"), TOK
    )
    assert _rows(data.train) == _rows(single.train)


def test_conversational_parquet_and_implicit_jsonl(tmp_path):
    records = conversational(3)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "chat.parquet")
    data = load_preference_data(_cfg(tmp_path, [tmp_path / "chat.parquet"]), TOK)
    assert data.shapes[str(tmp_path / "chat.parquet")] == "conversational"
    row = data.train[1]
    full = TOK.apply_chat_template(records[1]["prompt"] + records[1]["chosen"], tokenize=False)
    assert row["prompt_ids"] + row["chosen_ids"] == TOK(full, add_special_tokens=False)["input_ids"]

    implicit = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
        for r in records
    ]
    write_jsonl(tmp_path / "implicit.jsonl", implicit)
    same = load_preference_data(_cfg(tmp_path, [tmp_path / "implicit.jsonl"]), TOK)
    assert same.shapes[str(tmp_path / "implicit.jsonl")] == "implicit"
    assert _rows(same.train) == _rows(data.train)


def test_custom_columns_and_weights(tmp_path):
    records = [
        {"question": r["prompt"], "response_j": r["chosen"], "response_k": r["rejected"], "w": w}
        for r, w in zip(STANDARD, (0.5, None, 2))
    ]
    write_jsonl(tmp_path / "d.jsonl", records)
    cfg = _cfg(
        tmp_path,
        [tmp_path / "d.jsonl"],
        prompt_column="question",
        chosen_column="response_j",
        rejected_column="response_k",
        weight_column="w",
    )
    assert load_preference_data(cfg, TOK).train["weight"] == [0.5, 1.0, 2.0]
    cfg.weight_column = "weight"
    with pytest.raises(
        DataError, match=r"column 'weight' not found.*available columns: 'question'"
    ):
        load_preference_data(cfg, TOK)
    records[1]["w"] = "heavy"
    write_jsonl(tmp_path / "d.jsonl", records)
    cfg.weight_column = "w"
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: field 'w' must be a number"):
        load_preference_data(cfg, TOK)


def test_errors_name_file_line_field_and_suggest(tmp_path):
    records = [dict(STANDARD[0]), {"prompt": "p", "chosen": "a", "rejectd": "b"}]
    write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError) as err:
        load_preference_data(_cfg(tmp_path, [tmp_path / "d.jsonl"]), TOK)
    msg = str(err.value)
    assert f"{tmp_path / 'd.jsonl'}, line 2: column 'rejected' not found" in msg
    assert (
        "did you mean 'rejectd'" in msg
        and "available columns: 'prompt', 'chosen', 'rejectd'" in msg
    )

    records[1] = {"prompt": "p", "chosen": "", "rejected": "b"}
    write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: field 'chosen' is an empty response"):
        load_preference_data(_cfg(tmp_path, [tmp_path / "d.jsonl"]), TOK)

    pq.write_table(
        pa.Table.from_pylist([{"prompt": "p", "Chosen": "a", "rejected": "b"}]),
        tmp_path / "d.parquet",
    )
    with pytest.raises(
        DataError, match=r"d\.parquet: column 'chosen' not found \(did you mean 'Chosen'\?\)"
    ):
        load_preference_data(_cfg(tmp_path, [tmp_path / "d.parquet"]), TOK)


def _drop_records():
    return [
        STANDARD[0],
        {"prompt": "Q", "chosen": " same", "rejected": " same"},  # chosen_equals_rejected
        # prompt_too_long (max_prompt_length None)
        {"prompt": "x" * 40, "chosen": " a", "rejected": " b"},
        # identical_after_truncation
        {"prompt": "Q", "chosen": " " + "y" * 40 + "1", "rejected": " " + "y" * 40 + "2"},
        STANDARD[1],
    ]


def test_drops_counted_per_reason_and_on_drop_error(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", _drop_records())
    cfg = _cfg(tmp_path, [tmp_path / "d.jsonl"], max_length=40, max_prompt_length=None)
    data = load_preference_data(cfg, TOK)
    assert len(data.train) == 2 and data.rows_read == 5
    assert data.drops == {
        "chosen_equals_rejected": 1,
        "special_token_in_content": 0,
        "prompt_too_long": 1,
        "empty_response_after_truncation": 0,
        "identical_after_truncation": 1,
    }
    assert set(data.drops) == set(DROP_REASONS)
    assert data.truncations == {"prompt": 0, "chosen": 1, "rejected": 1}
    assert data.train["index"] == [0, 1]

    cfg.on_drop = "error"
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: pair dropped \(chosen_equals_rejected"):
        load_preference_data(cfg, TOK)  # a cache hit still refuses
    cfg.cache_dir = str(tmp_path / "fresh")
    with pytest.raises(
        DataError, match=r"d\.jsonl, line 2: pair dropped \(chosen_equals_rejected\)"
    ):
        load_preference_data(cfg, TOK)


def test_nothing_left_is_an_error(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " a"}])
    with pytest.raises(DataError, match=r"no training pairs left.*chosen_equals_rejected"):
        load_preference_data(_cfg(tmp_path, [tmp_path / "d.jsonl"]), TOK)


def test_eval_fraction_is_seeded_and_split_before_drops(tmp_path):
    records = [{"prompt": f"Q{i}:", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(20)]
    records[3] = {"prompt": "Q", "chosen": " same", "rejected": " same"}
    write_jsonl(tmp_path / "d.jsonl", records)
    cfg = _cfg(tmp_path, [tmp_path / "d.jsonl"], eval_fraction=0.25)
    a, b = load_preference_data(cfg, TOK, seed=1), load_preference_data(cfg, TOK, seed=1)
    c = load_preference_data(cfg, TOK, seed=2)
    assert _rows(a.eval) == _rows(b.eval) and _rows(a.eval) != _rows(c.eval)
    assert a.fingerprint != c.fingerprint
    assert len(a.train) + len(a.eval) == 19 and a.rows_read == 20
    # round(0.25 * 20) = 5 records went to eval, dropped ones included
    assert len(a.eval) + a.drops_by_split["eval"]["chosen_equals_rejected"] == 5
    assert a.drops["chosen_equals_rejected"] == 1
    assert a.eval["index"] == list(range(len(a.eval)))
    assert a.train["index"] == list(range(len(a.train)))
    train_prompts = {tuple(p) for p in a.train["prompt_ids"]}
    assert not train_prompts & {tuple(p) for p in a.eval["prompt_ids"]}


def test_eval_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", STANDARD[:2])
    write_jsonl(tmp_path / "eval.jsonl", STANDARD[2:])
    cfg = _cfg(tmp_path, [tmp_path / "train.jsonl"], eval_files=[str(tmp_path / "eval.jsonl")])
    data = load_preference_data(cfg, TOK)
    assert (len(data.train), len(data.eval), data.rows_read) == (2, 1, 3)
    assert set(data.drops_by_split) == {"train", "eval"}
    cfg.eval_fraction = 0.5
    with pytest.raises(DataError, match="not both"):
        load_preference_data(cfg, TOK)


# ---------------------------------------------------------------------------------------------------
# Every bad input is a one-line DataError naming the file (and line or row, and field)


def _gz(path, text):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def _lines(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


GOOD = {"prompt": "Q:", "chosen": " a", "rejected": " b"}


def _truncated_gz(path):
    data = _gz(path, _lines(*[GOOD] * 200)).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_gz(path):
    data = bytearray(_gz(path, _lines(*[GOOD] * 200)).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


BAD_INPUTS = {
    "truncated .jsonl.gz": (
        "d.jsonl.gz",
        _truncated_gz,
        {},
        r"d\.jsonl\.gz, line \d+: cannot decompress: the compressed data ends early",
    ),
    "non-gzip .jsonl.gz": (
        "d.jsonl.gz",
        lambda p: p.write_text(_lines(GOOD)),
        {},
        r"d\.jsonl\.gz, line 1: cannot decompress: it is not gzip data",
    ),
    "corrupt .jsonl.gz": (
        "d.jsonl.gz",
        _corrupt_gz,
        {},
        r"d\.jsonl\.gz, line \d+: cannot decompress",
    ),
    "truncated .json.gz": (
        "d.json.gz",
        lambda p: p.write_bytes(_gz(p, json.dumps([GOOD] * 200)).read_bytes()[:40]),
        {},
        r"d\.json\.gz: cannot decompress: the compressed data ends early",
    ),
    "lone surrogate, JSONL": (
        "d.jsonl",
        lambda p: p.write_text(
            _lines(GOOD) + '{"prompt": "x\\ud800y", "chosen": "a", "rejected": "b"}\n'
        ),
        {},
        r"d\.jsonl, line 2: field 'prompt' holds an invalid UTF-16 surrogate escape \(\\ud800 without",
    ),
    "lone low surrogate in a message, JSON": (
        "d.json",
        lambda p: p.write_text(
            '[{"prompt": [{"role": "user", "content": "\\udc00"}], "chosen": "a", "rejected": "b"}]'
        ),
        {},
        r"d\.json, row 0 \(0-based\): field 'prompt\[0\]\.content' holds an invalid UTF-16 surrogate",
    ),
    "all weights 0": (
        "d.jsonl",
        lambda p: p.write_text(_lines({**GOOD, "w": 0}, {**GOOD, "chosen": " c", "w": 0.0})),
        {"weight_column": "w"},
        r"d\.jsonl: every training pair has weight 0 \(field 'w'\): nothing to learn",
    ),
    "weight overflows float32": (
        "d.jsonl",
        lambda p: p.write_text(_lines(GOOD, {**GOOD, "w": 1e39})),
        {"weight_column": "w"},
        r"d\.jsonl, line 2: field 'w' is 1e\+39, too large for a float32 pair weight",
    ),
    "weight NaN": (
        "d.jsonl",
        lambda p: p.write_text('{"prompt": "Q", "chosen": "a", "rejected": "b", "w": NaN}\n'),
        {"weight_column": "w"},
        r"d\.jsonl, line 1: field 'w' must be a finite number >= 0, got nan",
    ),
    "weight inf": (
        "d.jsonl",
        lambda p: p.write_text(_lines({**GOOD, "w": "inf"})),
        {"weight_column": "w"},
        r"d\.jsonl, line 1: field 'w' must be a finite number >= 0, got inf",
    ),
    "weight negative": (
        "d.jsonl",
        lambda p: p.write_text(_lines({**GOOD, "w": -0.5})),
        {"weight_column": "w"},
        r"d\.jsonl, line 1: field 'w' must be a finite number >= 0, got -0\.5",
    ),
    "empty file": ("d.jsonl", lambda p: p.write_text(""), {}, r"d\.jsonl: the file is empty"),
    "empty JSON list": (
        "d.json",
        lambda p: p.write_text("[]"),
        {},
        r"d\.json: no records in this file",
    ),
    "CSV with a header only": (
        "d.csv",
        lambda p: p.write_text("prompt,chosen,rejected\n"),
        {},
        r"d\.csv: no records in this file",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_where(tmp_path, case):
    name, write, settings, pattern = BAD_INPUTS[case]
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError, match=pattern) as err:
        load_preference_data(_cfg(tmp_path, [path], **settings), TOK)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_valid_surrogate_pairs_and_zero_weights_among_others_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "smile \\ud83d\\ude00:", "chosen": " a", "rejected": " b", "w": 0}\n'
        + _lines({**GOOD, "w": 2})
    )
    data = load_preference_data(_cfg(tmp_path, [path], weight_column="w"), TOK)
    assert data.train["weight"] == [0.0, 2.0]
