"""Record shapes: detect them, validate a record, and render it to (prompt, chosen, rejected) text.

Shapes (``shape="auto"`` decides once per file, from its first record or its columns):

- ``standard``: prompt, chosen and rejected are strings. The text of a pair is ``prompt + chosen`` exactly as
  written (no separator is inserted); the tokenizer's special tokens (e.g. a BOS from its post-processor) are
  added, and EOS is appended to each response as a token id when ``add_eos`` is set.
- ``conversational``: prompt is a list of ``{role, content}`` messages (multi-turn: earlier turns, assistant
  ones included, are prompt), or a string (= one user message); chosen/rejected are the assistant turn(s), as a
  list of messages, one message, or a string (= one assistant message). Or chosen and rejected are both whole
  conversations (first message not an assistant's, as in UltraFeedback-style data): the prompt is their common
  start, split as in ``implicit`` below, and the prompt column must agree with it (a list: equal to it; a
  string: the content of one of its user messages). Rendered with
  ``tokenizer.apply_chat_template``: the prompt with ``add_generation_prompt=True``, the full conversation
  without it; the response text is the full text minus the rendered prompt, so the template must be
  *prefix-stable* (the rendered prompt must be a prefix of the rendered conversation). The rendered text already
  holds the template's special tokens, so none are added when tokenizing and no EOS is appended (the template's
  end-of-turn marker ends the response).
- ``implicit``: no prompt column; chosen and rejected are both full texts or both full conversations, and the
  prompt is their common start:
    - messages: the longest common prefix of messages, shortened until both remainders begin with an assistant
      message (the prompt must end where the assistant speaks). Then rendered as ``conversational``.
    - strings: the longest common prefix of characters, backed off to just after its last whitespace character
      (so a word the two responses happen to share a start of, "gr" of "great"/"grand", stays in the responses);
      with no whitespace in the common prefix the prompt is empty. Then treated as ``standard``.

Roles allowed in messages: system, user, assistant, tool. Extra message keys are passed to the template.

System and tools columns (``Columns.system`` / ``Columns.tools``, used where a record has a non-empty value):
the system message is put in front of a message prompt (an equal system message already there is kept; a
different one is a `DataError`); tools (a list of JSON-schema tool definitions, or JSON text of one) are passed
to ``apply_chat_template(..., tools=...)`` for the prompt and for each full conversation, so the boundary check
is the same. A string prompt (``standard``, implicit strings) is not rendered with a template, so a system or
tools value there is a `DataError` (set the shape to conversational to render it as messages).

Turn structure, tools and forged turns (a special token's text typed in a message): see `preftune.data.chat`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .chat import (
    PROMPT_END_ROLES,
    ROLES,
    check_prompt_column,
    check_prompt_end,
    forged_turn,
    implicit_message_split,
    messages,
    parse_tools,
    render_chat,
    response,
    show,
    split_conversations,
    whole_conversations,
    with_system,
)
from .errors import DataError, Drop, Location, missing_column_error

__all__ = [
    "PROMPT_END_ROLES",
    "ROLES",
    "SHAPES",
    "Columns",
    "Parsed",
    "Rendered",
    "detect_shape",
    "implicit_message_split",
    "implicit_text_split",
    "parse_pair",
    "parse_weight",
    "render_pair",
    "special_token_pattern",
]

SHAPES = ("standard", "conversational", "implicit")
_FLOAT32_MAX = 3.4028234663852886e38  # weights are stored as float32


@dataclass(frozen=True)
class Columns:
    """Where the fields live in a record (``system`` / ``tools``: optional columns, used where present)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    weight: str | None = None
    system: str | None = None
    tools: str | None = None
    completion: str = "completion"  # unpaired rows (preftune.data.unpaired)
    label: str = "label"

    @classmethod
    def from_config(cls, cfg: Any, base: Columns | None = None) -> Columns:
        """From a DataConfig-like ``cfg``; with ``base``, a source's columns (its null fields: ``base``'s,
        ``""``: none)."""
        if base is None:
            return cls(
                getattr(cfg, "prompt_column", "prompt"),
                getattr(cfg, "chosen_column", "chosen"),
                getattr(cfg, "rejected_column", "rejected"),
                getattr(cfg, "weight_column", None),
                getattr(cfg, "system_column", "system"),
                getattr(cfg, "tools_column", "tools"),
                getattr(cfg, "completion_column", "completion"),
                getattr(cfg, "label_column", "label"),
            )
        values = {}
        for name in (
            "prompt",
            "chosen",
            "rejected",
            "weight",
            "system",
            "tools",
            "completion",
            "label",
        ):
            value = getattr(cfg, f"{name}_column", None)
            values[name] = getattr(base, name) if value is None else (value or None)
        return cls(**values)

    def needed(self) -> list[str]:
        cols = [self.prompt, self.chosen, self.rejected]
        return [*cols, self.weight] if self.weight else cols

    def optional(self) -> list[str]:
        """Columns read where a record has them."""
        return [c for c in (self.system, self.tools) if c]


