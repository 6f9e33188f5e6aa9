"""preftune.generation: prompts from files, a model ready to generate, and batched left-padded decoding
equal to one prompt at a time (greedy), seeded sampling, chat prompts."""

from __future__ import annotations

import pytest
import torch

from preftune.generation import generate, load_for_generation, read_prompts


def test_read_prompts_from_text_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first?\n\n  \nsecond?\n")
    assert read_prompts(txt) == ["first?", "second?"]  # one a line, blank lines skipped
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "one?"}\n\n{"prompt": "two?", "other": 1}\n')
    assert read_prompts(jsonl) == ["one?", "two?"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"prompt": "ok"}\n{"text": "no prompt"}\n', "line 2: field 'prompt' must be a string"),
        ('{"prompt": "ok"}\nnot json\n', "line 2: not valid JSON"),
        ('{"prompt": 3}\n', "line 1: field 'prompt' must be a string"),
        ("\n\n", "no prompts"),
    ],
)
def test_read_prompts_names_the_bad_line(tmp_path, text, needle):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        read_prompts(path)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_generation(model_dir)


def test_load_for_generation_is_ready_to_generate(loaded):
    model, tokenizer = loaded
    assert not model.training and model.config.use_cache
    assert tokenizer.padding_side == "left"
    assert {p.dtype for p in model.parameters()} == {
        torch.float32
    }  # fp32, whatever it was saved in


def test_batched_left_padding_matches_one_by_one(loaded):
    model, tok = loaded
    prompts = ["a?", "a much longer prompt?", "mid size?"]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(0 < len(c) <= 6 for c in batched)  # char tokenizer: at most one character a token


def test_sampling_is_seeded_and_chat_uses_the_template(loaded):
    model, tok = loaded
    prompts = ["a?", "mid size?"]
    kwargs = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9}
    assert generate(model, tok, prompts, seed=1, **kwargs) == generate(
        model, tok, prompts, seed=1, **kwargs
    )
    # each prompt draws its own noise: a batch of two samples what two batches of one do
    assert generate(model, tok, prompts, seed=1, batch_size=2, **kwargs) == generate(
        model, tok, prompts, seed=1, batch_size=1, **kwargs
    )
    assert len(generate(model, tok, ["hi"], max_new_tokens=3, chat=True)) == 1
    template = tok.chat_template
    try:
        tok.chat_template = None
        with pytest.raises(ValueError, match="no chat template"):
            generate(model, tok, ["hi"], max_new_tokens=3, chat=True)
    finally:
        tok.chat_template = template
