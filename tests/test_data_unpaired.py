"""preftune.data.unpaired (+ unpaired_load): unpaired rows for KTO — labels, pairs unpaired on the fly, KL
partners, exact boundaries of completion and KL rows, the loss/data checks, `preftune data`, and training."""

from __future__ import annotations

import csv
import json
import random
import string
from dataclasses import dataclass

import pytest
import torch
from _data_helpers import STANDARD, DataCfg, bytelevel_tokenizer, char_tokenizer, write_jsonl

from preftune.config import Config, ConfigError, validate
from preftune.data import DataError, load_preference_data
from preftune.data.unpaired import kl_partners, parse_label, ratio_text, weight_advice
from preftune.losses.unpaired import mismatched_indices

TOK = char_tokenizer([("?", " "), ("a", "b")])  # "? " straddles a prompt "...?" + completion " ..."


@dataclass
class Cfg(DataCfg):
    completion_column: str = "completion"
    label_column: str = "label"
    unpair: bool = False


def cfg(tmp_path, files, **over) -> Cfg:
    return Cfg(train_files=[str(f) for f in files], cache_dir=str(tmp_path / "cache"), **over)


def rows(n=8, labels=None):
    labels = labels or [i % 2 == 0 for i in range(n)]
    return [
        {"prompt": f"Q{i}?", "completion": f" ab{i}", "label": labels[i]}
        for i in range(len(labels))
    ]


def ids(text, tok=TOK, specials=True):
    return tok(text, add_special_tokens=specials)["input_ids"]


# ------------------------------------------------------------------------------------------ labels


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True), (False, False), (1, True), (0, False), (1.0, True), ("1", True), ("0", False),
        ("true", True), ("False", False), ("desirable", True), ("UNDESIRABLE", False),
        ("good", True), (" Bad ", False), ("thumbs_up", True), ("Thumbs_Down", False),
        ("thumbs-up", True), ("thumbs down", False),
    ],
)  # fmt: skip
def test_every_label_form(value, expected):
    assert parse_label(value, "f.jsonl, line 1", "label") is expected


def test_labels_from_a_csv_file_and_custom_columns(tmp_path):
    path = tmp_path / "u.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["q", "answer", "thumb"])
        for i, lab in enumerate(["True", "0", "good", "thumbs_down"]):
            w.writerow([f"Q{i}?", f" a{i}", lab])
    c = cfg(tmp_path, [path], prompt_column="q", completion_column="answer", label_column="thumb")
    data = load_preference_data(c, TOK)
    assert data.unpaired and data.shapes[str(path)] == "unpaired standard"
    assert data.train["label"] == [True, False, True, False]
    assert data.labels == {"train": {"desirable": 2, "undesirable": 2}}


@pytest.mark.parametrize("bad", [2, "maybe", None, -1.0, "yes"])
def test_bad_labels_name_file_line_and_field(tmp_path, bad):
    records = rows(4)
    records[2]["label"] = bad
    path = write_jsonl(tmp_path / "u.jsonl", records)
    with pytest.raises(DataError) as err:
        load_preference_data(cfg(tmp_path, [path], shape="unpaired"), TOK)
    msg = str(err.value)
    assert f"{path}, line 3: field 'label' must be a label" in msg
    assert "true/false, 1/0, desirable/undesirable, good/bad, thumbs_up/thumbs_down" in msg


# ------------------------------------------------------------------------------------------ unpair


def test_unpair_makes_two_rows_per_pair_and_drops_equal_responses(tmp_path):
    pairs = [*STANDARD, {"prompt": "Q: same?\nA:", "chosen": " x", "rejected": " x"}]
    path = write_jsonl(tmp_path / "p.jsonl", pairs)
    data = load_preference_data(cfg(tmp_path, [path], unpair=True), TOK)
    assert data.unpaired and len(data.train) == 2 * len(STANDARD)
    assert data.train["label"] == [True, False] * len(STANDARD)
    assert data.drops["chosen_equals_rejected"] == 1
    eos = TOK.eos_token_id
    for k, pair in enumerate(STANDARD):
        for row, key in zip((data.train[2 * k], data.train[2 * k + 1]), ("chosen", "rejected")):
            assert row["prompt_ids"] + row["chosen_ids"] == [*ids(pair["prompt"] + pair[key]), eos]
    # without unpair, the pair file is pairs; a pair loss on it is fine, kto is not
    plain = load_preference_data(cfg(tmp_path, [path]), TOK, unpaired=False)
    assert not plain.unpaired and "label" not in plain.train.column_names
    with pytest.raises(DataError, match=r"holds pairs .* set data\.unpair=true"):
        load_preference_data(cfg(tmp_path, [path]), TOK, unpaired=True)


