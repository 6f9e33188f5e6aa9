"""Tests for preftune.losses.transport (AOT, Melnyk et al. 2024, arXiv 2406.05882).

Expected values come from arithmetic in the docstrings or from plain float64 formulas written here (sort,
then ``−log(1 / (1 + exp(−βδ)))``), never from the code under test. The registry-wide float64 brute force
and finiteness grid of tests/test_losses.py cover both losses too.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import compute_loss

LN3 = math.log(3.0)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def ones(k):
    return torch.ones(k, dtype=torch.int64)


def loss(name, pc, pr, rc, rr, **hp):
    return compute_loss(
        name, pc, pr, rc, rr, chosen_tokens=ones(len(pc)), rejected_tokens=ones(len(pc)), **hp
    )


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# Paired: pair 1 has z_θ = logp_θ(y_w) − logp_θ(y_l) = 0 and z_ref = ln 3; pair 2 has z_θ = 2 ln 3, z_ref = 0.
PAIRED = {
    "pc": t(-1.0, -1.0),
    "pr": t(-1.0, -1.0 - 2 * LN3),
    "rc": t(-1.0, -2.0),
    "rr": t(-1.0 - LN3, -2.0),
}
# Unpaired: pair 1 has r_w = 0, r_l = ln 3; pair 2 has r_w = 2 ln 3, r_l = 0.
UNPAIRED = {
    "pc": t(-1.0, -1.0),
    "rc": t(-1.0, -1.0 - 2 * LN3),
    "pr": t(-2.0, -2.0),
    "rr": t(-2.0 - LN3, -2.0),
}


def _call(name, d, **hp):
    return loss(name, d["pc"], d["pr"], d["rc"], d["rr"], **hp)


# ----------------------------------------------------------------------------- hand-computed cases
def test_aot_by_hand():
    """β = 1. sort(z_θ) = (0, 2 ln 3), sort(z_ref) = (0, ln 3): δ = (0, ln 3).
    Quantile terms: −log σ(0) = log 2 and −log σ(ln 3) = log(4/3).
    Pair by pair (DPO) the same data gives h = (−ln 3, 2 ln 3): log 4 and log(10/9), a different loss.
    With ε = 0.25: log 2 and 0.75·log(4/3) + 0.25·log 4. Rewards stay per pair, β·(logp_θ − logp_ref):
    chosen (−1 + 1, −1 + 2) = (0, 1); rejected (−1 + 1 + ln 3, −1 − 2 ln 3 + 2) = (ln 3, 1 − 2 ln 3)."""
    out = _call("aot", PAIRED, beta=1.0)
    assert out.losses.tolist() == [approx(math.log(2)), approx(math.log(4 / 3))]
    dpo = _call("sigmoid", PAIRED, beta=1.0)
    assert dpo.losses.tolist() == [approx(math.log(4)), approx(math.log(10 / 9))]
    smooth = _call("aot", PAIRED, beta=1.0, label_smoothing=0.25)
    assert smooth.losses.tolist() == [
        approx(math.log(2)),
        approx(0.75 * math.log(4 / 3) + 0.25 * math.log(4)),
    ]
    assert out.chosen_rewards.tolist() == [approx(0.0), approx(1.0)]
    assert out.rejected_rewards.tolist() == [approx(LN3), approx(1.0 - 2 * LN3)]


def test_aot_unpaired_by_hand():
    """β = 1. sort(r_w) = (0, 2 ln 3), sort(r_l) = (0, ln 3): δ = (0, ln 3) → log 2 and log(4/3).
    Pair by pair (DPO): h = (−ln 3, 2 ln 3) → log 4 and log(10/9). Rewards: β·r_w = (0, 2 ln 3),
    β·r_l = (ln 3, 0), in the pairs' order."""
    out = _call("aot_unpaired", UNPAIRED, beta=1.0)
    assert out.losses.tolist() == [approx(math.log(2)), approx(math.log(4 / 3))]
    assert out.chosen_rewards.tolist() == [approx(0.0), approx(2 * LN3)]
    assert out.rejected_rewards.tolist() == [approx(LN3), approx(0.0)]
    dpo = _call("sigmoid", UNPAIRED, beta=1.0)
    assert dpo.losses.tolist() == [approx(math.log(4)), approx(math.log(10 / 9))]


