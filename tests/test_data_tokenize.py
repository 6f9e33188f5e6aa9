"""preftune.data.tokenize: the exact prompt/response boundary, EOS/BOS, truncation policies, drops."""

import random

import pytest
from _data_helpers import SENTENCES, bytelevel_tokenizer, char_tokenizer

from preftune.data import DataError, Location
from preftune.data.shapes import Columns, Rendered, render_pair
from preftune.data.tokenize import (
    Drop,
    Settings,
    Tally,
    boundary_index,
    check_tokenizer,
    encode_pairs,
    truncate_pair,
)

LOC = Location("pairs.jsonl", line=3)


def _ids(tok, text, specials=True):
    return tok(text, add_special_tokens=specials)["input_ids"]


def test_merge_across_the_boundary_goes_to_the_response():
    """Prompt "ab", chosen "c": the merge b+c straddles the boundary, so "bc" is a response token and the
    prompt is the tokens BOTH full texts agree on within the prompt: <s> a."""
    tok = char_tokenizer([("b", "c")])
    v = tok.get_vocab()
    assert _ids(tok, "abc") == [v["<s>"], v["a"], v["bc"]]
    [(prompt, chosen, rejected)] = encode_pairs(
        tok, [Rendered("ab", "c", "d", chat=False)], add_eos=True
    )
    eos = tok.eos_token_id
    assert prompt == [v["<s>"], v["a"]]
    assert chosen == [v["bc"], eos]
    assert rejected == [v["b"], v["d"], eos]
    assert prompt + chosen == [*_ids(tok, "abc"), eos]
    assert prompt + rejected == [*_ids(tok, "abd"), eos]


def test_boundary_index():
    assert (
        boundary_index([(0, 0), (0, 1), (1, 3)], 2) == 2
    )  # BOS (0,0) is a prompt token; (1,3) straddles
    assert boundary_index([(0, 0), (0, 1), (1, 2), (2, 3)], 2) == 3
    assert boundary_index([(0, 0)], 0) == 1


def test_exactness_property_on_a_byte_level_bpe():
    """prompt_ids + response_ids == tokenize(prompt + response) (+ EOS) for many random cut points."""
    tok = bytelevel_tokenizer()
    rng = random.Random(0)
    pairs = []
    for _ in range(200):
        a, b = rng.sample(SENTENCES, 2)
        cut = rng.randrange(1, len(a) - 1)
        pairs.append(Rendered(a[:cut], a[cut:], b[rng.randrange(0, len(b) - 1) :], chat=False))
    eos = tok.eos_token_id
    for r, (p, c, rej) in zip(pairs, encode_pairs(tok, pairs, add_eos=True)):
        assert p + c == [*_ids(tok, r.prompt + r.chosen), eos]
        assert p + rej == [*_ids(tok, r.prompt + r.rejected), eos]
        assert c and rej and p[0] == tok.bos_token_id
        # the prompt tokens decode to a prefix of the prompt text (nothing of the response leaks in)
        assert r.prompt.startswith(tok.decode(p, skip_special_tokens=True))


def test_eos_not_doubled_and_optional():
    tok = char_tokenizer()
    eos = tok.eos_token_id
    [(_, c, r)] = encode_pairs(tok, [Rendered("Q", " a</s>", " b", chat=False)], add_eos=True)
    assert c[-1] == eos and c[-2] != eos and r[-1] == eos
    [(_, c, r)] = encode_pairs(tok, [Rendered("Q", " a", " b", chat=False)], add_eos=False)
    assert eos not in c + r


def test_chat_text_gets_no_extra_specials():
    tok = char_tokenizer()
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"}
    rendered = render_pair(record, "conversational", Columns(), LOC, tok)
    [(p, c, r)] = encode_pairs(tok, [rendered], add_eos=True)
    assert (
        p.count(tok.bos_token_id) == 1 and p[0] == tok.bos_token_id
    )  # the template's BOS, not a second one
    assert p[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert c == _ids(tok, "yes</s>", specials=False)  # the template's end of turn, no appended EOS
    assert r == _ids(tok, "no</s>", specials=False)


def _settings(**kw):
    return Settings(**{"max_length": 10, "max_prompt_length": 4, **kw})


def test_prompt_truncation_left_keeps_end_and_bos_right_keeps_start():
    bos, tally = 1, Tally()
    prompt = [bos, 10, 11, 12, 13, 14]
    out = truncate_pair(prompt, [20, 21], [30], _settings(), tally.truncations, bos)
    assert out == ([bos, 12, 13, 14], [20, 21], [30])
    out = truncate_pair(
        prompt, [20], [30], _settings(prompt_truncation="right"), tally.truncations, bos
    )
    assert out == ([bos, 10, 11, 12], [20], [30])
    out = truncate_pair([10, 11, 12, 13, 14], [20], [30], _settings(), tally.truncations, bos)
    assert out == ([11, 12, 13, 14], [20], [30])  # no BOS to keep
    assert tally.truncations == {"prompt": 3, "chosen": 0, "rejected": 0}


def test_responses_keep_their_start():
    tally = Tally()
    out = truncate_pair(
        [1, 2, 3], list(range(20, 30)), [30, 31], _settings(), tally.truncations, None
    )
    assert out == ([1, 2, 3], [20, 21, 22, 23, 24, 25, 26], [30, 31])  # 10 - 3 = 7 response tokens
    assert tally.truncations == {"prompt": 0, "chosen": 1, "rejected": 0}


def test_drops():
    t = Tally().truncations
    too_long = truncate_pair([1] * 10, [2], [3], _settings(max_prompt_length=None), t, None)
    assert too_long == Drop("prompt_too_long", "10 prompt tokens >= max_length 10")
    same = truncate_pair([1], [5] * 12, [5] * 9 + [6], _settings(), t, None)
    assert isinstance(same, Drop) and same.reason == "identical_after_truncation"
    empty = truncate_pair([1], [], [3], _settings(), t, None)
    assert isinstance(empty, Drop) and empty.reason == "empty_response_after_truncation"


def test_tally_counts_or_raises():
    tally = Tally()
    tally.drop("prompt_too_long", LOC, "count")
    tally.drop("prompt_too_long", Location("b.csv", line=9), "count")
    assert tally.drops["prompt_too_long"] == 2 and tally.first_drop["prompt_too_long"] == str(LOC)
    with pytest.raises(
        DataError, match=r"pairs\.jsonl, line 3: pair dropped \(chosen_equals_rejected"
    ):
        tally.drop("chosen_equals_rejected", LOC, "error")


def test_settings_and_tokenizer_checks():
    with pytest.raises(DataError, match="prompt_truncation must be 'left' or 'right'"):
        Settings.from_config(type("C", (), {"prompt_truncation": "middle"})())
    with pytest.raises(DataError, match="max_length must be >= 2"):
        Settings.from_config(type("C", (), {"max_length": 1})())
    with pytest.raises(DataError, match="not a fast tokenizer"):
        check_tokenizer(type("Slow", (), {"is_fast": False})(), Settings())
