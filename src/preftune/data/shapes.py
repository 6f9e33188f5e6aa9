"""Record shapes: detect them, validate a record, and render it to (prompt, chosen, rejected) text.

Shapes (``shape="auto"`` decides once per file, from its first record or its columns):

- ``standard``: prompt, chosen and rejected are strings. The text of a pair is ``prompt + chosen`` exactly as
  written (no separator is inserted); the tokenizer's special tokens (e.g. a BOS from its post-processor) are
  added, and EOS is appended to each response as a token id when ``add_eos`` is set.
- ``conversational``: prompt is a list of ``{role, content}`` messages; chosen/rejected are the assistant
  turn(s), as a list of messages, one message, or a string (= one assistant message). Rendered with
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

Turn structure (conversational and implicit messages; a violation is a `DataError` naming the file, line and
field, since the row cannot mean what its shape says): the prompt ends with a ``user`` or ``tool`` message (the
turn the response answers), and a response holds ``assistant`` messages only (a user or tool message inside a
response would be scored as if the model had written it).

Message text cannot forge turns. A chat template writes its own markers (``<|im_start|>``, ``<|eot_id|>``, ...)
around the messages, and the rendered text is tokenized with special tokens recognised, so a marker typed
*inside* a message would become a real turn boundary. The choice made here is to refuse such rows: a message
whose content (or any other string it carries besides its role) contains the text of one of the tokenizer's
special tokens (``all_special_tokens`` and every added token marked special) is dropped as
``special_token_in_content`` (counted; ``data.on_drop="error"`` makes it a `DataError` naming the field). This
is exact and simple: the special tokens of a kept row are exactly the template's own. (The alternative, mapping
content spans and tokenizing them with special tokens split, depends on how each template transforms its
content and on tokenizers treating text segments independently.) Two limits, both deliberate: the template
itself is trusted to write whole markers (none writes half a marker next to a message), and the string shapes
are not checked, because their text is the model input exactly as written (pre-rendered chat text uses the
markers on purpose). Added tokens that are not special (e.g. ``<think>``) are ordinary text and allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError, Drop, Location, missing_column_error

__all__ = [
    "PROMPT_END_ROLES",
    "ROLES",
    "SHAPES",
    "Columns",
    "Rendered",
    "detect_shape",
    "parse_weight",
    "render_pair",
    "special_token_pattern",
]

SHAPES = ("standard", "conversational", "implicit")
ROLES = ("system", "user", "assistant", "tool")
PROMPT_END_ROLES = ("user", "tool")  # a prompt ends with the turn the response answers
_FLOAT32_MAX = 3.4028234663852886e38  # weights are stored as float32


@dataclass(frozen=True)
class Columns:
    """Where the fields live in a record."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    weight: str | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> Columns:
        return cls(
            getattr(cfg, "prompt_column", "prompt"),
            getattr(cfg, "chosen_column", "chosen"),
            getattr(cfg, "rejected_column", "rejected"),
            getattr(cfg, "weight_column", None),
        )

    def needed(self) -> list[str]:
        cols = [self.prompt, self.chosen, self.rejected]
        return [*cols, self.weight] if self.weight else cols


@dataclass(frozen=True)
class Rendered:
    """One pair as text: ``prompt + chosen`` and ``prompt + rejected`` are the texts the model sees."""

    prompt: str
    chosen: str
    rejected: str
    chat: bool  # rendered by a chat template: add no special tokens and no EOS


