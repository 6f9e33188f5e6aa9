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
``chosen_equals_rejected`` (identical response texts), ``special_token_in_content`` (a message typing a special
token's text, see shapes.py), ``prompt_too_long``, ``empty_response_after_truncation`` (a response with no tokens
left) and ``identical_after_truncation`` (both responses cut to the same tokens: the pair carries no signal). An
empty response in the INPUT is not a drop but a `DataError`. Truncations are counted per field (``prompt``,
``chosen``, ``rejected``) for reporting.

Bounded work per record (`bound_pair`, applied before `encode_pairs`): a record of 50 MB must not be tokenized
whole when at most ``max_length`` of its tokens survive. Truncation keeps, of each text, only a bounded number
of tokens from one side: the first ``max_length`` response tokens, the last (``prompt_truncation="left"``) or
first (``"right"``) ``max_prompt_length`` prompt tokens (``max_length`` from the start when there is no prompt
limit: more means a drop), plus the prompt's first token (a kept BOS) and its last characters (the
prompt/response boundary). So each over-long text is cut by characters to a piece that holds those tokens,
and the exact pipeline runs on the pieces.

How many characters are enough? No fixed ratio bounds it for every tokenizer: a token covers at least one
byte, but a character can be several tokens (byte-level BPE on multi-byte characters) and one token can cover
any number of characters (a long vocabulary entry; an unknown word mapped to one UNK token). So the bound is
*verified* instead of assumed: a cut of C characters (first ``_CHARS_PER_TOKEN`` characters per token needed)
is tokenized, and accepted only if it holds one more token than needed clear of the cut, i.e. ending (or
starting) at least ``_MARGIN_CHARS`` characters and ``_MARGIN_TOKENS`` tokens away from it; otherwise C doubles,
up to the whole text (no cut). Work and memory per record are therefore proportional to the characters its
kept tokens actually cover (at most about twice that, plus the margins), not to the record.

Exactness rests on one property, locality: tokens that far from a cut are the same in the cut piece as in the
whole text. It holds for every tokenizer that splits text into words or pieces before its model (byte-level BPE
regexes, whitespace/metaspace splitting, WordPiece), and for BPE merges within a long word in practice (a
merge decision depends on its neighbours, and disagreement dies out within a few tokens); the margins are far
wider than that. Whenever the whole text does not hold more tokens than truncation keeps, nothing is cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError, Drop, Location
from .shapes import Rendered

__all__ = [
    "DROP_REASONS",
    "Drop",
    "Settings",
    "Tally",
    "bound_pair",
    "boundary_index",
    "encode_pairs",
    "truncate_pair",
    "truncate_row",
]

DROP_REASONS = (
    "chosen_equals_rejected",
    "special_token_in_content",
    "prompt_too_long",
    "empty_response_after_truncation",
    "identical_after_truncation",
)
TRUNCATED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_TRUNCATED_FIELDS = ("prompt", "completion", "kl_completion")


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


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    settings: Settings,
    truncations: dict[str, int],
    bos_token_id: int | None,
) -> tuple[list, list, list] | Drop:
    """Apply the truncation policy (counting cuts in ``truncations``); return the pair or a `Drop`."""
    fields = ("chosen", "rejected")
    out = _truncate(prompt, (chosen, rejected), fields, settings, truncations, bos_token_id)
    if not isinstance(out, Drop) and out[1] == out[2]:
        return Drop("identical_after_truncation", "both responses have the same tokens")
    return out


def truncate_row(
    prompt: list[int],
    completion: list[int],
    kl_completion: list[int],
    settings: Settings,
    truncations: dict[str, int],
    bos_token_id: int | None,
) -> tuple[list, list, list] | Drop:
    """`truncate_pair` for an unpaired row and its KL row (`preftune.data.unpaired`): the same policy, cuts
    counted as ``completion`` / ``kl_completion``; equal completions are fine (rows may share one)."""
    fields = ("completion", "kl_completion")
    return _truncate(
        prompt, (completion, kl_completion), fields, settings, truncations, bos_token_id
    )


def _truncate(
    prompt: list[int],
    responses: tuple[list[int], list[int]],
    fields: tuple[str, str],
    settings: Settings,
    truncations: dict[str, int],
    bos_token_id: int | None,
) -> tuple[list, list, list] | Drop:
    """The prompt cut to ``max_prompt_length`` (its end kept for ``left``, after a leading BOS), then each
    response to what ``max_length`` leaves; a response with no tokens is a drop."""
    limit = settings.max_prompt_length
    if limit is not None and len(prompt) > limit:
        truncations["prompt"] = truncations.get("prompt", 0) + 1
        if settings.prompt_truncation == "right":
            prompt = prompt[:limit]
        elif bos_token_id is not None and prompt[0] == bos_token_id:
            prompt = [bos_token_id] + (prompt[len(prompt) - (limit - 1) :] if limit > 1 else [])
        else:
            prompt = prompt[len(prompt) - limit :]
    if len(prompt) >= settings.max_length:
        # No token count in the detail: a bounded (cut) prompt knows only that it is at least this long.
        return Drop(
            "prompt_too_long", f"the prompt alone fills max_length {settings.max_length} tokens"
        )
    budget = settings.max_length - len(prompt)
    out = []
    for name, ids in zip(fields, responses):
        if len(ids) > budget:
            ids = ids[:budget]
            truncations[name] = truncations.get(name, 0) + 1
        out.append(ids)
    if not all(out):
        return Drop("empty_response_after_truncation", "a response has no tokens")
    return prompt, out[0], out[1]


# ---------------------------------------------------------------------------------------------------
# Bounded work per record (see the module docstring)

