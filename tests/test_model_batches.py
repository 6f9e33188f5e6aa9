"""preftune.model.batches: completion_mask marks exactly the response; padding; the shared-prompt layout;
placeholders."""

import pytest
import torch
from _data_helpers import char_tokenizer, conversational

from preftune.data import Location
from preftune.data.shapes import Columns, Rendered, render_pair
from preftune.data.tokenize import encode_pairs
from preftune.model import collate_padded, collate_shared

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
    batch = collate_padded(_examples(rendered), TOK.pad_token_id, padding_side=side)
    B = len(rendered)
    for row in range(2 * B):
        pair = rendered[row % B]
        response = pair.chosen if row < B else pair.rejected
        masked = batch.input_ids[row][batch.completion_mask[row].bool()].tolist()
        assert masked == TOK(response, add_special_tokens=False)["input_ids"]
        assert TOK.decode(masked) == response


def test_string_pairs_mask_response_plus_eos_and_straddling_tokens():
    batch = collate_padded(_examples(STRING_PAIRS), TOK.pad_token_id)
    B = len(STRING_PAIRS)
    for row in range(2 * B):
        pair = STRING_PAIRS[row % B]
        response = pair.chosen if row < B else pair.rejected
        masked = batch.input_ids[row][batch.completion_mask[row].bool()].tolist()
        assert masked[-1] == TOK.eos_token_id
        text = TOK.decode(masked[:-1])
        if row % B == 2:  # the straddling token "th" is a response token: the mask covers it
            assert text == "t" + response
        else:
            assert text == response


def test_padding_layout_right_and_left():
    examples = _examples(STRING_PAIRS)
    right = collate_padded(examples, TOK.pad_token_id)
    left = collate_padded(examples, TOK.pad_token_id, padding_side="left")
    lengths = [len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in examples]
    lengths += [len(e["prompt_ids"]) + len(e["rejected_ids"]) for e in examples]
    T = max(lengths)
    assert right.input_ids.shape == (6, T) and left.input_ids.shape == (6, T)
    for key in ("input_ids", "attention_mask", "completion_mask", "position_ids"):
        assert getattr(right, key).dtype == torch.int64
    for row, n in enumerate(lengths):
        assert right.attention_mask[row].tolist() == [1] * n + [0] * (T - n)
        assert left.attention_mask[row].tolist() == [0] * (T - n) + [1] * n
        assert right.input_ids[row, n:].eq(TOK.pad_token_id).all()
        assert right.position_ids[row].tolist() == [*range(n), *[0] * (T - n)]
        for key in ("input_ids", "completion_mask", "position_ids"):
            assert (
                getattr(right, key)[row, :n].tolist() == getattr(left, key)[row, T - n :].tolist()
            )
    # chosen rows first, then rejected
    first = examples[0]
    assert right.input_ids[0, : lengths[0]].tolist() == first["prompt_ids"] + first["chosen_ids"]
    assert right.input_ids[3, : lengths[3]].tolist() == first["prompt_ids"] + first["rejected_ids"]
    assert right.weights.tolist() == [0.5, 1.0, 1.5] and right.weights.dtype == torch.float32
    assert right.index.tolist() == [10, 11, 12] and right.index.dtype == torch.int64


def test_defaults_and_errors():
    ex = {"prompt_ids": [1, 5], "chosen_ids": [6], "rejected_ids": [7, 8]}
    batch = collate_padded([ex, dict(ex)], 0)
    assert batch.weights.tolist() == [1.0, 1.0] and batch.index.tolist() == [0, 1]
    tensors = {k: torch.tensor(v) for k, v in ex.items()}
    assert torch.equal(collate_padded([tensors], 0).input_ids, collate_padded([ex], 0).input_ids)
    with pytest.raises(ValueError, match="padding_side"):
        collate_padded([ex], 0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate_padded([ex], None)
    with pytest.raises(ValueError, match="empty"):
        collate_padded([], 0)


def test_collate_shared_layout():
    pairs = [
        {
            "prompt_ids": [5, 6],
            "chosen_ids": [7, 8],
            "rejected_ids": [9],
            "weight": 0.5,
            "index": 3,
        },
        {"prompt_ids": [], "chosen_ids": [4, 5], "rejected_ids": [6, 7], "weight": 1.0, "index": 4},
    ]
    b = collate_shared(pairs, 0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 5, 6, 7]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 0, 1]]
    assert b.segments.tolist() == [[0, 0, 2, 2, 1], [0, 5, 0, 2, 2]]
    # pair 0: chosen 7 <- pos 1, 8 <- pos 2; rejected 9 <- pos 1 (the prompt's last state)
    # pair 1 (empty prompt): the first token of each response is not scored
    assert b.score_index.tolist() == [1, 2, 1, 5, 7]
    assert b.score_labels.tolist() == [7, 8, 9, 5, 7]
    assert b.score_seq.tolist() == [0, 0, 2, 1, 3]
    assert b.n_tokens.tolist() == [2, 1, 1, 1]
    assert b.weights.tolist() == [0.5, 1.0] and b.index.tolist() == [3, 4]
    assert b.num_pairs == 2 and b.chosen_tokens == 3
    left = collate_shared(pairs, 0, pairs_per_row=1, padding_side="left")
    assert left.input_ids.tolist() == [[5, 6, 7, 8, 9], [0, 4, 5, 6, 7]]
    assert left.segments.tolist() == [[0, 0, 2, 2, 1], [1, 1, 0, 2, 2]]
    # row 1 starts at flat index 5 and holds one pad on the left
    assert left.score_index.tolist() == [1, 2, 1, 5 + 1 + 0, 5 + 1 + 2]


@pytest.mark.parametrize("collate", [collate_padded, collate_shared])
def test_placeholder_counts_nothing_and_moves_like_a_batch(collate):
    """A placeholder (an empty share on one rank) runs like a batch but counts no pairs or tokens."""
    ex = {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2]}
    batch = collate([ex], 0)
    assert batch.num_pairs == 1 and batch.chosen_tokens == 2 and not batch.placeholder
    stand_in = batch.as_placeholder()
    assert stand_in.placeholder and stand_in.num_pairs == 0 and stand_in.chosen_tokens == 0
    assert stand_in.weights.tolist() == [0.0]
    moved = stand_in.to("cpu")
    assert moved.placeholder and type(moved) is type(batch)
    assert moved.model_inputs().keys() == batch.model_inputs().keys()