@dataclass(frozen=True)
class Rendered:
    """One pair as text: ``prompt + chosen`` and ``prompt + rejected`` are the texts the model sees."""

    prompt: str
    chosen: str
    rejected: str
    chat: bool  # rendered by a chat template: add no special tokens and no EOS


@dataclass(frozen=True)
class Parsed:
    """One record validated, before rendering: three strings, or prompt and response messages (``chat``).

    ``fields``: the message lists as the record names them (for the forged-turn check); ``tools``: the tool
    definitions passed to the template."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    tools: list[dict] | None = None
    fields: tuple[tuple[str, list[dict]], ...] = ()

    @property
    def chat(self) -> bool:
        return not isinstance(self.prompt, str)


def detect_shape(
    forced: str,
    cols: Columns,
    first: dict | None,
    columns: Sequence[str] | None,
    where: Location | str,
) -> str:
    """The shape of a file, from ``forced`` (config) or its first record / column names: conversational when
    its prompt or its chosen value is a list."""
    if forced not in ("auto", *SHAPES):
        raise DataError(f"data shape {forced!r} is not one of auto, {', '.join(SHAPES)}")
    keys = list(columns) if columns is not None else list(first or {})
    if first is None and columns is None:
        return "standard" if forced == "auto" else forced  # an empty file: nothing to render
    for name in (cols.chosen, cols.rejected):
        if name not in keys:
            raise missing_column_error(where, name, keys)
    if forced == "implicit" or (forced == "auto" and cols.prompt not in keys):
        return "implicit"
    if cols.prompt not in keys:
        raise missing_column_error(where, cols.prompt, keys)
    if forced != "auto":
        return forced
    values = (first.get(cols.prompt), first.get(cols.chosen)) if first is not None else ()
    return "conversational" if any(isinstance(v, (list, tuple)) for v in values) else "standard"


def parse_weight(value: Any, loc: Location, field: str) -> float:
    """A pair weight: missing/None/empty -> 1.0; otherwise a number >= 0 (or a numeric string) that float32
    holds (NaN, infinities, negatives and values above float32's maximum are `DataError`s)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 1.0
    if isinstance(value, bool):
        raise DataError(f"{loc}: field {field!r} must be a number (a pair weight), got a boolean")
    try:
        weight = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise DataError(
            f"{loc}: field {field!r} must be a number (a pair weight), got {show(value)}"
        ) from None
    if not math.isfinite(weight) or weight < 0:
        raise DataError(f"{loc}: field {field!r} must be a finite number >= 0, got {weight}")
    if weight > _FLOAT32_MAX:
        raise DataError(
            f"{loc}: field {field!r} is {weight:g}, too large for a float32 pair weight "
            f"(at most {_FLOAT32_MAX:.4g}); expected a finite number >= 0"
        )
    return weight


def special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching the text of any special token of ``tokenizer`` (its named special tokens and every
    added token marked special), longest first; None when it has none."""
    texts = {str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])}
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            texts.add(str(added.content))
    texts.discard("")
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def parse_pair(record: dict, shape: str, cols: Columns, loc: Location) -> Parsed:
    """Validate one record of ``shape`` (see the module docstring); no tokenizer needed."""
    if shape == "standard":
        _no_chat_columns(record, cols, loc)
        prompt = _string(record, cols.prompt, loc, allow_empty=True)
        return Parsed(
            prompt, _string(record, cols.chosen, loc), _string(record, cols.rejected, loc)
        )
    if shape == "conversational":
        chosen, rejected = _get(record, cols.chosen, loc), _get(record, cols.rejected, loc)
        if whole_conversations(chosen, rejected):
            parsed = Parsed(*split_conversations(chosen, rejected, cols.chosen, cols.rejected, loc))
            check_prompt_column(_get(record, cols.prompt, loc), parsed.prompt, cols.prompt, loc)
            return _with_columns(parsed, record, cols, loc)
        value = _get(record, cols.prompt, loc)
        if isinstance(value, str):
            if not value.strip():
                raise DataError(
                    f"{loc}: field {cols.prompt!r} is empty; expected the user's message"
                )
            value = [{"role": "user", "content": value}]
        prompt = messages(value, cols.prompt, loc)
        if not prompt:
            raise DataError(
                f"{loc}: field {cols.prompt!r} is an empty list; expected at least one message"
            )
        check_prompt_end(prompt, cols.prompt, loc)
        chosen = response(chosen, cols.chosen, loc)
        rejected = response(rejected, cols.rejected, loc)
        fields = ((cols.prompt, prompt), (cols.chosen, chosen), (cols.rejected, rejected))
        return _with_columns(Parsed(prompt, chosen, rejected, None, fields), record, cols, loc)
    if shape == "implicit":
        chosen, rejected = _get(record, cols.chosen, loc), _get(record, cols.rejected, loc)
        if isinstance(chosen, str) and isinstance(rejected, str):
            _no_chat_columns(record, cols, loc)
            cut = implicit_text_split(chosen, rejected)
            prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
            for name, text in ((cols.chosen, chosen), (cols.rejected, rejected)):
                if not text.strip():
                    raise DataError(
                        f"{loc}: field {name!r} has an empty response after removing the common prompt "
                        f"{show(prompt)}; expected a response after the shared text"
                    )
            return Parsed(prompt, chosen, rejected)
        if isinstance(chosen, (list, tuple)) and isinstance(rejected, (list, tuple)):
            parsed = Parsed(*split_conversations(chosen, rejected, cols.chosen, cols.rejected, loc))
            return _with_columns(parsed, record, cols, loc)
        raise DataError(
            f"{loc}: fields {cols.chosen!r} and {cols.rejected!r} must both be strings or both be lists of "
            f"messages (implicit prompt shape), got {type(chosen).__name__} and {type(rejected).__name__}"
        )
    raise DataError(f"data shape {shape!r} is not one of {', '.join(SHAPES)}")


def render_pair(
    record: dict,
    shape: str,
    cols: Columns,
    loc: Location,
    tokenizer: Any,
    specials: re.Pattern[str] | None = None,
) -> Rendered | Drop:
    """Validate one record and render it to text (see the module docstring for each shape).

    Returns a `Drop` (``special_token_in_content``) for a message row that types a special token's text.
    ``specials``: ``special_token_pattern(tokenizer)``, computed here when not given (pass it when rendering
    many records).
    """
    parsed = parse_pair(record, shape, cols, loc)
    if not parsed.chat:
        return Rendered(parsed.prompt, parsed.chosen, parsed.rejected, chat=False)  # type: ignore[arg-type]
    if specials is None:
        specials = special_token_pattern(tokenizer)
    tools = (cols.tools or "tools", parsed.tools) if parsed.tools else None
    forged = forged_turn(specials, parsed.fields, tools)
    if forged is not None:
        return forged
    texts = render_chat(
        tokenizer,
        parsed.prompt,  # type: ignore[arg-type]
        parsed.chosen,  # type: ignore[arg-type]
        parsed.rejected,  # type: ignore[arg-type]
        loc,
        parsed.tools,
        cols.tools or "tools",
    )
    return Rendered(*texts, chat=True)


def _with_columns(parsed: Parsed, record: dict, cols: Columns, loc: Location) -> Parsed:
    """The system column's message in front of the prompt, the tools column's definitions attached."""
    prompt = parsed.prompt
    fields = parsed.fields
    if cols.system:
        prompt = with_system(prompt, record.get(cols.system), cols.system, loc)  # type: ignore[arg-type]
        if prompt is not parsed.prompt:
            fields = ((cols.system, prompt[:1]), *fields)
    tools = parse_tools(record.get(cols.tools), cols.tools, loc) if cols.tools else None
    return Parsed(prompt, parsed.chosen, parsed.rejected, tools, fields)


def _no_chat_columns(record: dict, cols: Columns, loc: Location) -> None:
    for name in (cols.system, cols.tools):
        value = record.get(name) if name else None
        if value is not None and value != "" and value != []:
            raise DataError(
                f"{loc}: field {name!r} is set, but a string prompt is not rendered with a chat template; "
                "set data.shape to conversational to render the prompt as messages with it (or set the "
                f"column to null to ignore it)"
            )


def implicit_text_split(chosen: str, rejected: str) -> int:
    """Prompt length in characters for two full texts: common prefix backed off to after a whitespace."""
    n = _common_prefix_len(chosen, rejected)
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    return n


# ------------------------------------------------------------------------------------------- helpers


def _common_prefix_len(a: str, b: str) -> int:
    n, i, step = min(len(a), len(b)), 0, 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:  # whole blocks first
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _get(record: dict, name: str, loc: Location) -> Any:
    if name not in record:
        raise missing_column_error(loc, name, record.keys())
    return record[name]


def _string(record: dict, name: str, loc: Location, *, allow_empty: bool = False) -> str:
    value = _get(record, name, loc)
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        hint = (
            " (a list of messages: set data.shape to conversational?)"
            if isinstance(value, list)
            else ""
        )
        raise DataError(f"{loc}: field {name!r} must be a string, got {kind}{hint}")
    if not allow_empty and not value.strip():
        raise DataError(f"{loc}: field {name!r} is an empty response; expected non-empty text")
    return value
