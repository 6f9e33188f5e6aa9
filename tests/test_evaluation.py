"""preftune.evaluation: StepMetrics' sums, counts and their reduction over ranks; evaluate() reduces the loss
of a whole split exactly as one training window would (``preftune eval``'s wiring: tests/test_cli_evaluate.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from _tiny import toy_pairs, write_jsonl

from preftune.evaluation import StepMetrics, evaluate


def test_step_metrics_average_each_name_over_its_own_count():
    m = StepMetrics(torch.device("cpu"))
    m.add(torch.tensor(0.5), {"a": (torch.tensor(3.0), torch.tensor(2.0))})
    m.add(
        torch.tensor(0.25),
        {"a": (torch.tensor(1.0), torch.tensor(2.0)), "b": (torch.tensor(0.0), 0)},
    )
    m.add_grad_norm(torch.tensor(2.0))
    row = m.pop()
    assert row == {"loss": 0.75, "a": 1.0, "grad_norm": 2.0}  # b has count 0: left out


def test_all_reduce_sums_sums_counts_terms_and_loss_but_not_the_grad_norm():
    """Two ranks' windows read as one: sums and counts add (so a mean is over both ranks' pairs), the loss
    and its terms add (each rank holds its share of the global loss); the grad norm is already global."""
    ranks = []
    for value, count, loss in ((3.0, 2.0, 0.5), (1.0, 6.0, 0.25)):
        m = StepMetrics(torch.device("cpu"))
        m.add(
            torch.tensor(loss),
            {"a": (torch.tensor(value), torch.tensor(count))},
            {"loss/x": torch.tensor(loss / 2)},
        )
        m.add_grad_norm(torch.tensor(4.0))
        ranks.append(m)
    names0, packed0 = ranks[0].packed()
    names1, packed1 = ranks[1].packed()
    assert names0 == names1
    total = packed0 + packed1
    for m in ranks:
        m.all_reduce(lambda t: t.copy_(total))
    rows = [m.pop() for m in ranks]
    assert rows[0] == rows[1] == {"loss": 0.75, "loss/x": 0.375, "a": 0.5, "grad_norm": 4.0}


def test_evaluate_equals_the_mean_over_pairs_and_restores_the_mode(tiny_dir, tmp_path):
    """The split is one window: the loss is the pair mean whatever the batch size; the policy at the
    reference scores log 2 with margins 0; the module's train/eval mode is left as it was."""
    from preftune.build import build_objective, build_tokenizer
    from preftune.config import Config
    from preftune.data import load_preference_data
    from preftune.model import PaddedLayout, load_model, resolve_source
    from preftune.reference import CopyReference

    cfg = Config()
    cfg.model.path = str(tiny_dir)
    cfg.data.train_files = [str(write_jsonl(tmp_path / "d.jsonl", toy_pairs(7, seed=5)))]
    data = load_preference_data(cfg.data, build_tokenizer(cfg))
    model = load_model(resolve_source(tiny_dir), device=torch.device("cpu"))
    layout = PaddedLayout(pad_token_id=0, chunk_size=16)
    module = layout.module(model)
    module.train()
    reference = CopyReference(model, layout)
    rows = [
        evaluate(
            module,
            reference,
            data.train,
            layout,
            build_objective(cfg),
            batch_size=b,
            device=torch.device("cpu"),
            autocast=contextlib.nullcontext,
        )
        for b in (1, 3, 7)
    ]
    assert module.training
    for row in rows:
        assert row["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
        assert row["rewards/margins"] == 0.0 and "grad_norm" not in row
        assert row["logps/chosen"] == pytest.approx(rows[0]["logps/chosen"], rel=1e-6)