# ----------------------------------------------------------------------------- limiting cases
def random_pairs(seed, batch):
    gen = torch.Generator().manual_seed(seed)
    return [-(0.5 + 30 * torch.rand(batch, generator=gen, dtype=torch.float64)) for _ in range(4)]


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_batch_of_one_is_dpo(name, eps):
    """One pair: sorting does nothing, δ = h: AOT is DPO (cdpo with the same ε), values and gradients."""
    for seed in range(5):
        x = random_pairs(seed, 1)
        a = [v.clone().requires_grad_(True) for v in x]
        b = [v.clone().requires_grad_(True) for v in x]
        out = loss(name, *a, beta=0.7, label_smoothing=eps)
        ref = loss("cdpo", *b, beta=0.7, label_smoothing=eps)
        torch.testing.assert_close(out.losses, ref.losses, rtol=1e-12, atol=1e-12)
        for ga, gb in zip(
            torch.autograd.grad(out.losses.sum(), a), torch.autograd.grad(ref.losses.sum(), b)
        ):
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


def test_aot_with_a_neutral_reference_sums_to_dpo():
    """All reference margins z_ref equal to 0: δ = sort(z_θ) = a permutation of the DPO margins h, so the
    summed loss and every gradient equal DPO's."""
    pc, pr, _, _ = random_pairs(7, 9)
    a = [v.clone().requires_grad_(True) for v in (pc, pr)]
    b = [v.clone().requires_grad_(True) for v in (pc, pr)]
    ref = torch.full((9,), -3.0, dtype=torch.float64)
    out = loss("aot", a[0], a[1], ref, ref, beta=0.4)
    dpo = loss("sigmoid", b[0], b[1], ref, ref, beta=0.4)
    torch.testing.assert_close(out.losses.sum(), dpo.losses.sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        out.losses, torch.sort(dpo.losses, descending=True).values, rtol=1e-12, atol=0
    )
    for ga, gb in zip(
        torch.autograd.grad(out.losses.sum(), a), torch.autograd.grad(dpo.losses.sum(), b)
    ):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


def test_aot_unpaired_on_co_sorted_batch_is_dpo_in_rank_order():
    """If r_w and r_l already have the same rank order, sorting keeps every pair together: the quantile
    terms are the DPO terms of the pairs, in ascending order of r_w."""
    r_w = t(-3.0, 0.5, 2.0, 7.0)
    r_l = t(-9.0, -1.0, 4.0, 5.0)
    zero = torch.zeros(4, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    out = loss("aot_unpaired", r_w[perm], r_l[perm], zero, zero, beta=0.5)
    dpo = loss("sigmoid", r_w, r_l, zero, zero, beta=0.5)
    torch.testing.assert_close(out.losses, dpo.losses, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_invariant_to_the_order_of_pairs(name):
    x = random_pairs(11, 10)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    a = loss(name, *x, beta=0.3)
    b = loss(name, *(v[perm] for v in x), beta=0.3)
    assert torch.equal(a.losses, b.losses)
    assert torch.equal(a.chosen_rewards[perm], b.chosen_rewards)


# ----------------------------------------------------------------------------- batch semantics
def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def brute_sorted(name, pc, pr, rc, rr, beta, eps):
    """Plain float64 AOT terms of ONE sort over the given pairs."""
    if name == "aot":
        delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
    else:
        delta = torch.sort(pc - rc).values - torch.sort(pr - rr).values
    return -(1 - eps) * torch.log(_sig(beta * delta)) - eps * torch.log(_sig(-beta * delta))


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_accumulation_is_the_sum_of_per_micro_batch_sorts(name):
    """Pins the documented semantics: a window of micro-batches of sizes 3, 5, 1, 7 (16 pairs), each
    reduced with the window total N = 16, gives the loss and gradient of Σ_mb Σ_i brute_sorted(mb) / 16
    (one sort per micro-batch) to 1e-10; it is NOT one sort over the 16 pairs (that differs here by > 1e-3).
    """
    x = random_pairs(3, 16)
    beta, eps, sizes = 0.2, 0.1, [3, 5, 1, 7]
    ours = [v.clone().requires_grad_(True) for v in x]
    total = 0.0
    for chunk in zip(*(torch.split(v, sizes) for v in ours)):
        out = loss(name, *chunk, beta=beta, label_smoothing=eps)
        step = out.reduce(num_pairs=16)
        step.backward()
        total += step.item()
    theirs = [v.clone().requires_grad_(True) for v in x]
    want = (
        sum(
            brute_sorted(name, *chunk, beta, eps).sum()
            for chunk in zip(*(torch.split(v, sizes) for v in theirs))
        )
        / 16
    )
    want.backward()
    assert total == pytest.approx(want.item(), rel=1e-10, abs=1e-10)
    for o, w in zip(ours, theirs):
        torch.testing.assert_close(o.grad, w.grad, rtol=1e-10, atol=1e-10)
    one_sort = brute_sorted(name, *x, beta, eps).sum().item() / 16
    assert abs(one_sort - total) > 1e-3


def test_error_label_smoothing_out_of_range():
    x = random_pairs(0, 2)
    for name in ("aot", "aot_unpaired"):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\]"):
            loss(name, *x, label_smoothing=0.6)
