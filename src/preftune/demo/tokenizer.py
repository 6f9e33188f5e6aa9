"""A character-level tokenizer for the demo task, built with the ``tokenizers`` library.

One token per character keeps the prompt/response boundary trivial (``tokenize(prompt + answer) ==
tokenize(prompt) + tokenize(answer)`` apart from BOS), so preference data needs no boundary handling,
and the vocabulary is small enough that the whole model stays under a few MB. It is saved as a normal
Hugging Face tokenizer folder, so ``AutoTokenizer.from_pretrained`` loads it like any other model's.

Like Llama tokenizers, encoding adds BOS but not EOS: the preference-data code appends EOS to responses.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["BOS", "CHARS", "EOS", "PAD", "UNK", "VOCAB", "build_tokenizer", "save_tokenizer"]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CHARS = "0123456789+="
"""Every character the task uses; anything else encodes to UNK."""

VOCAB: dict[str, int] = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARS])}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The demo tokenizer: one id per character of :data:`CHARS`, BOS prepended, pad/eos/bos/unk set."""
    core = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every char a token
    core.decoder = decoders.Fuse()  # join characters back without spaces
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer and write it as a Hugging Face tokenizer folder; returns it."""
    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok
