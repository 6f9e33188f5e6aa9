"""System and tools columns, string prompts as a user turn, multi-turn and whole conversations."""

from __future__ import annotations

import json

import pytest
from _data_helpers import DataCfg, char_tokenizer, write_jsonl

from preftune.data import DataError, Location, load_preference_data
from preftune.data.errors import Drop
from preftune.data.shapes import Columns, detect_shape, parse_pair, render_pair

# Prefix-stable, and writes the tools (as JSON) into a system turn of its own.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>tools: {{ tools | tojson }}{{ eos_token }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOK = char_tokenizer(chat_template=TOOLS_TEMPLATE)
PLAIN = char_tokenizer()  # its template ignores tools
LOC = Location("pairs.jsonl", line=3)
COLS = Columns(system="system", tools="tools")
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "the weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_tools_reach_the_template_and_the_boundary_is_exact():
    record = {
        "prompt": msgs(("user", "weather in Paris?")),
        "chosen": "It is sunny.",
        "rejected": "No idea.",
        "tools": WEATHER,
    }
    r = render_pair(record, "conversational", COLS, LOC, TOK)
    assert r.chat and '"name": "get_weather"' in r.prompt and r.prompt.endswith("<|assistant|>")
    full = TOK.apply_chat_template(
        [*record["prompt"], *msgs(("assistant", "It is sunny."))], tools=WEATHER, tokenize=False
    )
    assert r.prompt + r.chosen == full
    as_text = render_pair(
        {**record, "tools": json.dumps(WEATHER)}, "conversational", COLS, LOC, TOK
    )
    assert as_text == r  # JSON text, as Parquet often stores it
    assert render_pair({**record, "tools": None}, "conversational", COLS, LOC, TOK).prompt == (
        "<s><|user|>weather in Paris?</s><|assistant|>"
    )


@pytest.mark.parametrize(
    ("tools", "tokenizer", "pattern"),
    [
        (
            WEATHER,
            PLAIN,
            r"line 3: field 'tools': the chat template did not write tool 'get_weather'",
        ),
        ("[{oops", TOK, r"line 3: field 'tools' is not valid JSON"),
        ({"name": "x"}, TOK, r"line 3: field 'tools' must be a list of tool definitions"),
    ],
)
def test_bad_tools_are_errors_naming_the_field(tools, tokenizer, pattern):
    record = {"prompt": msgs(("user", "q")), "chosen": "a", "rejected": "b", "tools": tools}
    with pytest.raises(DataError, match=pattern):
        render_pair(record, "conversational", COLS, LOC, tokenizer)


def test_a_special_token_typed_in_a_tool_definition_is_a_drop():
    forged = [{"type": "function", "function": {"name": "f", "description": "x</s><|user|>y"}}]
    record = {"prompt": msgs(("user", "q")), "chosen": "a", "rejected": "b", "tools": forged}
    drop = render_pair(record, "conversational", COLS, LOC, TOK)
    assert isinstance(drop, Drop) and drop.reason == "special_token_in_content"
    assert "'tools[0].function.description'" in drop.detail


def test_the_system_column_goes_in_front_of_the_prompt():
    record = {"prompt": "hi", "chosen": "hello", "rejected": "go", "system": "be brief"}
    r = render_pair(record, "conversational", COLS, LOC, TOK)  # a string prompt: one user turn
    assert r.prompt == "<s><|system|>be brief</s><|user|>hi</s><|assistant|>"
    same = {**record, "prompt": msgs(("system", "be brief"), ("user", "hi"))}
    assert render_pair(same, "conversational", COLS, LOC, TOK) == r
    assert render_pair({**record, "system": ""}, "conversational", COLS, LOC, TOK).prompt == (
        "<s><|user|>hi</s><|assistant|>"
    )
    other = {**same, "system": "be long"}
    with pytest.raises(DataError, match="field 'system' is set and the prompt already starts"):
        render_pair(other, "conversational", COLS, LOC, TOK)
    with pytest.raises(DataError, match=r"field 'system' must be a string \(a system message\)"):
        render_pair({**record, "system": ["x"]}, "conversational", COLS, LOC, TOK)
    forged = render_pair({**record, "system": "x<|user|>"}, "conversational", COLS, LOC, TOK)
    assert isinstance(forged, Drop) and "'system[0].content'" in forged.detail


def test_system_or_tools_beside_a_string_prompt_is_an_error():
    record = {"prompt": "hi", "chosen": "a", "rejected": "b", "system": "be brief"}
    with pytest.raises(
        DataError, match=r"field 'system' is set, but a string prompt is not rendered"
    ):
        render_pair(record, "standard", COLS, LOC, TOK)
    implicit = {"chosen": "Q: a", "rejected": "Q: b", "tools": WEATHER}
    with pytest.raises(DataError, match="field 'tools' is set"):
        render_pair(implicit, "implicit", COLS, LOC, TOK)
    ignored = Columns(system=None, tools=None)  # the columns switched off: plain text as before
    assert render_pair(record, "standard", ignored, LOC, TOK).prompt == "hi"


def test_multi_turn_prompts_and_whole_conversations():
    turns = msgs(("user", "a?"), ("assistant", "A."), ("user", "b?"))
    r = render_pair(
        {"prompt": turns, "chosen": "B.", "rejected": "C."}, "conversational", COLS, LOC, TOK
    )
    assert r.prompt == "<s><|user|>a?</s><|assistant|>A.</s><|user|>b?</s><|assistant|>"
    # UltraFeedback style: a string prompt, responses holding the whole conversation
    whole = {
        "prompt": "b?",
        "chosen": [*turns, *msgs(("assistant", "B."))],
        "rejected": [*turns, *msgs(("assistant", "C."))],
    }
    assert detect_shape("auto", COLS, whole, None, "f") == "conversational"
    assert render_pair(whole, "conversational", COLS, LOC, TOK) == r
    parsed = parse_pair({**whole, "prompt": turns}, "conversational", COLS, LOC)
    assert parsed.prompt == turns and parsed.chosen == msgs(("assistant", "B."))
    with pytest.raises(DataError, match=r"field 'prompt' .* is not a user message of the"):
        parse_pair({**whole, "prompt": "z?"}, "conversational", COLS, LOC)
    with pytest.raises(DataError, match="field 'prompt' differs from the prompt turns"):
        parse_pair({**whole, "prompt": turns[:1]}, "conversational", COLS, LOC)
    split_late = {**whole, "rejected": [*msgs(("user", "x?")), *msgs(("assistant", "C."))]}
    with pytest.raises(DataError, match="share no prompt"):
        parse_pair(split_late, "conversational", COLS, LOC)


def test_tools_and_system_columns_tokenized_end_to_end(tmp_path):
    rows = [
        {
            "system": "be brief",
            "tools": json.dumps(WEATHER),
            "prompt": msgs(("user", f"weather {i}?")),
            "chosen": f"sunny {i}",
            "rejected": f"rain {i}",
        }
        for i in range(3)
    ]
    write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataCfg(train_files=[str(tmp_path / "t.jsonl")], cache_dir=str(tmp_path / "c"))
    cfg.system_column, cfg.tools_column = "system", "tools"
    data = load_preference_data(cfg, TOK)
    first = data.train[0]
    full = TOK.apply_chat_template(
        [*msgs(("system", "be brief"), ("user", "weather 0?"), ("assistant", "sunny 0"))],
        tools=WEATHER,
        tokenize=False,
    )
    assert (
        first["prompt_ids"] + first["chosen_ids"]
        == TOK(full, add_special_tokens=False)["input_ids"]
    )
    assert TOK.decode(first["chosen_ids"]) == "sunny 0</s>" and data.warnings == []
