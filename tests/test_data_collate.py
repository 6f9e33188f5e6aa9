"""preftune.data.collate: completion_mask marks exactly the response; padding; padding-free equivalence."""

import pytest
import torch
from _data_helpers import char_tokenizer, conversational

from preftune.data import Location, collate_pairs, collate_pairs_padding_free
from preftune.data.shapes import Columns, Rendered, render_pair
from preftune.data.tokenize import encode_pairs

TOK = char_tokenizer([("b", "c"), ("t", "h")])


def _examples(pairs):
    return [
        {
            "prompt_ids": p,
            "chosen_ids": c,
            "rejected_ids": r,
            "weight": 0.5 * (i + 1),
            "index": 10 + i,
        }
        for i, (p, c, r) in enumerate(encode_pairs(TOK, pairs, add_eos=True))
    ]


STRING_PAIRS = [
    Rendered("Q: the sky?\nA:", " blue", " a very long green answer", chat=False),
    Rendered("Q: what?\n", "A: this", "A: that", chat=False),
    Rendered("Say: t", "he end", "ho", chat=False),  # the merge t+h straddles the boundary
]


@pytest.mark.parametrize("side", ["right", "left"])
def test_completion_mask_marks_exactly_the_response(side):
    """Checked against an independent tokenization of each response text."""
    rendered = [
        render_pair(r, "conversational", Columns(), Location("f"), TOK) for r in conversational(3)
    ]
    batch = collate_pairs(_examples(rendered), TOK.pad_token_id, padding_side=side)
    B = len(rendered)
    for row in range(2 * B):
        pair = rendered[row % B]
        response = pair.chosen if row < B else pair.rejected
        masked = batch["input_ids"][row][batch["completion_mask"][row].bool()].tolist()
        assert masked == TOK(response, add_special_tokens=False)["input_ids"]
        assert TOK.decode(masked) == response


def test_string_pairs_mask_response_plus_eos_and_straddling_tokens():
    batch = collate_pairs(_examples(STRING_PAIRS), TOK.pad_token_id)
    B = len(STRING_PAIRS)
    for row in range(2 * B):
        pair = STRING_PAIRS[row % B]
        response = pair.chosen if row < B else pair.rejected
        masked = batch["input_ids"][row][batch["completion_mask"][row].bool()].tolist()
        assert masked[-1] == TOK.eos_token_id
        text = TOK.decode(masked[:-1])
        if row % B == 2:  # the straddling token "th" is a response token: the mask covers it
            assert text == "t" + response
        else:
            assert text == response


def test_padding_layout_right_and_left():
    examples = _examples(STRING_PAIRS)
    right = collate_pairs(examples, TOK.pad_token_id)
    left = collate_pairs(examples, TOK.pad_token_id, padding_side="left")
    lengths = [len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in examples]
    lengths += [len(e["prompt_ids"]) + len(e["rejected_ids"]) for e in examples]
    T = max(lengths)
    assert right["input_ids"].shape == (6, T) and left["input_ids"].shape == (6, T)
    for key in ("input_ids", "attention_mask", "completion_mask", "position_ids"):
        assert right[key].dtype == torch.int64
    for row, n in enumerate(lengths):
        assert right["attention_mask"][row].tolist() == [1] * n + [0] * (T - n)
        assert left["attention_mask"][row].tolist() == [0] * (T - n) + [1] * n
        assert right["input_ids"][row, n:].eq(TOK.pad_token_id).all()
        assert right["position_ids"][row].tolist() == [*range(n), *[0] * (T - n)]
        for key in ("input_ids", "completion_mask", "position_ids"):
            assert right[key][row, :n].tolist() == left[key][row, T - n :].tolist()
    # chosen rows first, then rejected
    first = examples[0]
    assert right["input_ids"][0, : lengths[0]].tolist() == first["prompt_ids"] + first["chosen_ids"]
    assert (
        right["input_ids"][3, : lengths[3]].tolist() == first["prompt_ids"] + first["rejected_ids"]
    )
    assert right["weights"].tolist() == [0.5, 1.0, 1.5] and right["weights"].dtype == torch.float32
    assert right["index"].tolist() == [10, 11, 12] and right["index"].dtype == torch.int64


def test_padding_free_matches_padded():
    examples = _examples(STRING_PAIRS)
    padded = collate_pairs(examples, TOK.pad_token_id)
    packed = collate_pairs_padding_free(examples)
    cu = packed["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.tolist()[0] == 0 and len(cu) == 7
    assert packed["input_ids"].shape == (1, int(cu[-1]))
    assert packed["seq_lens"].tolist() == padded["attention_mask"].sum(1).tolist()
    assert packed["max_seqlen"] == padded["input_ids"].shape[1]
    for row in range(6):
        real = padded["attention_mask"][row].bool()
        span = slice(int(cu[row]), int(cu[row + 1]))
        for key in ("input_ids", "completion_mask", "position_ids"):
            assert packed[key][0, span].tolist() == padded[key][row][real].tolist(), key
    assert torch.equal(packed["weights"], padded["weights"])
    assert torch.equal(packed["index"], padded["index"])


def test_defaults_and_errors():
    ex = {"prompt_ids": [1, 5], "chosen_ids": [6], "rejected_ids": [7, 8]}
    batch = collate_pairs([ex, dict(ex)], 0)
    assert batch["weights"].tolist() == [1.0, 1.0] and batch["index"].tolist() == [0, 1]
    tensors = {k: torch.tensor(v) for k, v in ex.items()}
    assert torch.equal(
        collate_pairs([tensors], 0)["input_ids"], collate_pairs([ex], 0)["input_ids"]
    )
    with pytest.raises(ValueError, match="padding_side"):
        collate_pairs([ex], 0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate_pairs([ex], None)
    with pytest.raises(ValueError, match="empty"):
        collate_pairs([], 0)