def detect_shape(
    forced: str,
    cols: Columns,
    first: dict | None,
    columns: Sequence[str] | None,
    where: Location | str,
) -> str:
    """The shape of a file, from ``forced`` (config) or its first record / column names."""
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
    value = first.get(cols.prompt) if first is not None else None
    return "conversational" if isinstance(value, (list, tuple)) else "standard"


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
            f"{loc}: field {field!r} must be a number (a pair weight), got {_show(value)}"
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
    if specials is None and shape != "standard":
        specials = special_token_pattern(tokenizer)
    if shape == "standard":
        prompt = _string(record, cols.prompt, loc, allow_empty=True)
        chosen = _string(record, cols.chosen, loc)
        rejected = _string(record, cols.rejected, loc)
        return Rendered(prompt, chosen, rejected, chat=False)
    if shape == "conversational":
        prompt_msgs = _messages(_get(record, cols.prompt, loc), cols.prompt, loc)
        if not prompt_msgs:
            raise DataError(
                f"{loc}: field {cols.prompt!r} is an empty list; expected at least one message"
            )
        _check_prompt_end(prompt_msgs, cols.prompt, loc)
        chosen_msgs = _response(_get(record, cols.chosen, loc), cols.chosen, loc)
        rejected_msgs = _response(_get(record, cols.rejected, loc), cols.rejected, loc)
        forged = _forged_turn(
            specials,
            (
                (cols.prompt, prompt_msgs),
                (cols.chosen, chosen_msgs),
                (cols.rejected, rejected_msgs),
            ),
        )
        return forged or _render_chat(tokenizer, prompt_msgs, chosen_msgs, rejected_msgs, loc)
    if shape == "implicit":
        chosen, rejected = _get(record, cols.chosen, loc), _get(record, cols.rejected, loc)
        if isinstance(chosen, str) and isinstance(rejected, str):
            cut = implicit_text_split(chosen, rejected)
            prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
            for name, text in ((cols.chosen, chosen), (cols.rejected, rejected)):
                if not text.strip():
                    raise DataError(
                        f"{loc}: field {name!r} has an empty response after removing the common prompt "
                        f"{_show(prompt)}; expected a response after the shared text"
                    )
            return Rendered(prompt, chosen, rejected, chat=False)
        if isinstance(chosen, (list, tuple)) and isinstance(rejected, (list, tuple)):
            chosen = _messages(chosen, cols.chosen, loc)
            rejected = _messages(rejected, cols.rejected, loc)
            k = implicit_message_split(chosen, rejected)
            if k == 0:
                raise DataError(
                    f"{loc}: fields {cols.chosen!r} and {cols.rejected!r} share no prompt (implicit shape): "
                    "expected both conversations to start with the same messages, followed by an "
                    "assistant message"
                )
            _check_prompt_end(chosen[:k], f"{cols.chosen}[:{k}] (the shared prompt)", loc)
            chosen_resp = _response(chosen[k:], cols.chosen, loc, offset=k)
            rejected_resp = _response(rejected[k:], cols.rejected, loc, offset=k)
            forged = _forged_turn(specials, ((cols.chosen, chosen), (cols.rejected, rejected)))
            return forged or _render_chat(tokenizer, chosen[:k], chosen_resp, rejected_resp, loc)
        raise DataError(
            f"{loc}: fields {cols.chosen!r} and {cols.rejected!r} must both be strings or both be lists of "
            f"messages (implicit prompt shape), got {type(chosen).__name__} and {type(rejected).__name__}"
        )
    raise DataError(f"data shape {shape!r} is not one of {', '.join(SHAPES)}")


def implicit_text_split(chosen: str, rejected: str) -> int:
    """Prompt length in characters for two full texts: common prefix backed off to after a whitespace."""
    n = _common_prefix_len(chosen, rejected)
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    return n


