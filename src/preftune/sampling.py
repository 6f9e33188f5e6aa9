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

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.sampling_backends import (
    HFGenerator,
    SamplingError,
    SamplingSettings,
    VLLMGenerator,
    eos_ids,
    row_seed,
)
from preftune.sampling_backends import _cut as _cut

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
