"""preftune.data.shapes: shape detection, validation errors, chat rendering, implicit prompts, weights."""

import pytest
from _data_helpers import UNSTABLE_TEMPLATE, char_tokenizer

from preftune.data import DataError, Location
from preftune.data.shapes import (
    Columns,
    detect_shape,
    implicit_message_split,
    implicit_text_split,
    parse_weight,
    render_pair,
)

LOC = Location("pairs.jsonl", line=7)
COLS = Columns()
TOK = char_tokenizer()


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_detect_shape():
    std = {"prompt": "p", "chosen": "a", "rejected": "b"}
    conv = {"prompt": _msgs(("user", "p")), "chosen": "a", "rejected": "b"}
    assert detect_shape("auto", COLS, std, None, "f") == "standard"
    assert detect_shape("auto", COLS, conv, None, "f") == "conversational"
    assert detect_shape("auto", COLS, {"chosen": "a", "rejected": "b"}, None, "f") == "implicit"
    assert detect_shape("implicit", COLS, std, None, "f") == "implicit"
    assert (
        detect_shape("conversational", COLS, None, ["prompt", "chosen", "rejected"], "f")
        == "conversational"
    )
    with pytest.raises(
        DataError, match=r"f: column 'rejected' not found \(did you mean 'Rejected'\?\)"
    ):
        detect_shape("auto", COLS, {"prompt": "p", "chosen": "a", "Rejected": "b"}, None, "f")
    with pytest.raises(
        DataError, match=r"column 'prompt' not found.*available columns: 'question'"
    ):
        detect_shape("standard", COLS, {"question": "p", "chosen": "a", "rejected": "b"}, None, "f")
    with pytest.raises(DataError, match="data shape 'chat'"):
        detect_shape("chat", COLS, std, None, "f")


def test_custom_column_names():
    cols = Columns("question", "response_j", "response_k", "score")
    record = {"question": "Q?", "response_j": " yes", "response_k": " no", "score": "0.5"}
    assert detect_shape("auto", cols, record, None, "f") == "standard"
    rendered = render_pair(record, "standard", cols, LOC, TOK)
    assert (rendered.prompt, rendered.chosen, rendered.rejected) == ("Q?", " yes", " no")
    assert cols.needed() == ["question", "response_j", "response_k", "score"]


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        (
            {"prompt": 3, "chosen": "a", "rejected": "b"},
            r"line 7: field 'prompt' must be a string, got int",
        ),
        (
            {"prompt": "p", "chosen": None, "rejected": "b"},
            r"line 7: field 'chosen' must be a string, got null",
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": "  "},
            r"line 7: field 'rejected' is an empty response",
        ),
        (
            {"prompt": "p", "chosen": ["a"], "rejected": "b"},
            r"field 'chosen' must be a string.*conversational",
        ),
        ({"prompt": "p", "chosen": "a"}, r"line 7: column 'rejected' not found"),
    ],
)
def test_standard_errors_name_line_and_field(record, pattern):
    with pytest.raises(DataError, match=pattern):
        render_pair(record, "standard", COLS, LOC, TOK)


def test_conversational_render_is_prompt_plus_response():
    record = {
        "prompt": _msgs(("system", "be brief"), ("user", "hi")),
        "chosen": "hello",  # a string is one assistant message
        "rejected": _msgs(("assistant", "go away")),
    }
    r = render_pair(record, "conversational", COLS, LOC, TOK)
    assert r.chat
    assert r.prompt == "<s><|system|>be brief</s><|user|>hi</s><|assistant|>"
    assert r.chosen == "hello</s>"
    assert r.rejected == "go away</s>"
    full = TOK.apply_chat_template(record["prompt"] + _msgs(("assistant", "hello")), tokenize=False)
    assert r.prompt + r.chosen == full


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        (
            {"prompt": _msgs(("user", "q"), ("robot", "x")), "chosen": "a", "rejected": "b"},
            r"line 7: field 'prompt\[1\]\.role' has unknown role 'robot'; expected one of system, user",
        ),
        (
            {"prompt": [{"content": "q"}], "chosen": "a", "rejected": "b"},
            r"line 7: field 'prompt\[0\]\.role' is missing",
        ),
        (
            {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
            r"line 7: field 'prompt\[0\]\.content' is missing",
        ),
        (
            {
                "prompt": _msgs(("user", "q")),
                "chosen": [{"role": "assistant", "content": 5}],
                "rejected": "b",
            },
            r"line 7: field 'chosen\[0\]\.content' must be a string, got int",
        ),
        (
            {"prompt": _msgs(("user", "q")), "chosen": "a", "rejected": _msgs(("assistant", ""))},
            r"line 7: field 'rejected' is an empty response",
        ),
        (
            {"prompt": _msgs(("user", "q")), "chosen": _msgs(("user", "a")), "rejected": "b"},
            r"line 7: field 'chosen' must start with an assistant message",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            r"line 7: field 'prompt' must be a list of \{role, content\} messages, got str",
        ),
        (
            {"prompt": [], "chosen": "a", "rejected": "b"},
            r"line 7: field 'prompt' is an empty list",
        ),
    ],
)
def test_conversational_errors_name_line_and_field(record, pattern):
    with pytest.raises(DataError, match=pattern):
        render_pair(record, "conversational", COLS, LOC, TOK)


