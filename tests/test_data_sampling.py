"""preftune.data.sampling: deterministic batches, coverage, the last short batch, ranks, length grouping."""

import random

import pytest

from preftune.data import batch_indices, padding_share, pair_lengths, row_lengths


def _flat(batches):
    return [i for b in batches for i in b]


def test_deterministic_per_seed_and_epoch():
    a = batch_indices(range(100), 8, seed=3, epoch=1)
    assert a == batch_indices(range(100), 8, seed=3, epoch=1)
    assert a != batch_indices(range(100), 8, seed=3, epoch=2)
    assert a != batch_indices(range(100), 8, seed=4, epoch=1)
    assert batch_indices(range(5), 2, seed=0, epoch=0, shuffle=False) == [[0, 1], [2, 3], [4]]


def test_coverage_and_last_short_batch_kept():
    batches = batch_indices(range(10), 3, seed=0, epoch=0)
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert sorted(_flat(batches)) == list(range(10))
    assert batch_indices([], 3, seed=0, epoch=0) == []


@pytest.mark.parametrize("group", [False, True])
def test_ranks_take_interleaved_shares_of_each_global_batch(group):
    lengths = [random.Random(i).randrange(1, 100) for i in range(23)]
    kw = {"seed": 5, "epoch": 2, "group_by_length": group}
    ranks = [batch_indices(lengths, 2, rank=r, world_size=3, **kw) for r in range(3)]
    global_ = batch_indices(lengths, 6, **kw)
    assert [len(b) for b in global_] == [6, 6, 6, 5]
    assert [len(r) for r in ranks] == [4, 4, 4]  # same number of steps on every rank
    for step, whole in enumerate(global_):
        assert [ranks[r][step] for r in range(3)] == [whole[r::3] for r in range(3)]
    # uneven tail: shares differ by at most one
    assert [len(ranks[r][-1]) for r in range(3)] == [2, 2, 1]
    assert sorted(_flat(_flat(ranks))) == list(range(23))
    tiny = [batch_indices(range(1), 2, seed=0, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert tiny == [[[0]], [[]]]  # fewer pairs than ranks: a rank gets an empty last batch


def test_group_by_length_cuts_padding_and_stays_random():
    rng = random.Random(0)
    lengths = [rng.choice([5, 10, 50, 200, 400]) + rng.randrange(5) for _ in range(1000)]
    plain = batch_indices(lengths, 8, seed=0, epoch=0)
    grouped = batch_indices(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert sorted(_flat(grouped)) == list(range(1000))
    assert [len(b) for b in grouped] == [8] * 125
    assert padding_share(grouped, lengths) < 0.5 * padding_share(plain, lengths)
    assert grouped == batch_indices(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert grouped != batch_indices(lengths, 8, seed=0, epoch=1, group_by_length=True)
    # batches are shuffled: the first batches are not simply the longest ones
    assert len({max(lengths[i] for i in b) for b in grouped[:10]}) > 1
    short = batch_indices(lengths[:21], 4, seed=1, epoch=0, group_by_length=True, mega_batches=2)
    assert [len(b) for b in short][-1] == 1  # the short tail stays last


def test_padding_share_hand_computed():
    """Rows (3, 5) and (2, 2) pad to T=5: 4 rows * 5 slots = 20, 12 real tokens -> 8/20 = 0.4."""
    assert padding_share([[0, 1]], [(3, 5), (2, 2)]) == pytest.approx(0.4)
    assert padding_share([[0], [1]], [4, 2]) == 0.0
    assert padding_share([], []) == 0.0


def test_lengths_from_examples_or_a_dataset():
    import datasets

    rows = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
        {"prompt_ids": [1], "chosen_ids": [3, 3], "rejected_ids": [4]},
    ]
    assert row_lengths(rows) == [(3, 5), (3, 2)]
    assert pair_lengths(rows) == [5, 3]
    ds = datasets.Dataset.from_list(rows)
    assert row_lengths(ds) == [(3, 5), (3, 2)]
    assert pair_lengths(ds.select([1, 0])) == [3, 5]