# The first guess of the characters a kept token covers (verified, doubled when short), and the margins:
# tokens this close to a cut, in characters or in tokens, may differ from the whole text's and do not count.
_CHARS_PER_TOKEN = 8
_MARGIN_CHARS = 256
_MARGIN_TOKENS = 16


def bound_pair(tokenizer: Any, pair: Rendered, settings: Settings) -> Rendered:
    """``pair`` with each over-long text cut to the characters truncation can keep (see the module docstring).

    ``truncate_pair(*encode_pairs(...)[0], ...)`` gives the same result for the returned pair as for ``pair``
    (same kept tokens, same truncation counts, same drops); texts that are not over-long are returned as is,
    and a pair whose texts are all short is returned without tokenizing anything.
    """
    prompt = _bound_prompt(tokenizer, pair.prompt, pair.chat, settings)
    # Enough of the prompt before a response to fix the response's first tokens.
    context = prompt[-2 * _MARGIN_CHARS :]
    chosen = _bound_response(tokenizer, context, pair.chosen, pair.chat, settings.max_length)
    rejected = _bound_response(tokenizer, context, pair.rejected, pair.chat, settings.max_length)
    if prompt is pair.prompt and chosen is pair.chosen and rejected is pair.rejected:
        return pair
    return Rendered(prompt, chosen, rejected, pair.chat)


def _offsets(tokenizer: Any, text: str, chat: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(
        text,
        add_special_tokens=not chat,  # as encode_pairs tokenizes
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    return enc["input_ids"], enc["offset_mapping"]


def _clear_tokens(offsets: Sequence[tuple[int, int]], lo: int, hi: int) -> int:
    """Tokens lying within characters ``[lo, hi]`` (already a margin away from every cut), less the
    ``_MARGIN_TOKENS`` nearest each end. Tokens with empty offsets (added by a post-processor) do not count."""
    inside = sum(1 for s, e in offsets if s >= lo and e <= hi and e > s)
    return max(0, inside - 2 * _MARGIN_TOKENS)


def _bound_response(tokenizer: Any, context: str, text: str, chat: bool, need: int) -> str:
    """``text`` cut at its end, holding more than ``need`` tokens clear of the cut (after ``context``)."""
    size = _CHARS_PER_TOKEN * (need + 1) + _MARGIN_CHARS
    while size < len(text):
        _, offsets = _offsets(tokenizer, context + text[:size], chat)
        if _clear_tokens(offsets, len(context), len(context) + size - _MARGIN_CHARS) > need:
            return text[:size]
        size *= 2
    return text


def _bound_prompt(tokenizer: Any, text: str, chat: bool, settings: Settings) -> str:
    """The prompt with the part truncation cannot keep removed (see the module docstring)."""
    limit = settings.max_prompt_length
    need = int(limit) if limit is not None else settings.max_length
    size = _CHARS_PER_TOKEN * (need + 1) + 2 * _MARGIN_CHARS
    if size + 4 * _MARGIN_CHARS >= len(text):  # an ordinary prompt: nothing to tokenize here
        return text
    if limit is None or settings.prompt_truncation == "right":
        return _keep_prompt_start(tokenizer, text, chat, need, size)
    return _keep_prompt_end(tokenizer, text, chat, need, size)


def _keep_prompt_start(tokenizer: Any, text: str, chat: bool, need: int, size: int) -> str:
    """Its start (the tokens kept) and its end (so that the prompt/response boundary stays exact)."""
    end = _fixed_end(tokenizer, text, chat)
    while size + len(end) < len(text):
        _, offsets = _offsets(tokenizer, text[:size], chat)
        if _clear_tokens(offsets, 0, size - _MARGIN_CHARS) > need:
            return text[:size] + end
        size *= 2
    return text


def _keep_prompt_end(tokenizer: Any, text: str, chat: bool, need: int, size: int) -> str:
    """Its end (the tokens kept, and the boundary) and, in front, the text of a leading BOS: left truncation
    keeps the first token when it is a BOS. The cut piece must start with a BOS exactly when the prompt does."""
    bos = _leading_bos(tokenizer, text, chat)
    head = bos or ""
    while len(head) + size < len(text):
        piece = head + text[len(text) - size :]
        ids, offsets = _offsets(tokenizer, piece, chat)
        starts_with_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
        lo, hi = len(head) + _MARGIN_CHARS, len(piece) - _MARGIN_CHARS
        if starts_with_bos == (bos is not None) and _clear_tokens(offsets, lo, hi) > need:
            return piece
        size *= 2
    return text


def _leading_bos(tokenizer: Any, text: str, chat: bool) -> str | None:
    """The text of the BOS token the prompt starts with ("" when a post-processor adds it), or None."""
    bos_id = tokenizer.bos_token_id
    ids, offsets = _offsets(tokenizer, text[: 2 * _MARGIN_CHARS], chat)
    if bos_id is None or not ids or ids[0] != bos_id:
        return None
    return text[: offsets[0][1]]


def _fixed_end(tokenizer: Any, text: str, chat: bool) -> str:
    """The shortest end of ``text`` (doubling from ``2 * _MARGIN_CHARS`` characters) that holds
    ``2 * _MARGIN_TOKENS`` tokens starting at least ``_MARGIN_CHARS`` after where it is cut off."""
    size = 2 * _MARGIN_CHARS
    while size < len(text):
        _, offsets = _offsets(tokenizer, text[len(text) - size :], chat)
        if sum(1 for s, e in offsets if s >= _MARGIN_CHARS and e > s) >= 2 * _MARGIN_TOKENS:
            return text[len(text) - size :]
        size *= 2
    return text
