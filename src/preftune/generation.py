"""Prompt -> text generation with a model folder, .gguf file or Hub id (used by ``preftune generate``).

fp32 on CPU; the decoding is ``preftune sample``'s (:mod:`preftune.sampling`), one answer per prompt.
Temperature 0 means greedy decoding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["generate", "load_for_generation", "read_prompts"]


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: JSONL (``.jsonl``/``.json`` lines with a ``prompt`` field) or one per line.

    Blank lines are skipped. Raises ValueError naming the line for a JSONL line without a string prompt.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() not in (".jsonl", ".json"):
        return [line for line in lines if line.strip()]
    prompts = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            raise ValueError(f"{path}, line {lineno}: field 'prompt' must be a string")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def load_for_generation(source: Any, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a :class:`preftune.model.ModelSource` (or a local folder): fp32, eval mode,
    KV cache on, tokenizer padding on the left."""
    from preftune.model import load_model, load_tokenizer, resolve_device, resolve_source

    if not hasattr(source, "pretrained_kwargs"):
        source = resolve_source(source, setting="--model")
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    model = load_model(source, device=resolve_device("auto"), trust_remote_code=trust_remote_code)
    model.config.use_cache = True
    model.eval()
    tokenizer.padding_side = "left"
    return model, tokenizer


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    batch_size: int = 8,
) -> list[str]:
    """One completion per prompt (special tokens stripped), decoded as ``preftune sample`` decodes
    (:class:`preftune.sampling.HFGenerator`: batched, left-padded, KV-cached; ``temperature == 0`` is greedy,
    else prompt ``i`` is sampled with the noise of ``(seed, i)``, so batching does not change it)."""
    from preftune.sampling import HFGenerator, SamplingSettings, _prompt_ids

    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; drop --chat")
    settings = SamplingSettings(
        num_samples=1, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        seed=seed, chat=chat,
    )  # fmt: skip
    settings.check()
    generator = HFGenerator(model, tokenizer, settings)
    ids = [_prompt_ids(tokenizer, p, chat) for p in prompts]
    out: list[str] = []
    for start in range(0, len(ids), batch_size):
        batch = list(range(start, min(start + batch_size, len(ids))))
        for (answer,) in generator([ids[i] for i in batch], batch):
            out.append(tokenizer.decode(answer, skip_special_tokens=True))
    return out
