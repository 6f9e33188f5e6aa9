"""Tiny models, tokenizers and preference data built inside the tests (nothing is downloaded)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

CHARS = string.ascii_lowercase + string.digits + " ?!.,:+-=\n"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


#: The default chat template: ``role: content`` lines, then ``assistant: ``.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
#: The CLI tests' template: BOS first, ``assistant:`` without the space.
BOS_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_char_tokenizer(
    out_dir: Path, *, bos: bool = True, fuse: bool = False, chat_template: str = CHAT_TEMPLATE
):
    """A character-level fast tokenizer (one token per character) saved as a HF tokenizer folder.

    ``fuse``: decode characters back together (``"hi"``, not ``"h i"``), as a real tokenizer does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    if fuse:
        tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = chat_template
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_llama(
    out_dir: Path,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    tie: bool = True,
    save_tokenizer: bool = True,
    **tokenizer_kwargs,
):
    """A random-init tiny Llama saved (safetensors) with the char tokenizer beside it
    (``tokenizer_kwargs``: :func:`make_char_tokenizer`'s)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = make_char_tokenizer(out_dir, **tokenizer_kwargs) if save_tokenizer else None
    vocab_size = vocab_size or len(SPECIALS) + len(CHARS)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model, tokenizer


def toy_pairs(n: int = 64, seed: int = 0) -> list[dict]:
    """A learnable preference: for a word prompt, prefer ' yes <word>' over ' no'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        rows.append({"prompt": f"{word}?", "chosen": f" yes {word[::-1]}.", "rejected": " no."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_train_config(model_dir: Path, data_file: Path, out: Path, **over):
    """A fast, quiet, seeded training config; ``section__key=value`` keyword overrides."""
    from preftune.config import Config, validate

    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.data.train_files = [str(data_file)]
    cfg.data.max_length = 64
    cfg.data.max_prompt_length = 32
    cfg.train.output_dir = str(out)
    cfg.train.batch_size = 8
    cfg.train.max_steps = 4
    cfg.train.seed = 0
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_ratio = 0.0
    cfg.log.log_every = 1
    cfg.log.progress = False
    cfg.log.report_to = []
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    validate(cfg)
    return cfg
