"""What makes samples: the settings, the per-row seeds, the EOS ids and the generators (``hf``: batched
``model.generate`` with per-row Gumbel-max sampling; ``vllm``). Why sampling this way makes a row's samples
independent of batching and resumes: :mod:`preftune.sampling`'s docstring. Import from there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "HFGenerator",
    "SamplingError",
    "SamplingSettings",
    "VLLMGenerator",
    "eos_ids",
    "row_seed",
]


class SamplingError(ValueError):
    """Bad sampling input or settings (a usage error): one line naming the file and what is wrong."""


@dataclass(frozen=True)
class SamplingSettings:
    """What defines the samples; recorded in every output line and compared on resume."""

    model: str = ""
    num_samples: int = 4
    temperature: float = 1.0  # 0 = greedy (one sample per prompt)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128
    seed: int = 0
    chat: bool = True  # prompts rendered with the chat template
    backend: str = "hf"

    def check(self) -> None:
        """SamplingError for a value generation cannot use."""
        for bad, why in (
            (self.num_samples < 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.temperature < 0, f"temperature must be >= 0, got {self.temperature}"),
            (
                self.temperature == 0 and self.num_samples > 1,
                "temperature 0 (greedy): use 1 sample",
            ),
            (not 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k < 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.max_new_tokens < 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
        ):
            if bad:
                raise SamplingError(why)


def eos_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation_config EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


def row_seed(seed: int, index: int, k: int) -> int:
    """The seed of sample ``k`` of prompt ``index``: a hash, so nearby seeds give unrelated streams."""
    digest = hashlib.sha256(f"preftune-sample:{seed}:{index}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ------------------------------------------------------------------------------------------- generators


class HFGenerator:
    """Batched, left-padded, KV-cached ``model.generate`` with per-row Gumbel-max sampling."""

    def __init__(self, model: Any, tokenizer: Any, settings: SamplingSettings):
        self.model, self.settings = model, settings
        self.eos = eos_ids(tokenizer, model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]

    def __call__(self, batch: list[list[int]], indices: list[int]) -> list[list[list[int]]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        s, k = self.settings, self.settings.num_samples
        rows = [ids for ids in batch for _ in range(k)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        device = self.model.device
        # Greedy decoding over our own warpers + noise: argmax then *is* the sample (sampling's docstring).
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=s.max_new_tokens,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            use_cache=True,  # load_model switches model.config.use_cache off for training
        )
        processors = LogitsProcessorList(_warpers(s))
        if s.temperature > 0:
            seeds = [row_seed(s.seed, idx, j) for idx in indices for j in range(k)]
            processors.append(_RowGumbel(seeds, device))
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                logits_processor=processors,
            )
        new = out[:, width:].tolist()
        return [[_cut(new[i * k + j], self.eos) for j in range(k)] for i in range(len(batch))]


def _warpers(s: SamplingSettings) -> list:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out: list = []
    if s.temperature > 0 and s.temperature != 1.0:
        out.append(TemperatureLogitsWarper(s.temperature))
    if s.top_k > 0:
        out.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1.0:
        out.append(TopPLogitsWarper(s.top_p))
    return out


class _RowGumbel:
    """Adds Gumbel noise, one generator per row: argmax(scores + G) ~ softmax(scores)."""

    def __init__(self, seeds: list[int], device: Any):
        import torch

        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        vocab = scores.shape[-1]
        u = torch.stack(
            [torch.rand(vocab, generator=g, device=scores.device) for g in self.gens]
        ).clamp_min_(1e-20)  # rand may return 0 exactly: keep -log(-log(u)) finite
        return scores.float() - torch.log(-torch.log(u))  # -inf (filtered) stays -inf


def _cut(ids: list[int], eos: list[int]) -> list[int]:
    """Tokens up to and including the first EOS (the padding after it removed)."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


class VLLMGenerator:
    """vLLM backend (optional: only where ``vllm`` imports, i.e. on a GPU). Untested in this repository.

    vLLM draws its own random numbers: a request is seeded with ``row_seed(seed, index, 0)``, so samples
    are reproducible per prompt but differ from the ``hf`` backend's."""

    def __init__(self, source: Any, tokenizer: Any, settings: SamplingSettings):
        try:
            import vllm
        except ImportError as e:
            raise SamplingError("backend vllm: the vllm package is not installed") from e
        path = str(Path(source.name_or_path) / source.gguf_file) if source.gguf_file else None
        self.llm = vllm.LLM(
            model=path or source.name_or_path,
            tokenizer=source.name_or_path,
            revision=source.revision,
            seed=settings.seed,
        )
        self.settings, self.eos = settings, eos_ids(tokenizer)

    def __call__(self, batch: list[list[int]], indices: list[int]) -> list[list[list[int]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.settings
        params = [
            SamplingParams(
                n=s.num_samples,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k if s.top_k > 0 else -1,
                max_tokens=s.max_new_tokens,
                seed=row_seed(s.seed, idx, 0),
                stop_token_ids=self.eos,
            )
            for idx in indices
        ]
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in batch]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[_vllm_tokens(c, self.eos) for c in o.outputs] for o in outs]


def _vllm_tokens(c: Any, eos: list[int]) -> list[int]:
    tokens = _cut(list(c.token_ids), eos)
    if c.finish_reason == "stop" and not (tokens and tokens[-1] in eos):
        tokens.append(
            eos[0]
        )  # our convention: a stopped answer ends with its EOS (vLLM may omit it)
    return tokens