def test_a_pair_loss_refuses_unpaired_rows_and_the_config_checks(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", rows(4))
    with pytest.raises(DataError, match=r"holds unpaired rows .* loss\.name=kto"):
        load_preference_data(cfg(tmp_path, [path]), TOK, unpaired=False)
    c = Config()
    c.data.unpair = True
    with pytest.raises(ConfigError, match=r"data\.unpair"):
        validate(c)
    c = Config()
    c.loss.name, c.data.shape = ["kto"], "standard"
    with pytest.raises(ConfigError, match=r"data\.shape: 'standard' reads pairs.*unpair"):
        validate(c)
    c.data.unpair = True
    validate(c)  # pairs split into rows: fine


# ------------------------------------------------------------------------------------------ partners


def test_kl_partner_rule_equals_mismatched_indices():
    """The O(n) rule over the seeded permutation is the loss module's rule (next differing prompt,
    cyclically), and never the row itself or a row with the same prompt."""
    import numpy as np

    gen = random.Random(0)
    for trial in range(30):
        n = gen.randint(2, 40)
        keys = [gen.randint(0, gen.randint(1, 6)) for _ in range(n)]
        if len(set(keys)) < 2:
            keys[0] = -1
        partner = kl_partners(keys, seed=trial)
        perm = np.random.default_rng([trial, 0x4B4C, 0]).permutation(n)
        p, c = mismatched_indices(n, [keys[i] for i in perm])
        assert p.tolist() == list(range(n))
        expected = np.empty(n, dtype=np.int64)
        expected[perm[p.numpy()]] = perm[c.numpy()]
        assert partner.tolist() == expected.tolist()
        assert all(partner[i] != i and keys[partner[i]] != keys[i] for i in range(n))
    keys = list(range(50))
    assert kl_partners(keys, 0).tolist() == kl_partners(keys, 0).tolist()
    assert kl_partners(keys, 0).tolist() != kl_partners(keys, 1).tolist()
    assert kl_partners(keys, 0, split=1).tolist() != kl_partners(keys, 0).tolist()


def _partners(data, records, tok=TOK, eos=True):
    """For each row, the records whose completion after the row's prompt tokenizes exactly to
    prompt_ids + rejected_ids (exact boundary), asserting there is exactly one."""
    found = []
    for row in data:
        prompt = next(
            r["prompt"] for r in records if r["completion"] in tok.decode(row["chosen_ids"])
        )
        whole = row["prompt_ids"] + row["rejected_ids"]
        hits = [
            j
            for j, r in enumerate(records)
            if ids(prompt + r["completion"], tok) + ([tok.eos_token_id] if eos else []) == whole
        ]
        assert len(hits) == 1, (row, hits)
        found.append(hits[0])
    return found


@pytest.mark.parametrize("tok", [TOK, bytelevel_tokenizer()], ids=["char-merges", "byte-bpe"])
def test_exact_boundaries_of_completion_and_kl_rows(tmp_path, tok):
    """prompt_ids + chosen_ids == tokenize(prompt_i + completion_i) + EOS and prompt_ids + rejected_ids ==
    tokenize(prompt_i + completion_j) + EOS, with one prompt_ids for both (the common prefix: a token
    straddling the boundary, "? " here, belongs to the completions)."""
    records = [
        {"prompt": f"Question {i % 3}?", "completion": f" answer{i} ab", "label": i % 4 != 0}
        for i in range(15)
    ]
    path = write_jsonl(tmp_path / "u.jsonl", records)
    data = load_preference_data(cfg(tmp_path, [path]), tok, seed=3)
    eos = tok.eos_token_id
    for row, r in zip(data.train, records):
        assert row["prompt_ids"] + row["chosen_ids"] == [
            *ids(r["prompt"] + r["completion"], tok),
            eos,
        ]
        assert row["label"] == r["label"]
    partners = _partners(data.train, records, tok)
    assert all(records[j]["prompt"] != records[i]["prompt"] for i, j in enumerate(partners))
    if tok is TOK:  # "? " merged: the prompt stops before "?", both completions start with "? "
        assert TOK.decode(data.train[0]["prompt_ids"]) == "<s>Question 0"
    # deterministic with the seed, another seed other partners (and another cache entry)
    again = load_preference_data(cfg(tmp_path, [path]), tok, seed=3)
    assert again.cache_hit and _partners(again.train, records, tok) == partners
    other = load_preference_data(cfg(tmp_path, [path]), tok, seed=4)
    assert not other.cache_hit and other.fingerprint != data.fingerprint
    assert _partners(other.train, records, tok) != partners


def test_eval_split_takes_partners_within_itself(tmp_path):
    records = rows(20)
    path = write_jsonl(tmp_path / "u.jsonl", records)
    data = load_preference_data(cfg(tmp_path, [path], eval_fraction=0.3), TOK, seed=1)
    assert len(data.eval) == 6 and len(data.train) == 14
    for split in (data.train, data.eval):
        own = {TOK.decode(r["chosen_ids"]) for r in split}
        assert all(TOK.decode(r["rejected_ids"]) in own for r in split)
    assert sum(data.labels["eval"].values()) == 6


def test_one_prompt_cannot_give_kl_rows(tmp_path):
    records = [{"prompt": "Same?", "completion": f" a{i}", "label": i % 2} for i in range(4)]
    path = write_jsonl(tmp_path / "u.jsonl", records)
    with pytest.raises(DataError, match=r"all 4 train rows have the same prompt.*2 distinct"):
        load_preference_data(cfg(tmp_path, [path]), TOK)


# ------------------------------------------------------------------------------- chat and truncation


def test_conversational_rows_multi_turn_and_whole_conversations(tmp_path):
    records = []
    for i in range(6):
        prompt = [
            {"role": "user", "content": f"hi {i}"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": f"question {i}?"},
        ]
        completion = [{"role": "assistant", "content": f"answer {i}"}]
        record = {"prompt": prompt, "completion": completion, "label": "good" if i % 2 else "bad"}
        if i == 4:  # a whole conversation in the completion column, no prompt
            record = {"completion": prompt + completion, "label": "good"}
            record["prompt"] = None
        records.append(record)
    records[5]["system"] = "be brief"
    path = write_jsonl(tmp_path / "chat.jsonl", records[:4] + records[5:])
    extra = write_jsonl(tmp_path / "whole.jsonl", [{k: v for k, v in records[4].items() if v}])
    data = load_preference_data(cfg(tmp_path, [path, extra]), TOK)
    assert data.shapes[str(path)] == "unpaired conversational"
    assert data.shapes[str(extra)] == "unpaired implicit"
    order = records[:4] + records[5:] + records[4:5]
    convs = []
    for r in order:
        prompt = r["prompt"] or r["completion"][:-1]
        if r.get("system"):
            prompt = [{"role": "system", "content": r["system"]}, *prompt]
        convs.append((prompt, r["completion"][-1:]))
    for row, (prompt, completion) in zip(data.train, convs):
        full = TOK.apply_chat_template(prompt + completion, tokenize=False)
        assert row["prompt_ids"] + row["chosen_ids"] == ids(full, specials=False)
        kl = [
            TOK.apply_chat_template(prompt + other, tokenize=False)
            for p, other in convs
            if p != prompt
        ]
        whole = row["prompt_ids"] + row["rejected_ids"]
        assert sum(ids(t, specials=False) == whole for t in kl) == 1


def test_truncation_like_pairs_and_drops_per_reason(tmp_path):
    records = rows(6)
    records[1]["prompt"] = "x" * 40 + "?"  # prompt kept from the left end
    records[2]["completion"] = " " + "c" * 40  # completion cut on the right
    path = write_jsonl(tmp_path / "u.jsonl", records)
    data = load_preference_data(cfg(tmp_path, [path], max_length=20, max_prompt_length=8), TOK)
    row1, row2 = data.train[1], data.train[2]
    assert len(row1["prompt_ids"]) == 8 and row1["prompt_ids"][0] == TOK.bos_token_id
    # the "?" went to the completion (the "? " merge straddles the boundary)
    assert TOK.decode(row1["prompt_ids"][1:]) == "xxxxxxx"
    assert len(row2["prompt_ids"]) + len(row2["chosen_ids"]) == 20
    assert data.truncations["prompt"] == 1 and data.truncations["completion"] >= 1
    assert data.truncations["kl_completion"] >= 1  # some row's KL row is the long completion
    too_long = load_preference_data(
        cfg(tmp_path, [path], max_length=20, max_prompt_length=None), TOK
    )
    assert too_long.drops["prompt_too_long"] == 1 and len(too_long.train) == 5


# ------------------------------------------------------------------------------------------ describe


def test_preftune_data_reports_the_ratio_and_the_weighting_rule(tmp_path, capsys):
    from preftune.cli import main
    from preftune.describe import describe_dataset, format_description

    path = write_jsonl(tmp_path / "u.jsonl", rows(22, [i % 11 == 0 for i in range(22)]))
    c = Config()
    c.data.train_files, c.data.cache_dir = [str(path)], str(tmp_path / "cache")
    text = format_description(describe_dataset(c, TOK, examples=1))
    assert "labels:    2 desirable : 20 undesirable (1:10)" in text
    assert "with 1:10 data set loss.params.desirable_weight≈10–13" in text
    assert "KL row: ⟦" in text
    assert main(["data", str(path)]) == 0  # no tokenizer: records checked
    out = capsys.readouterr().out
    assert "labels:    2 desirable : 20 undesirable (1:10)" in out and "≈10–13" in out
    pairs = write_jsonl(tmp_path / "p.jsonl", STANDARD)
    assert main(["data", str(pairs), "data.unpair=true"]) == 0
    assert "labels:    3 desirable : 3 undesirable (1:1)" in capsys.readouterr().out
    assert ratio_text(30, 10) == "3:1" and ratio_text(10, 15) == "1:1.5"
    rule = weight_advice(30, 10)  # desirable-heavy: raise λ_U to 3/4·3 … 3
    assert (rule["key"], rule["low"], rule["high"]) == ("undesirable_weight", 2.25, 3.0)
    assert weight_advice(100, 900, desirable_weight=10.0)["ok"]


# ------------------------------------------------------------------------------------------ training


def _kto_file(tmp_path):
    gen = random.Random(0)
    records = []
    for i in range(64):
        word = "".join(gen.choice(string.ascii_lowercase) for _ in range(gen.randint(3, 8)))
        good = i % 2 == 0
        completion = f" yes {word[::-1]}." if good else " no."
        records.append({"prompt": f"{word}?", "completion": completion, "label": good})
    return write_jsonl(tmp_path / "kto.jsonl", records)


def _metrics(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["split"] == "train"]


def test_kto_trains_on_an_unpaired_file(tiny_dir, tmp_path):
    """At θ₀, r = 0 and z₀ = 0: every row's term is λ·σ(0) = 1/2, so the first loss is exactly 0.5;
    then desirable rewards rise above undesirable ones, and the KL estimate is logged."""
    from _tiny import tiny_train_config

    from preftune.trainer import train

    data = _kto_file(tmp_path)
    c = tiny_train_config(tiny_dir, data, tmp_path / "run", loss__name=["kto"], train__max_steps=20)
    train(c)
    ms = _metrics(tmp_path / "run")
    assert ms[0]["loss"] == pytest.approx(0.5, abs=1e-6) and ms[0]["kl"] == 0.0
    last = ms[-3:]
    good = sum(m["rewards/desirable"] for m in last) / 3
    bad = sum(m["rewards/undesirable"] for m in last) / 3
    assert good > bad + 0.3, (good, bad)
    assert all("kl" in m for m in ms) and any(m["kl"] > 0 for m in ms)
    assert ms[-1]["loss"] < 0.45


def test_kto_with_precomputed_reference_caches_the_kl_rows(tiny_dir, tmp_path):
    """The precomputed table's 'rejected' column holds θ₀'s log-probs of the KL rows."""
    from _tiny import tiny_train_config
    from transformers import AutoModelForCausalLM

    from preftune.trainer import train

    data = _kto_file(tmp_path)
    c = tiny_train_config(tiny_dir, data, tmp_path / "run", loss__name=["kto"],
                          train__max_steps=2, reference__strategy="precomputed")  # fmt: skip
    c.reference.cache_dir = str(tmp_path / "ref")
    train(c)
    assert _metrics(tmp_path / "run")[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    [path] = (tmp_path / "ref" / "reference").glob("*.pt")
    table = torch.load(path, weights_only=True)["tables"]["train"]
    rows = load_preference_data(c.data, char_tokenizer_of(tiny_dir), seed=c.train.seed).train
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    for i in (0, 1, 17):
        prompt, kl = rows[i]["prompt_ids"], rows[i]["rejected_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + kl])).logits[0, len(prompt) - 1 : -1]
        expected = logits.log_softmax(-1).gather(1, torch.tensor(kl)[:, None]).sum()
        assert float(table[i, 1]) == pytest.approx(float(expected), abs=1e-4)


def char_tokenizer_of(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
