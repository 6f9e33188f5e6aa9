"""Messages: validating turns, the system and tools columns, forged turns, and rendering with a chat template.

Used by `preftune.data.shapes` for the conversational and implicit-messages shapes (see its docstring for the
rules). ``tools`` (tool definitions, JSON schemas as ``apply_chat_template`` takes them) are passed to the
template for the prompt and for each full conversation alike, so the prompt/response boundary stays exact;
a template that does not write a tool's name into the prompt ignores tools, and the row is refused rather than
trained without them.

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

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import DataError, Drop, Location

__all__ = [
    "PROMPT_END_ROLES",
    "ROLES",
    "check_prompt_column",
    "check_prompt_end",
    "forged_turn",
    "implicit_message_split",
    "messages",
    "parse_tools",
    "render_chat",
    "response",
    "show",
    "split_conversations",
    "whole_conversations",
    "with_system",
]

ROLES = ("system", "user", "assistant", "tool")
PROMPT_END_ROLES = ("user", "tool")  # a prompt ends with the turn the response answers


def show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def messages(value: Any, field: str, loc: Location) -> list[dict]:
    """A list of ``{role, content}`` messages, validated (``None`` values dropped from each message)."""
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
                f"{loc}: field {where!r} must be a {{role, content}} message, got {show(msg)}"
            )
        role = msg.get("role")
        if role is None:
            raise DataError(
                f"{loc}: field {where + '.role'!r} is missing; expected one of {', '.join(ROLES)}"
            )
        if role not in ROLES:
            raise DataError(
                f"{loc}: field {where + '.role'!r} has unknown role {show(role)}; expected one of "
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


def response(value: Any, field: str, loc: Location, offset: int = 0) -> list[dict]:
    """The response messages: assistant turns only. ``offset``: index of the first one in ``field``."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        value = [value]
    msgs = messages(value, field, loc)
    if not msgs or msgs[0]["role"] != "assistant":
        first = "nothing" if not msgs else f"role {msgs[0]['role']!r}"
        raise DataError(
            f"{loc}: field {field!r} must start with an assistant message (the response), got {first} "
            "(or give chosen and rejected both as whole conversations, the prompt turns first)"
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


def check_prompt_end(msgs: list[dict], field: str, loc: Location) -> None:
    role = msgs[-1]["role"]
    if role not in PROMPT_END_ROLES:
        raise DataError(
            f"{loc}: field {field!r} ends with a {role!r} message; a prompt must end with a "
            f"{' or '.join(PROMPT_END_ROLES)} message (the turn the response answers)"
        )


def with_system(prompt: list[dict], value: Any, field: str, loc: Location) -> list[dict]:
    """``prompt`` with the system column's message in front (null or empty: unchanged)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return prompt
    if not isinstance(value, str):
        raise DataError(
            f"{loc}: field {field!r} must be a string (a system message), got {show(value)}"
        )
    if prompt and prompt[0]["role"] == "system":
        if prompt[0].get("content") == value:
            return prompt
        raise DataError(
            f"{loc}: field {field!r} is set and the prompt already starts with another system message; "
            "expected one of them"
        )
    return [{"role": "system", "content": value}, *prompt]


def parse_tools(value: Any, field: str, loc: Location) -> list[dict] | None:
    """Tool definitions: a list of JSON-schema objects, or JSON text of one (as Parquet often stores them);
    null, empty text or an empty list: none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{loc}: field {field!r} is not valid JSON ({e.msg} at column {e.colno}); expected a "
                "list of tool definitions"
            ) from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, dict) for t in value):
        raise DataError(
            f"{loc}: field {field!r} must be a list of tool definitions (JSON schema objects), "
            f"got {show(value)}"
        )
    return [dict(t) for t in value] or None


def tool_name(tool: dict) -> str | None:
    function = tool.get("function")
    name = function.get("name") if isinstance(function, dict) else tool.get("name")
    return name if isinstance(name, str) else None


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, text) of every string inside a value (content, name, tool call arguments, ...)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def forged_turn(
    specials: re.Pattern[str] | None,
    fields: Sequence[tuple[str, list[dict]]],
    tools: tuple[str, list[dict]] | None = None,
) -> Drop | None:
    """A `Drop` when a message (any string it carries besides its role) or a tool definition holds the
    text of a special token (see shapes.py)."""
    if specials is None:
        return None
    found: list[tuple[str, str]] = []
    for field, msgs in fields:
        for i, msg in enumerate(msgs):
            for key, value in msg.items():
                if key != "role":  # validated against ROLES
                    found.extend(_strings(value, f"{field}[{i}].{key}"))
    if tools is not None:
        found.extend(_strings(tools[1], tools[0]))
    for path, text in found:
        hit = specials.search(text)
        if hit:
            return Drop(
                "special_token_in_content",
                f"field {path!r} contains the special token {hit.group()!r} as text",
            )
    return None


