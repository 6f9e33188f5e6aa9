"""Live diagnostics on synthetic metric histories: each rule fires on its pattern, stays silent when healthy."""

from __future__ import annotations

import json
import math
import random

import pytest

from preftune.diagnostics import (
    Diagnostics,
    Finding,
    check_grad_explosion,
    check_likelihood_displacement,
    check_nonfinite,
    check_overfitting,
    check_stuck_at_log2,
    check_unbounded_margins,
    format_warning,
    init_loss_for,
)

LOG2 = math.log(2)


def _row(i: int, **over) -> dict:
    """A healthy logged step ``i`` (step = 10 i): loss falls, accuracy rises, chosen up, rejected down."""
    rng = random.Random(i)
    row = {
        "step": 10 * i,
        "loss": LOG2 * math.exp(-i / 20) + 0.01 * rng.random(),
        "rewards/accuracies": 0.5 + 0.4 * (1 - math.exp(-i / 15)) + 0.03 * rng.random(),
        "rewards/margins": 0.05 * i + 0.02 * rng.random(),
        "rewards/chosen": 0.01 * i,
        "rewards/rejected": -0.04 * i,
        "logps/chosen": -50 + 0.05 * i + 2 * (rng.random() - 0.5),
        "logps/rejected": -55 - 0.3 * i + 2 * (rng.random() - 0.5),
        "grad_norm": 1.0 + 0.3 * rng.random(),
        "learning_rate": 5e-7,
    }
    row.update(over)
    return row


def _healthy(n: int = 60) -> list[dict]:
    return [_row(i) for i in range(n)]


def _feed(diag: Diagnostics, rows: list[dict]) -> list[Finding]:
    found = []
    for r in rows:
        found += diag.observe_train(r)
        if r["step"] % 100 == 0 and r["step"]:  # eval a little below train, as in a healthy run
            found += diag.observe_eval(
                {
                    "step": r["step"],
                    "eval/loss": r["loss"] + 0.02,
                    "eval/rewards/accuracies": r["rewards/accuracies"] - 0.05,
                }
            )
    return found


def test_healthy_history_is_silent():
    diag = Diagnostics(loss_names=["sigmoid"], warmup_steps=50)
    assert _feed(diag, _healthy()) == []
    assert diag.report() == []


def _stuck(n=20, margin=0.003, acc=0.5):
    rng = random.Random(0)
    return [
        _row(
            i,
            loss=LOG2 + 0.004 * (rng.random() - 0.5),
            **{"rewards/accuracies": acc + (0.05 * (rng.random() - 0.5) if acc else 0.0)},
            **{"rewards/margins": margin * (rng.random() - 0.5)},
        )
        for i in range(n)
    ]


def test_stuck_at_log2_fires_after_warmup_once():
    diag = Diagnostics(loss_names=["sigmoid"], warmup_steps=50)
    rows = _stuck()
    fired = [(r["step"], f) for r in rows for f in diag.observe_train(r)]
    assert len(fired) == 1
    step, f = fired[0]
    assert f.rule == "stuck_at_log2" and step == 80  # 3 logged points after warm-up (60, 70, 80)
    assert "learning rate" in f.causes[0]
    # docs/FORMULAS.md: log 2 is the init loss for every β, so raising β is never the advice
    assert all("does not help" in a for a in f.advice if "β" in a)
    assert len(diag.report()) == 1


def test_stuck_with_zero_margins_blames_the_reference():
    # reference recomputed from the trained weights: margins exactly 0, accuracy (strict >) 0.0
    f = check_stuck_at_log2(_stuck(margin=0.0, acc=0.0), warmup_steps=50)
    assert f is not None and "reference" in f.causes[0]


def test_stuck_silent_during_warmup_and_for_other_losses():
    assert check_stuck_at_log2(_stuck(n=6), warmup_steps=50) is None
    for names in (["ipo"], ["sigmoid", "sft"], ["simpo"]):
        diag = Diagnostics(loss_names=names, warmup_steps=50)
        assert not any(diag.observe_train(r) for r in _stuck()), names
    assert check_stuck_at_log2(_healthy(), warmup_steps=50) is None


def test_init_loss_for():
    assert init_loss_for("sigmoid") == pytest.approx(LOG2)
    assert init_loss_for(["cdpo"], [2.0]) == pytest.approx(2 * LOG2)
    assert init_loss_for(["robust"]) == pytest.approx(LOG2)
    assert init_loss_for(["sigmoid", "sft"]) is None
    assert init_loss_for(["hinge"]) is None
    assert Diagnostics(loss_names=["ipo"], init_loss=0.25).init_loss == 0.25


def test_likelihood_displacement():
    falling = [
        _row(i, **{"logps/chosen": -50 - 0.5 * i, "logps/rejected": -55 - 0.8 * i})
        for i in range(30)
    ]
    f = check_likelihood_displacement(falling)
    assert f is not None and f.rule == "likelihood_displacement"
    assert any("sft" in a for a in f.advice) and any("apo_zero" in a for a in f.advice)
    # only rejected falling (healthy DPO) -> silent
    assert check_likelihood_displacement(_healthy()) is None
    # large batch-to-batch noise without a trend -> silent
    rng = random.Random(3)
    noisy = [
        _row(i, **{"logps/chosen": -50 + 20 * rng.gauss(0, 1), "logps/rejected": -55 - 0.8 * i})
        for i in range(30)
    ]
    assert check_likelihood_displacement(noisy) is None
    assert check_likelihood_displacement(falling[:5]) is None  # not enough history


