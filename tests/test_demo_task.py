"""Tests for preftune.demo: the judge, the split, the tokenizer, the shipped base model, pair building."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.demo import BASE_MODEL_DIR, task
from preftune.demo.evaluate import implicit_reward_accuracy, sampled_kl, task_reward
from preftune.demo.pairs import build_pairs, judge_pairs, write_pairs
from preftune.demo.tokenizer import VOCAB, save_tokenizer


@pytest.fixture(scope="module")
def base():
    model = AutoModelForCausalLM.from_pretrained(str(BASE_MODEL_DIR), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(BASE_MODEL_DIR))


# --- the judge -------------------------------------------------------------------------------------


def test_judge_exact_answers():
    assert task.make_prompt(12, 345) == "12+345="
    assert task.parse_prompt("12+345=") == (12, 345)
    assert task.target("999+999=") == "1998"
    assert task.is_correct("12+345=", "357")
    assert task.is_correct("12+345=", " 357 ")  # surrounding whitespace is not an error
    for wrong in ["0357", "35", "3570", "358", "", "357+", "abc"]:
        assert not task.is_correct("12+345=", wrong), wrong
    assert task.reward("0+0=", "0") == 1.0
    assert task.reward("0+0=", "00") == 0.0


def test_judge_partial_credit():
    # right-aligned digit matches / longer length:
    assert task.digit_score("12+345=", "357") == 1.0
    assert task.digit_score("12+345=", "358") == pytest.approx(2 / 3)  # 5,3 match; 8 != 7
    assert task.digit_score("12+345=", "1357") == pytest.approx(3 / 4)  # 7,5,3 match; extra digit
    assert task.digit_score("12+345=", "57") == pytest.approx(2 / 3)  # 7,5 match, one missing digit
    assert task.digit_score("12+345=", "3a7") == 0.0
    assert task.reward("12+345=", "358", partial=True) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="not an addition prompt"):
        task.target("12-3=")


def test_split_is_disjoint_and_reproducible():
    held = task.heldout_prompts(200)
    train = task.sample_prompts(2000, split="train", seed=0)
    assert held == task.heldout_prompts(200)
    assert len(set(held)) == 200 and len(set(train)) == 2000
    assert all(task.is_heldout(*task.parse_prompt(p)) for p in held)
    assert not any(task.is_heldout(*task.parse_prompt(p)) for p in train)
    assert not set(held) & set(train)


# --- the tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_round_trip(tmp_path):
    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    ids = tok("12+345=")["input_ids"]
    assert ids == [tok.bos_token_id] + [VOCAB[c] for c in "12+345="]  # BOS added, no EOS
    assert tok.decode(ids, skip_special_tokens=True) == "12+345="
    # one token per character: prompt + answer tokenizes as the concatenation (no boundary merges)
    joint = tok("12+345=357")["input_ids"]
    assert joint == ids + tok("357", add_special_tokens=False)["input_ids"]
    assert tok("1x")["input_ids"][-1] == tok.unk_token_id


# --- the shipped base model ------------------------------------------------------------------------


def test_shipped_base_model_is_small_and_documented():
    total = sum(f.stat().st_size for f in BASE_MODEL_DIR.iterdir())
    assert total < 5 * 2**20
    meta = json.loads((BASE_MODEL_DIR / "preftune_demo.json").read_text())
    assert meta["rebuild"].startswith("python -m preftune.demo.build_base")
    assert meta["task"]["digits"] == task.DEFAULT_DIGITS


def test_shipped_base_model_is_imperfect_but_useful(base):
    model, tok = base
    greedy = task_reward(model, tok, task.heldout_prompts(200))
    assert 0.05 < greedy["accuracy"] < 0.95


# --- pairs and evaluation --------------------------------------------------------------------------


def test_judge_pairs_on_hand_samples():
    prompts = ["1+1=", "2+2=", "3+3="]
    answers = [["2", "3", "2", "11"], ["4", "4"], ["5", "7"]]
    pairs, stats = judge_pairs(prompts, answers, max_pairs_per_prompt=5)
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("2", "11"), ("2", "3")]
    assert stats["pairs"] == 2 and stats["all_correct"] == 1 and stats["all_wrong"] == 1
    assert stats["no_pair"] == 2
    assert stats["sample_accuracy"] == pytest.approx(4 / 8)


def test_build_pairs_from_base_model(base, tmp_path):
    model, tok = base
    prompts = task.sample_prompts(48, split="train", seed=3)
    pairs, stats = build_pairs(model, tok, prompts, samples_per_prompt=4, seed=0)
    assert stats["pairs"] == len(pairs) > 0
    assert stats["pairs"] + stats["no_pair"] == len(prompts)  # one pair per usable prompt
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"} and p["prompt"] in prompts
        assert task.reward(p["prompt"], p["chosen"]) > task.reward(p["prompt"], p["rejected"])
    again, _ = build_pairs(model, tok, prompts, samples_per_prompt=4, seed=0)
    assert again == pairs  # seeded
    path = write_pairs(pairs, tmp_path / "pairs.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == pairs


def test_reference_against_itself_has_zero_kl_and_margin(base):
    model, tok = base
    prompts = task.heldout_prompts(16)
    assert sampled_kl(model, model, tok, prompts, num_samples=2)["kl"] == 0.0
    pairs = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    assert implicit_reward_accuracy(model, model, tok, pairs)["margin"] == 0.0