def render_chat(
    tokenizer: Any,
    prompt: list[dict],
    chosen: list[dict],
    rejected: list[dict],
    loc: Location,
    tools: list[dict] | None = None,
    tools_field: str = "tools",
) -> tuple[str, str, str]:
    """(prompt text, chosen text, rejected text): the prompt rendered with the generation prompt, each
    response the rest of its full rendered conversation, which must start with the prompt text."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{loc}: conversational data needs a tokenizer with a chat_template; this tokenizer has none "
            "(set one, or give prompt/chosen/rejected as strings)"
        )
    extra = {"tools": tools} if tools else {}
    try:
        prompt_text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True, **extra
        )
        for tool in tools or ():
            name = tool_name(tool)
            if name is not None and name not in prompt_text:
                raise DataError(
                    f"{loc}: field {tools_field!r}: the chat template did not write tool {name!r} into "
                    "the prompt (it ignores tools); expected a tool-calling model's template"
                )
        responses = []
        for resp in (chosen, rejected):
            full = tokenizer.apply_chat_template(prompt + resp, tokenize=False, **extra)
            if not full.startswith(prompt_text):
                raise DataError(
                    f"{loc}: the chat template is not prefix-stable: the rendered prompt (with the generation "
                    "prompt) is not a prefix of the rendered conversation, so the response boundary is "
                    f"undefined.\n  prompt ends: {show(prompt_text[-60:])}\n  conversation at that point: "
                    f"{show(full[max(0, len(prompt_text) - 60) : len(prompt_text)])}\n"
                    "Use a template whose generation prompt equals the start of a rendered assistant turn."
                )
            responses.append(full[len(prompt_text) :])
    except DataError:
        raise
    except Exception as e:  # jinja errors, raise_exception() in templates
        raise DataError(f"{loc}: the chat template failed on this conversation: {e}") from None
    return prompt_text, responses[0], responses[1]


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


def whole_conversations(chosen: Any, rejected: Any) -> bool:
    """Both responses are lists of messages that start before the assistant speaks."""
    return all(
        isinstance(v, (list, tuple))
        and v
        and isinstance(v[0], dict)
        and v[0].get("role") not in (None, "assistant")
        for v in (chosen, rejected)
    )


def split_conversations(
    chosen: Any, rejected: Any, chosen_field: str, rejected_field: str, loc: Location
) -> tuple[list[dict], list[dict], list[dict], None, tuple]:
    """Two whole conversations -> (shared prompt turns, chosen's and rejected's assistant turns, no tools,
    the message fields as named)."""
    chosen = messages(chosen, chosen_field, loc)
    rejected = messages(rejected, rejected_field, loc)
    k = implicit_message_split(chosen, rejected)
    if k == 0:
        raise DataError(
            f"{loc}: fields {chosen_field!r} and {rejected_field!r} share no prompt: expected both "
            "conversations to start with the same messages, followed by an assistant message"
        )
    check_prompt_end(chosen[:k], f"{chosen_field}[:{k}] (the shared prompt)", loc)
    chosen_resp = response(chosen[k:], chosen_field, loc, offset=k)
    rejected_resp = response(rejected[k:], rejected_field, loc, offset=k)
    fields = ((chosen_field, chosen), (rejected_field, rejected))
    return chosen[:k], chosen_resp, rejected_resp, None, fields


def check_prompt_column(value: Any, prompt: Any, field: str, loc: Location) -> None:
    """The prompt column beside whole conversations must agree with their shared turns."""
    if value is None:
        return
    if isinstance(value, str):
        if any(m["role"] == "user" and m.get("content") == value for m in prompt):
            return
        raise DataError(
            f"{loc}: field {field!r} ({show(value)}) is not a user message of the conversation's prompt "
            f"turns in the responses; expected the same prompt"
        )
    if messages(value, field, loc) != prompt:
        raise DataError(
            f"{loc}: field {field!r} differs from the prompt turns the responses start with "
            f"({len(prompt)} messages); expected the same prompt"
        )