def test_overfitting_fires_on_eval():
    diag = Diagnostics(loss_names=["sigmoid"])
    train = [_row(i, **{"rewards/accuracies": 0.97}) for i in range(10)]
    for r in train:
        assert diag.observe_train(r) == []
    assert diag.observe_eval({"step": 40, "eval/loss": 0.5, "eval/rewards/accuracies": 0.9}) == []
    found = diag.observe_eval({"step": 90, "eval/loss": 0.8, "eval/rewards/accuracies": 0.6})
    assert [f.rule for f in found] == ["overfitting"]
    assert found[0].step == 90 and "eval loss is rising" in found[0].symptom
    assert any("cdpo" in a for a in found[0].advice)
    # plain keys work too, and a small gap is silent
    assert check_overfitting(train, [{"step": 90, "rewards/accuracies": 0.85}]) is None
    assert check_overfitting(train, []) is None


def test_nonfinite():
    rows = _healthy(5)
    assert check_nonfinite(rows) is None
    f = check_nonfinite([*rows, _row(5, loss=float("nan"))])
    assert f is not None and f.rule == "nonfinite" and f.step == 50 and "loss" in f.symptom
    f = check_nonfinite([*rows, _row(5, grad_norm=float("inf"))])
    assert f is not None and "grad_norm" in f.symptom


def test_grad_explosion():
    rows = _healthy(10)
    assert check_grad_explosion(rows) is None
    assert check_grad_explosion([*rows, _row(10, grad_norm=5.0)]) is None
    f = check_grad_explosion([*rows, _row(10, grad_norm=40.0)])
    assert f is not None and f.rule == "grad_explosion" and f.step == 100
    assert check_grad_explosion([_row(0), _row(1, grad_norm=100.0)]) is None  # no baseline yet


def _separated(n=30, plateau=False):
    return [
        _row(
            i,
            loss=1e-3,
            **{"rewards/accuracies": 1.0, "rewards/margins": 8.0 if plateau else 2.0 + 0.6 * i},
        )
        for i in range(n)
    ]


def test_unbounded_margins():
    f = check_unbounded_margins(_separated())
    assert f is not None and f.rule == "unbounded_margins"
    assert any("ipo" in a for a in f.advice) and any("cdpo" in a for a in f.advice)
    assert check_unbounded_margins(_separated(plateau=True)) is None
    assert check_unbounded_margins(_healthy()) is None


def test_which_rules_apply_is_read_from_the_loss_registry():
    """The margin rule watches the losses whose registry entry says their optimum is an infinite margin;
    the stuck-at-init rule those that state their initial loss. Flip a registry fact and the watcher
    follows: no loss name is written in the diagnostics."""
    import dataclasses

    from preftune.losses import LOSSES

    def fired(names):
        diag = Diagnostics(loss_names=names)
        return {f.rule for r in _separated() for f in diag.observe_train(r)}

    assert "unbounded_margins" in fired(["sigmoid"])
    assert "unbounded_margins" in fired(["sigmoid", "sft"])
    assert "unbounded_margins" not in fired(["ipo"])
    ipo = LOSSES["ipo"]
    try:
        LOSSES["ipo"] = dataclasses.replace(ipo, unbounded_margin=True, init_loss=0.25)
        assert "unbounded_margins" in fired(["ipo"])
        assert init_loss_for(["ipo"], [2.0]) == 0.5
    finally:
        LOSSES["ipo"] = ipo
    assert init_loss_for(["ipo"]) is None and init_loss_for(["kto"]) is None


def test_each_rule_once_unless_repeat_after():
    rows = _stuck(n=40)
    once = Diagnostics(loss_names=["sigmoid"], warmup_steps=50)
    assert len(_feed(once, rows)) == 1
    again = Diagnostics(loss_names=["sigmoid"], warmup_steps=50, repeat_after=100)
    steps = [f.step for f in _feed(again, rows)]
    assert steps == [80, 180, 280, 380]


def test_format_warning_and_report_json():
    diag = Diagnostics()
    (f,) = diag.observe_train(_row(0, loss=float("inf")))
    text = format_warning(f)
    lines = text.splitlines()
    assert lines[0].startswith("preftune warning [nonfinite] at step 0: non-finite loss")
    assert "  likely causes:" in lines and "  what to try:" in lines
    assert all(f"    - {c}" in lines for c in f.causes + f.advice)
    report = json.loads(json.dumps(diag.report()))
    assert report[0]["rule"] == "nonfinite" and set(report[0]) == {
        "rule",
        "step",
        "symptom",
        "causes",
        "advice",
    }


def test_step_argument_and_defaults():
    diag = Diagnostics(warmup_steps=50)
    rows = [{k: v for k, v in r.items() if k != "step"} for r in _stuck()]
    found = [f for i, r in enumerate(rows) for f in diag.observe_train(r, step=10 * i)]
    assert [(f.rule, f.step) for f in found] == [("stuck_at_log2", 80)]
    assert diag.train[-1]["step"] == 190
    diag.observe_eval({"loss": 0.7, "rewards/accuracies": 0.5})  # dated at the last train step
    assert diag.eval[-1]["step"] == 190
    counted = Diagnostics()
    counted.observe_train({"loss": 0.5})
    counted.observe_train({"loss": 0.4})
    assert [r["step"] for r in counted.train] == [1, 2]
