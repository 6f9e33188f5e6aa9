"""Shared fixtures for the data tests: tiny tokenizers built offline, a DataConfig stand-in, file writers."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]

# Prefix-stable: the generation prompt "<|assistant|>" is exactly how an assistant turn starts.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Not prefix-stable: the generation prompt differs from how an assistant turn is rendered.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}Bot: {% else %}User: {% endif %}"
    "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class DataCfg:
    """Stand-in for preftune.config.DataConfig (same fields and defaults)."""

    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    eval_fraction: float = 0.0
    format: str = "auto"
    shape: str = "auto"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    weight_column: str | None = None
    max_length: int = 1024
    max_prompt_length: int | None = 512
    prompt_truncation: str = "left"
    add_eos: bool = True
    on_drop: str = "count"
    cache_dir: str | None = None
    group_by_length: bool = False
    padding_free: bool = False


class CountingTokenizer(PreTrainedTokenizerFast):
    """Counts encode calls, to prove a cache hit does not tokenize."""

    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


def char_tokenizer(
    merges=(), *, bos=True, chat_template=CHAT_TEMPLATE, cls=PreTrainedTokenizerFast
):
    """Character-level BPE (printable ASCII + newline) with optional merges and no pre-tokenizer, so merges
    may span any boundary. ``<s>`` is added in front by the post-processor when ``bos``."""
    chars = list(string.printable.replace("\x0b", "").replace("\x0c", ""))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ROLE_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    merge_pairs = []
    for a, b in merges:
        merge_pairs.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS + ROLE_TOKENS)
    tok.decoder = decoders.Fuse()  # decode without spaces between characters
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    hf = cls(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    hf.chat_template = chat_template
    return hf


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France? Answer: Paris is the capital.",
    "Question: how many legs does a spider have? Answer: eight legs.",
    "A helpful assistant answers questions clearly and briefly.",
    "I do not know the answer to that question, sorry.",
]


def bytelevel_tokenizer(vocab_size=320):
    """A small byte-level BPE (GPT-2 style) trained on a few sentences, with BOS added by the post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def write_jsonl(path, records, *, newline="\n", bom=False):
    text = newline.join(json.dumps(r) for r in records) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


STANDARD = [
    {"prompt": "Q: capital of France?\nA:", "chosen": " Paris.", "rejected": " Rome."},
    {"prompt": "Q: legs of a spider?\nA:", "chosen": " eight", "rejected": " six"},
    {"prompt": "Q: color of the sky?\nA:", "chosen": " blue", "rejected": " green"},
]


def conversational(n=3):
    return [
        {
            "prompt": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"question {i}?"},
            ],
            "chosen": [{"role": "assistant", "content": f"good answer {i}"}],
            "rejected": [{"role": "assistant", "content": f"bad {i}"}],
        }
        for i in range(n)
    ]