def test_template_that_is_not_prefix_stable_is_refused():
    tok = char_tokenizer(chat_template=UNSTABLE_TEMPLATE)
    record = {"prompt": _msgs(("user", "q")), "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match="line 7: the chat template is not prefix-stable"):
        render_pair(record, "conversational", COLS, LOC, tok)
    with pytest.raises(DataError, match="needs a tokenizer with a chat_template"):
        render_pair(record, "conversational", COLS, LOC, char_tokenizer(chat_template=None))


def test_implicit_text_split_backs_off_to_whitespace():
    assert implicit_text_split("Q: sky?\nA: blue", "Q: sky?\nA: black") == len("Q: sky?\nA: ")
    assert implicit_text_split("A: great job", "A: grand job") == len(
        "A: "
    )  # "gr" stays in the responses
    assert implicit_text_split("A: yes", "A: yes sir") == len("A: ")  # one is a prefix of the other
    assert implicit_text_split("abc", "abd") == 0  # no whitespace: empty prompt
    r = render_pair(
        {"chosen": "Q: sky?\nA: blue", "rejected": "Q: sky?\nA: red"}, "implicit", COLS, LOC, TOK
    )
    assert (r.prompt, r.chosen, r.rejected, r.chat) == ("Q: sky?\nA: ", "blue", "red", False)
    with pytest.raises(DataError, match="line 7: field 'chosen' has an empty response"):
        render_pair({"chosen": "Q: sky? ", "rejected": "Q: sky? blue"}, "implicit", COLS, LOC, TOK)


def test_implicit_messages_split_at_the_assistant_turn():
    common = _msgs(("system", "s"), ("user", "q"))
    chosen = [*common, *_msgs(("assistant", "good"))]
    rejected = [*common, *_msgs(("assistant", "bad"))]
    assert implicit_message_split(chosen, rejected) == 2
    # shared first assistant turn and user turn: the prompt ends before the differing assistant turn
    multi_c = [*chosen, *_msgs(("user", "more"), ("assistant", "x"))]
    multi_r = [*chosen, *_msgs(("user", "more"), ("assistant", "y"))]
    assert implicit_message_split(multi_c, multi_r) == 4
    # differing at a user turn: back off to the last assistant turn both share a start of
    assert (
        implicit_message_split([*chosen, *_msgs(("user", "u1"))], [*chosen, *_msgs(("user", "u2"))])
        == 2
    )
    r = render_pair({"chosen": chosen, "rejected": rejected}, "implicit", COLS, LOC, TOK)
    assert r.chat and r.prompt.endswith("<|assistant|>") and r.chosen == "good</s>"
    with pytest.raises(DataError, match="share no prompt"):
        render_pair(
            {"chosen": _msgs(("user", "a")), "rejected": _msgs(("user", "b"))},
            "implicit",
            COLS,
            LOC,
            TOK,
        )
    with pytest.raises(DataError, match="must both be strings or both be lists"):
        render_pair({"chosen": "a b", "rejected": rejected}, "implicit", COLS, LOC, TOK)


def test_weights():
    assert parse_weight(None, LOC, "w") == 1.0
    assert parse_weight("", LOC, "w") == 1.0
    assert parse_weight(" 0.25 ", LOC, "w") == 0.25
    assert parse_weight(3, LOC, "w") == 3.0
    with pytest.raises(
        DataError, match=r"line 7: field 'w' must be a number \(a pair weight\), got 'high'"
    ):
        parse_weight("high", LOC, "w")
    with pytest.raises(DataError, match="line 7: field 'w' must be a number"):
        parse_weight(True, LOC, "w")
    with pytest.raises(DataError, match=r"line 7: field 'w' must be a finite number >= 0"):
        parse_weight(float("nan"), LOC, "w")
    with pytest.raises(DataError, match=r"field 'w' must be a finite number >= 0, got -1"):
        parse_weight(-1, LOC, "w")
