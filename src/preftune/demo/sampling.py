"""Batched generation from a demo model folder: the one place prompts are padded and answers decoded.

Both pair building (many samples per training prompt) and evaluation (greedy and sampled answers on
held-out prompts) go through :func:`generate_ids`, so they see the model the same way: BOS + prompt,
left-padded, answer tokens up to and including the first EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

__all__ = ["decode_answers", "generate_answers", "generate_ids", "load_model_and_tokenizer"]


def load_model_and_tokenizer(model_dir: str | Path):
    """Load a demo model folder (fp32, CPU, eval mode) and its tokenizer; returns ``(model, tokenizer)``."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer


@torch.inference_mode()
def generate_ids(
    model: PreTrainedModel,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    max_new_tokens: int = 6,
    batch_size: int = 512,
    seed: int | None = None,
) -> list[list[list[int]]]:
    """Response token ids, ``out[i][k]`` for prompt ``i`` and sample ``k``.

    Each response is cut after its first EOS (kept, as it is part of the scored response) and carries
    no padding; a response that hit ``max_new_tokens`` has no EOS. Sampling is pure temperature
    sampling (no top-k/top-p), so samples follow the model's distribution, which the sampled-KL estimate
    relies on. ``seed`` makes sampling reproducible without disturbing the global RNG.
    """
    if not do_sample and num_samples != 1:
        raise ValueError("greedy decoding gives one answer per prompt; use do_sample=True for more")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen_kwargs: dict = {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": pad}
    if do_sample:
        gen_kwargs |= {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        gen_kwargs["num_return_sequences"] = num_samples
    else:
        gen_kwargs["do_sample"] = False
    out: list[list[list[int]]] = []
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
            seqs = model.generate(**enc, **gen_kwargs)  # [len(chunk) * num_samples, T + new]
            new = seqs[:, enc["input_ids"].shape[1] :].tolist()  # one host copy per batch
            for i in range(len(chunk)):
                out.append(
                    [
                        _cut_after_eos(row, eos)
                        for row in new[i * num_samples : (i + 1) * num_samples]
                    ]
                )
    return out


def _cut_after_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def decode_answers(tokenizer, ids: list[list[list[int]]]) -> list[list[str]]:
    """Answer texts for :func:`generate_ids` output (special tokens dropped)."""
    return [
        [tokenizer.decode(r, skip_special_tokens=True) for r in per_prompt] for per_prompt in ids
    ]


def generate_answers(
    model: PreTrainedModel, tokenizer, prompts: Sequence[str], **kwargs
) -> list[list[str]]:
    """:func:`generate_ids` decoded to text: ``out[i][k]`` is sample ``k`` for prompt ``i``."""
    return decode_answers(tokenizer, generate_ids(model, tokenizer, prompts, **kwargs))
