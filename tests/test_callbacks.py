"""preftune.callbacks: what ``train(cfg, callbacks=[...])`` hands a callback after every optimizer step —
the step, the logged metrics row (None between log steps), this rank's micro-batches (rows and token
counts) and the step's wall time — and that a callback that raises stops the run like any error."""

from __future__ import annotations

import json
import signal

import pytest
from _tiny import tiny_train_config, toy_pairs, write_jsonl

from preftune.callbacks import Callback, StepInfo
from preftune.trainer import train


class Record(Callback):
    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[int, dict | None, StepInfo]] = []
        self.fail_at = fail_at

    def on_step_end(self, step, metrics, batch):
        self.calls.append((step, None if metrics is None else dict(metrics), batch))
        if step == self.fail_at:
            raise RuntimeError(f"stop at {step}")


def test_every_step_with_its_row_pairs_tokens_and_time(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(20, seed=4))
    rec = Record()
    cfg = tiny_train_config(
        tiny_dir, data, tmp_path / "run", train__batch_size=3, train__grad_accum=2,
        train__max_steps=5, log__log_every=2,
    )  # fmt: skip
    result = train(cfg, callbacks=[rec])
    assert [c[0] for c in rec.calls] == [1, 2, 3, 4, 5] and result.steps == 5
    # The logged rows, exactly as metrics.jsonl has them, on log steps (and the last step) only.
    logged = {
        r["step"]: r
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if r["split"] == "train"
    }
    for step, row, _ in rec.calls:
        if step in (2, 4, 5):
            assert row is not None and {k: logged[step][k] for k in row} == row
            assert {"loss", "rewards/margins", "grad_norm", "learning_rate"} <= set(row)
        else:
            assert row is None
    # Two micro-batches of 3 pairs per step; 20 pairs = 7 micro-batches per epoch (the last one of 2), so
    # step 4 holds the epoch's last micro-batch alone and step 5 starts the next epoch.
    sizes = [[len(m) for m in batch.indices] for _, _, batch in rec.calls]
    assert sizes == [[3, 3], [3, 3], [3, 3], [2], [3, 3]]
    first_epoch = [i for _, _, batch in rec.calls[:4] for i in batch.pairs]
    assert sorted(first_epoch) == list(range(20))
    # Token counts as trained: prompt + chosen + rejected, BOS and EOS included (char tokenizer: 1 a char).
    pairs = toy_pairs(20, seed=4)
    for _, _, batch in rec.calls:
        assert batch.wall_s > 0
        for indices, counts in zip(batch.indices, batch.tokens):
            for i, (n_prompt, n_chosen, n_rejected) in zip(indices, counts):
                assert n_prompt == 1 + len(pairs[i]["prompt"])
                assert n_chosen == len(pairs[i]["chosen"]) + 1
                assert n_rejected == len(pairs[i]["rejected"]) + 1
        assert batch.num_tokens == sum(sum(t) for m in batch.tokens for t in m)


def test_a_callback_that_raises_stops_the_run(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(16, seed=4))
    handler = signal.getsignal(signal.SIGTERM)
    rec = Record(fail_at=2)
    cfg = tiny_train_config(tiny_dir, data, tmp_path / "run", train__max_steps=4)
    with pytest.raises(RuntimeError, match="stop at 2"):
        train(cfg, callbacks=[rec])
    assert [c[0] for c in rec.calls] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) == handler  # the trainer's handlers are gone again
