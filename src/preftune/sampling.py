"""On-policy sampling: K completions per prompt, batched and resumable (``preftune sample``).

Prompts come from any data file preftune reads (:mod:`preftune.data.sources`): a ``prompt`` column holding
a string or a list of chat messages (or, without one, a ``messages`` column whose trailing assistant turns
are dropped). With ``chat`` on (the default when the tokenizer has a chat template) a string prompt is sent
as one user message. Every other column of the record travels to the output under ``fields`` (a judge may
need it: the ``rules`` judge reads its checks from there).

Speed: prompts are sorted by token length (longest first) and cut into batches of ``batch_size`` prompts x
K rows, left-padded, generated with the KV cache; a row stops at EOS (the tokenizer's and the model's
``generation_config`` EOS ids), a batch when all its rows have.

Randomness does not depend on batching. Sampling is Gumbel-max: the warped logits (temperature, top-k,
top-p) plus Gumbel noise drawn from a generator owned by the row, seeded from (seed, prompt index, sample
number), and then argmax, which draws exactly from softmax(warped logits). At step t a row uses the t-th
draw of its own generator, so its samples depend only on the seed, the prompt and its index, not on the
batch size, the sort order, the other prompts or a resume (``torch.multinomial`` over a batch would tie
each row to its neighbours). The one thing batching still changes is float rounding of padded batches,
which can flip a near-tied argmax; a resume therefore reruns the batches of the uninterrupted plan
(the same batch, the same padding), so the output is byte-identical. Sample k of a prompt is the same
whatever K is, so raising K keeps the first samples.

Output JSONL, one line per prompt, written and flushed batch by batch in plan order: ``index`` (0-based,
over the files in order), ``prompt`` (as read), ``completions``, ``completion_tokens`` (EOS included),
``completion_ids`` (the sampled ids, EOS included when stopped),
``finish_reasons`` (``stop``: EOS, ``length``: cut at ``max_new_tokens``), ``prompt_tokens``, ``settings``
and ``fields``. Resume: complete lines are kept (their settings and prompts must match, else a
`SamplingError`), a partial last line is cut off, and the batches not fully written are generated again,
writing only their missing lines.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "HFGenerator",
    "PromptRecord",
    "SampleReport",
    "SamplingError",
    "SamplingSettings",
    "VLLMGenerator",
    "eos_ids",
    "read_prompts",
    "row_seed",
    "sample_to_file",
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


@dataclass(frozen=True)
class PromptRecord:
    index: int  # 0-based over all files, in file order
    prompt: str | list[dict]
    fields: dict = field(default_factory=dict)  # the record's other columns


@dataclass
class SampleReport:
    prompts: int = 0
    already_done: int = 0
    written: int = 0
    tokens: int = 0  # generated tokens written by this call (EOS included)
    truncated: int = 0  # completions cut at max_new_tokens
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------------------------- prompts


def read_prompts(
    files: str | Sequence[str], *, column: str = "prompt", fmt: str = "auto"
) -> list[PromptRecord]:
    """Prompts of data files (any format :mod:`preftune.data.sources` reads); DataError names the row."""
    from preftune.data.chat import check_prompt_end, messages
    from preftune.data.errors import DataError, missing_column_error
    from preftune.data.sources import read_records, resolve_files

    out: list[PromptRecord] = []
    for src in resolve_files(files, fmt, role="prompts"):
        for record, loc in read_records(src):
            if column in record:
                key, value = column, record[column]
            elif column == "prompt" and isinstance(record.get("messages"), list):
                key, value = "messages", list(record["messages"])
                while (
                    value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant"
                ):
                    value.pop()  # the prompt is the conversation up to the answer to sample
            else:
                raise missing_column_error(loc, column, record.keys())
            if isinstance(value, (list, tuple)):
                value = messages(value, key, loc)
                if not value:
                    raise DataError(f"{loc}: field {key!r} holds no prompt messages")
                check_prompt_end(value, key, loc)
            elif not isinstance(value, str):
                raise DataError(
                    f"{loc}: field {key!r} must be a string or a list of messages, "
                    f"got {type(value).__name__}"
                )
            fields = {k: v for k, v in record.items() if k != key}
            out.append(PromptRecord(len(out), value, fields))
    if not out:
        raise DataError(f"{files if isinstance(files, str) else ', '.join(files)}: no prompts")
    return out


def _prompt_ids(tokenizer: Any, prompt: str | list[dict], chat: bool) -> list[int]:
    if not chat:
        if not isinstance(prompt, str):
            raise SamplingError("message prompts need the chat template (chat on)")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The rendered template already holds BOS and the role markers.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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
        # Greedy decoding over our own warpers + noise: argmax then *is* the sample (module docstring).
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


# ------------------------------------------------------------------------------------ the resumable loop


def _load_done(path: Path, prompts: list[PromptRecord], settings: dict) -> tuple[set[int], int]:
    """Indices already written and the byte length of the complete lines (a partial tail is cut)."""
    if not path.exists():
        return set(), 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # a line without its newline was cut by a kill: redone
    done: set[int] = set()
    for lineno, raw in enumerate(data[:end].splitlines(), 1):
        where = f"{path}, line {lineno}"
        try:
            row = json.loads(raw)
            index, recorded = int(row["index"]), row["settings"]
        except (ValueError, KeyError, TypeError):
            raise SamplingError(
                f"{where}: not a samples line; pass --overwrite or a new --out"
            ) from None
        if recorded != settings:
            diff = [(k, recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v]
            changed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff)
            raise SamplingError(
                f"{where}: written with other settings ({changed or 'different keys'}); "
                "pass --overwrite or a new --out"
            )
        if not 0 <= index < len(prompts) or row.get("prompt") != prompts[index].prompt:
            raise SamplingError(
                f"{where}: prompt {index} is not the prompt of the prompts file at that index "
                "(the prompts changed?); pass --overwrite or a new --out"
            )
        if index in done:
            raise SamplingError(f"{where}: prompt {index} appears twice")
        done.add(index)
    return done, end


def sample_to_file(
    generator: Any,
    tokenizer: Any,
    prompts: list[PromptRecord],
    out: str | Path,
    settings: SamplingSettings,
    *,
    batch_size: int = 8,
    progress: bool = True,
    overwrite: bool = False,
) -> SampleReport:
    """Sample every prompt not yet in ``out`` and append its line (see the module docstring)."""
    from tqdm import tqdm

    settings.check()
    if batch_size < 1:
        raise SamplingError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    if overwrite and out.exists():
        out.unlink()
    recorded = asdict(settings)
    done, valid = _load_done(out, prompts, recorded)
    report = SampleReport(prompts=len(prompts), already_done=len(done))
    if len(done) == len(prompts):
        return report
    ids = [_prompt_ids(tokenizer, p.prompt, settings.chat) for p in prompts]
    # Longest first: the largest batch runs (and runs out of memory, if it must) at once.
    order = sorted(range(len(prompts)), key=lambda i: (-len(ids[i]), i))
    plan = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), initial=len(done), unit="prompt", disable=not progress)
    with open(out, "r+b" if out.exists() else "wb") as f:
        f.truncate(valid)
        f.seek(valid)
        for batch in plan:
            todo = [i for i in batch if i not in done]
            if not todo:
                continue
            answers = generator([ids[i] for i in batch], batch)
            for i, toks in zip(batch, answers):
                if i in done:
                    continue
                f.write(_line(prompts[i], toks, len(ids[i]), tokenizer, generator, recorded))
                report.tokens += sum(len(t) for t in toks)
                report.truncated += sum(not _stopped(t, generator) for t in toks)
                report.written += 1
            f.flush()
            bar.update(len(todo))
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{report.tokens / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _stopped(tokens: list[int], generator: Any) -> bool:
    return bool(tokens) and tokens[-1] in generator.eos


def _line(
    p: PromptRecord, toks: list[list[int]], n_prompt: int, tokenizer: Any, gen: Any, settings: dict
) -> bytes:
    texts = [
        tokenizer.decode(t[:-1] if _stopped(t, gen) else t, skip_special_tokens=True) for t in toks
    ]
    row = {
        "index": p.index,
        "prompt": p.prompt,
        "completions": texts,
        "completion_tokens": [len(t) for t in toks],
        "completion_ids": toks,  # exact ids (EOS included when stopped): log-probs need no re-tokenizing
        "finish_reasons": ["stop" if _stopped(t, gen) else "length" for t in toks],
        "prompt_tokens": n_prompt,
        "settings": settings,
        "fields": p.fields,
    }
    # default=str: Parquet/Arrow columns may hold dates or decimals, which JSON cannot.
    return (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
