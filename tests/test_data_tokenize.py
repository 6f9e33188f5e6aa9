"""preftune.data.tokenize: the exact prompt/response boundary, EOS/BOS, truncation policies, drops."""

import json
import os
import random
import threading
import time

import pytest
from _data_helpers import SENTENCES, DataCfg, bytelevel_tokenizer, char_tokenizer
from transformers import PreTrainedTokenizerFast

from preftune.data import DataError, Location, load_preference_data
from preftune.data.shapes import Columns, Rendered, render_pair
from preftune.data.tokenize import (
    Drop,
    Settings,
    Tally,
    bound_pair,
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
    assert too_long == Drop("prompt_too_long", "the prompt alone fills max_length 10 tokens")
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


# ---------------------------------------------------------------------------------------------------
# Bounded work per record


def _truncated(tok, pair, settings):
    [(p, c, r)] = encode_pairs(tok, [pair], add_eos=settings.add_eos)
    tally = Tally()
    return truncate_pair(p, c, r, settings, tally.truncations, tok.bos_token_id), tally.truncations


def _random_text(rng, n, alphabet="abcdefgh ijk\n.,"):
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("max_prompt_length", [24, None])
@pytest.mark.parametrize("tok_name", ["char", "bytelevel"])
def test_cutting_an_over_long_record_gives_the_same_tokens(tok_name, max_prompt_length, side):
    """bound_pair then the exact pipeline == the exact pipeline on the whole texts: same kept tokens, same
    truncation counts, same drops, for random texts of 20k characters on either side of the prompt, with and
    without a prompt limit, in string and chat form (a template's BOS text in front)."""
    tok = (
        char_tokenizer([("a", "b"), ("ab", "c"), (" ", "a"), ("d", "e")])
        if tok_name == "char"
        else bytelevel_tokenizer()
    )
    settings = Settings(max_length=48, max_prompt_length=max_prompt_length, prompt_truncation=side)
    rng = random.Random(f"{tok_name}{max_prompt_length}{side}")
    cut = 0
    for _ in range(8):
        for chat in (False, True):
            prompt = _random_text(rng, rng.choice([20, 20_000]))
            if chat:
                prompt = f"<s><|user|>{prompt}</s><|assistant|>"
            pair = Rendered(
                prompt,
                _random_text(rng, rng.choice([5, 20_000])),
                _random_text(rng, rng.choice([5, 20_000])),
                chat,
            )
            bounded = bound_pair(tok, pair, settings)
            cut += bounded is not pair
            assert max(map(len, (bounded.prompt, bounded.chosen, bounded.rejected))) < 5_000
            assert _truncated(tok, bounded, settings) == _truncated(tok, pair, settings)
    assert cut >= 8  # the cut path was taken, not only the short one


def test_tokens_longer_than_the_first_guess_are_not_cut_short():
    """A tokenizer whose tokens are whole words (one UNK for any unknown word): a record of few, very long
    tokens is not over-long, so it is not cut (the cut is verified, not assumed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    words = ["x" * 3000] * 20
    pair = Rendered(" ".join(words), " a " + " ".join(words), " a", chat=False)
    settings = Settings(max_length=48, max_prompt_length=24)
    bounded = bound_pair(hf, pair, settings)
    assert bounded.prompt == pair.prompt and bounded.chosen == pair.chosen  # 20 tokens: kept whole
    assert _truncated(hf, bounded, settings) == _truncated(hf, pair, settings)


class _NoHugeCalls(PreTrainedTokenizerFast):
    """Fails at once when asked to tokenize a text of a megabyte or more."""

    def __call__(self, text, *args, **kwargs):
        texts = [text] if isinstance(text, str) else text
        assert max(map(len, texts)) < 1_000_000, "a huge record was tokenized whole"
        return super().__call__(text, *args, **kwargs)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to measure memory")
def test_a_50_mb_record_costs_bounded_time_and_memory(tmp_path):
    tok = char_tokenizer([("a", "b")], cls=_NoHugeCalls)
    big = "ab cd " * (50_000_000 // 6)
    records = [
        {"prompt": "Q: " + big, "chosen": " yes " + big, "rejected": " no."},
        {"prompt": "q", "chosen": " a", "rejected": " b"},
    ]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps(records[1]) + "\n")
    del big, records
    cfg = DataCfg(cache_dir=str(tmp_path / "cache"), max_length=64, max_prompt_length=32)
    cfg.train_files = [str(small)]
    load_preference_data(cfg, tok)  # warm: imports and first-use costs are not the record's

    base = _rss()
    peak, done = [base], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    try:
        cfg.train_files = [str(path)]
        data = load_preference_data(cfg, tok)
    finally:
        done.set()
        sampler.join()
    elapsed, growth = time.perf_counter() - start, peak[0] - base
    # Tokenizing 100M characters whole takes minutes and tens of GB; the record itself is 100 MB of text
    # held a few times over (file line, decoded line, parsed strings, rendered texts).
    assert elapsed < 5.0, elapsed
    assert growth < 1e9, growth / 1e6
    row = data.train[0]
    assert len(row["prompt_ids"]) == 32 and len(row["prompt_ids"]) + len(row["chosen_ids"]) == 64
    assert data.truncations == {"prompt": 1, "chosen": 1, "rejected": 0}
