"""Exact tokenization of pairs, truncation, and drops.

Boundary (exactness): ``prompt + response`` is tokenized as ONE string with character offsets. The prompt's
tokens are the leading tokens lying entirely within the prompt's characters (token end offset <= len(prompt));
a token that straddles the boundary (e.g. a BPE merge of the prompt's last and the response's first
characters) belongs to the response. Special tokens the tokenizer adds in front (a BOS from its post-processor,
offsets (0, 0)) are prompt tokens. This is done for chosen and for rejected, and ``prompt_ids`` is their common
token prefix, so that, before truncation,

    prompt_ids + chosen_ids   == tokenize(prompt + chosen)     (+ [eos] in the string shapes)
    prompt_ids + rejected_ids == tokenize(prompt + rejected)   (+ [eos])

String shapes add the tokenizer's special tokens (``add_special_tokens=True``) and append EOS to each response
as a token id unless the response already ends with it (``add_eos``). Chat-rendered text already holds its
special tokens: nothing is added. The tokenizer must be a fast (Rust-backed) tokenizer, for offsets.

Truncation policy (after EOS is appended, so a cut response loses its EOS: it did not end there):

1. The prompt is cut to ``max_prompt_length`` tokens (None: no limit). ``prompt_truncation="left"`` keeps its
   end (the part next to the response); a leading BOS is kept in front of what remains. ``"right"`` keeps its
   start.
2. A prompt still ``>= max_length`` leaves no room for a response: the pair is dropped (``prompt_too_long``).
3. Each response is cut to ``max_length - len(prompt_ids)`` tokens, keeping its start.

Drops, counted per reason (``on_drop="error"`` raises a `DataError` naming the record instead):
``chosen_equals_rejected`` (identical response texts), ``prompt_too_long``, ``empty_response_after_truncation``
(a response with no tokens left) and ``identical_after_truncation`` (both responses cut to the same tokens: the
pair carries no signal). An empty response in the INPUT is not a drop but a `DataError`. Truncations are
counted per field (``prompt``, ``chosen``, ``rejected``) for reporting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError, Location
from .shapes import Rendered

__all__ = [
    "DROP_REASONS",
    "Drop",
    "Settings",
    "Tally",
    "boundary_index",
    "encode_pairs",
    "truncate_pair",
]

DROP_REASONS = (
    "chosen_equals_rejected",
    "prompt_too_long",
    "empty_response_after_truncation",
    "identical_after_truncation",
)
TRUNCATED_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Settings:
    """The tokenization settings (all of them enter the cache key)."""

    max_length: int = 1024
    max_prompt_length: int | None = 512
    prompt_truncation: str = "left"
    add_eos: bool = True
    on_drop: str = "count"

    @classmethod
    def from_config(cls, cfg: Any) -> Settings:
        s = cls(
            max_length=int(getattr(cfg, "max_length", 1024)),
            max_prompt_length=getattr(cfg, "max_prompt_length", 512),
            prompt_truncation=getattr(cfg, "prompt_truncation", "left"),
            add_eos=bool(getattr(cfg, "add_eos", True)),
            on_drop=getattr(cfg, "on_drop", "count"),
        )
        if s.max_length < 2:
            raise DataError(
                f"data.max_length must be >= 2 (a prompt token and a response token), got {s.max_length}"
            )
        if s.max_prompt_length is not None and int(s.max_prompt_length) < 1:
            raise DataError(
                f"data.max_prompt_length must be >= 1 or null, got {s.max_prompt_length}"
            )
        if s.prompt_truncation not in ("left", "right"):
            raise DataError(
                f"data.prompt_truncation must be 'left' or 'right', got {s.prompt_truncation!r}"
            )
        if s.on_drop not in ("count", "error"):
            raise DataError(f"data.on_drop must be 'count' or 'error', got {s.on_drop!r}")
        return s


@dataclass
class Tally:
    """Drop counts per reason and truncation counts per field, for one split."""

    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    truncations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRUNCATED_FIELDS, 0))
    first_drop: dict[str, str] = field(
        default_factory=dict
    )  # reason -> "file, line N" of its first case

    def drop(self, reason: str, loc: Location, on_drop: str, detail: str = "") -> None:
        if on_drop == "error":
            raise DataError(
                f"{loc}: pair dropped ({reason}{': ' + detail if detail else ''}); data.on_drop is 'error'. "
                "Fix the record or set data.on_drop to 'count' to drop such pairs"
            )
        self.drops[reason] += 1
        self.first_drop.setdefault(reason, str(loc))

    def add(self, other: Tally) -> None:
        for k, v in other.drops.items():
            self.drops[k] = self.drops.get(k, 0) + v
        for k, v in other.truncations.items():
            self.truncations[k] = self.truncations.get(k, 0) + v
        for k, v in other.first_drop.items():
            self.first_drop.setdefault(k, v)


def check_tokenizer(tokenizer: Any, settings: Settings) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; preftune needs character offsets to find the "
            "prompt/response boundary exactly (load it with use_fast=True / a tokenizer.json)"
        )
    if settings.add_eos and tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no eos_token, so EOS cannot be appended: set one or data.add_eos=false"
        )


def boundary_index(offsets: Sequence[tuple[int, int]], prompt_chars: int) -> int:
    """How many leading tokens lie entirely within the first ``prompt_chars`` characters."""
    for i, (_, end) in enumerate(offsets):
        if end > prompt_chars:
            return i
    return len(offsets)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def encode_pairs(
    tokenizer: Any, pairs: Sequence[Rendered], *, add_eos: bool
) -> list[tuple[list, list, list]]:
    """Exact, untruncated ``(prompt_ids, chosen_ids, rejected_ids)`` for each rendered pair."""
    out: list[tuple[list, list, list] | None] = [None] * len(pairs)
    eos = tokenizer.eos_token_id
    for chat in (False, True):
        idx = [i for i, p in enumerate(pairs) if p.chat == chat]
        if not idx:
            continue
        texts = [pairs[i].prompt + pairs[i].chosen for i in idx] + [
            pairs[i].prompt + pairs[i].rejected for i in idx
        ]
        enc = tokenizer(
            texts,
            add_special_tokens=not chat,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        ids, offsets, n = enc["input_ids"], enc["offset_mapping"], len(idx)
        for j, i in enumerate(idx):
            full_c, full_r = ids[j], ids[n + j]
            p_chars = len(pairs[i].prompt)
            k = _common_prefix(
                full_c[: boundary_index(offsets[j], p_chars)],
                full_r[: boundary_index(offsets[n + j], p_chars)],
            )
            chosen, rejected = list(full_c[k:]), list(full_r[k:])
            if add_eos and not chat:
                for resp in (chosen, rejected):
                    if not resp or resp[-1] != eos:
                        resp.append(eos)
            out[i] = (list(full_c[:k]), chosen, rejected)
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Drop:
    """Why a pair was dropped (one of DROP_REASONS) and a short detail for the error message."""

    reason: str
    detail: str = ""


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    settings: Settings,
    truncations: dict[str, int],
    bos_token_id: int | None,
) -> tuple[list, list, list] | Drop:
    """Apply the truncation policy (counting cuts in ``truncations``); return the pair or a `Drop`."""
    limit = settings.max_prompt_length
    if limit is not None and len(prompt) > limit:
        truncations["prompt"] += 1
        if settings.prompt_truncation == "right":
            prompt = prompt[:limit]
        elif bos_token_id is not None and prompt[0] == bos_token_id:
            prompt = [bos_token_id] + (prompt[len(prompt) - (limit - 1) :] if limit > 1 else [])
        else:
            prompt = prompt[len(prompt) - limit :]
    if len(prompt) >= settings.max_length:
        return Drop(
            "prompt_too_long", f"{len(prompt)} prompt tokens >= max_length {settings.max_length}"
        )
    budget = settings.max_length - len(prompt)
    if len(chosen) > budget:
        chosen = chosen[:budget]
        truncations["chosen"] += 1
    if len(rejected) > budget:
        rejected = rejected[:budget]
        truncations["rejected"] += 1
    if not chosen or not rejected:
        return Drop("empty_response_after_truncation", "a response has no tokens")
    if chosen == rejected:
        return Drop("identical_after_truncation", "both responses have the same tokens")
    return prompt, chosen, rejected