def implicit_message_split(chosen: list[dict], rejected: list[dict]) -> int:
    """Prompt length in messages: common prefix, shortened until both remainders start with the assistant."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and not (
        k < len(chosen)
        and k < len(rejected)
        and chosen[k].get("role") == "assistant"
        and rejected[k].get("role") == "assistant"
    ):
        k -= 1
    return k


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


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _messages(value: Any, field: str, loc: Location) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        kind = "null" if value is None else type(value).__name__
        raise DataError(
            f"{loc}: field {field!r} must be a list of {{role, content}} messages, got {kind}"
        )
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(
                f"{loc}: field {where!r} must be a {{role, content}} message, got {_show(msg)}"
            )
        role = msg.get("role")
        if role is None:
            raise DataError(
                f"{loc}: field {where + '.role'!r} is missing; expected one of {', '.join(ROLES)}"
            )
        if role not in ROLES:
            raise DataError(
                f"{loc}: field {where + '.role'!r} has unknown role {_show(role)}; expected one of "
                f"{', '.join(ROLES)}"
            )
        if "content" not in msg:
            raise DataError(f"{loc}: field {where + '.content'!r} is missing; expected a string")
        content = msg["content"]
        if not isinstance(content, str) and not (content is None and msg.get("tool_calls")):
            kind = "null" if content is None else type(content).__name__
            raise DataError(f"{loc}: field {where + '.content'!r} must be a string, got {kind}")
        out.append({k: v for k, v in msg.items() if v is not None})
    return out


def _response(value: Any, field: str, loc: Location, offset: int = 0) -> list[dict]:
    """The response messages: assistant turns only. ``offset``: index of the first one in ``field``."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        value = [value]
    msgs = _messages(value, field, loc)
    if not msgs or msgs[0]["role"] != "assistant":
        first = "nothing" if not msgs else f"role {msgs[0]['role']!r}"
        raise DataError(
            f"{loc}: field {field!r} must start with an assistant message (the response), got {first}"
        )
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            raise DataError(
                f"{loc}: field {f'{field}[{offset + i}].role'!r} is {msg['role']!r}; a response holds "
                "assistant messages only (put earlier turns in the prompt)"
            )
    if not any(m.get("content", "").strip() or m.get("tool_calls") for m in msgs):
        raise DataError(
            f"{loc}: field {field!r} is an empty response; expected non-empty assistant content"
        )
    return msgs


def _check_prompt_end(msgs: list[dict], field: str, loc: Location) -> None:
    role = msgs[-1]["role"]
    if role not in PROMPT_END_ROLES:
        raise DataError(
            f"{loc}: field {field!r} ends with a {role!r} message; a prompt must end with a "
            f"{' or '.join(PROMPT_END_ROLES)} message (the turn the response answers)"
        )


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, text) of every string inside a message value (content, name, tool call arguments, ...)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def _forged_turn(
    specials: re.Pattern[str] | None, fields: Sequence[tuple[str, list[dict]]]
) -> Drop | None:
    """A `Drop` when a message carries the text of a special token (see the module docstring)."""
    if specials is None:
        return None
    for field, msgs in fields:
        for i, msg in enumerate(msgs):
            for key, value in msg.items():
                if key == "role":  # validated against ROLES
                    continue
                for path, text in _strings(value, f"{field}[{i}].{key}"):
                    found = specials.search(text)
                    if found:
                        return Drop(
                            "special_token_in_content",
                            f"field {path!r} contains the special token {found.group()!r} as text",
                        )
    return None


def _render_chat(
    tokenizer: Any, prompt: list[dict], chosen: list[dict], rejected: list[dict], loc: Location
) -> Rendered:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{loc}: conversational data needs a tokenizer with a chat_template; this tokenizer has none "
            "(set one, or give prompt/chosen/rejected as strings)"
        )
    try:
        prompt_text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )
        responses = []
        for response in (chosen, rejected):
            full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
            if not full.startswith(prompt_text):
                raise DataError(
                    f"{loc}: the chat template is not prefix-stable: the rendered prompt (with the generation "
                    "prompt) is not a prefix of the rendered conversation, so the response boundary is "
                    f"undefined.\n  prompt ends: {_show(prompt_text[-60:])}\n  conversation at that point: "
                    f"{_show(full[max(0, len(prompt_text) - 60) : len(prompt_text)])}\n"
                    "Use a template whose generation prompt equals the start of a rendered assistant turn."
                )
            responses.append(full[len(prompt_text) :])
    except DataError:
        raise
    except Exception as e:  # jinja errors, raise_exception() in templates
        raise DataError(f"{loc}: the chat template failed on this conversation: {e}") from None
    return Rendered(prompt_text, responses[0], responses[1], chat=True)
