"""Tests for preftune.losses.unpaired (KTO, Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 8).

Expected values come from arithmetic in the docstrings or from the plain float64 formula written here
(``z₀ = max(0, mean(kl_θ − kl_ref))`` as a constant, ``λ (1 − 1/(1 + exp(−β·x))``), never from the code
under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import (
    LOSSES,
    UNPAIRED_LOSSES,
    KTOOutput,
    kl_stats,
    kto,
    kto_weight_ratio,
    mismatched_indices,
)

LN3 = math.log(3.0)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def b(*values):
    return torch.tensor(values, dtype=torch.bool)


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------- hand-computed case
def test_kto_by_hand():
    """β = 1, λ_D = 2, λ_U = 1.5. KL rows: kl_θ − kl_ref = (2 ln 3, 0), mean ln 3 > 0, so z₀ = ln 3.
    Row 1 desirable, r = 2 ln 3: r − z₀ = ln 3, 1 − σ(ln 3) = 1/4, times 2 → 0.5.
    Row 2 undesirable, r = 0: z₀ − r = ln 3, 1 − σ(ln 3) = 1/4, times 1.5 → 0.375.
    Row 3 undesirable, r = 2 ln 3: z₀ − r = −ln 3, 1 − σ(−ln 3) = 3/4, times 1.5 → 1.125.
    reduce() = (0.5 + 0.375 + 1.125) / 3 = 2/3. Rewards β·r = (2 ln 3, 0, 2 ln 3); kl = ln 3."""
    out = kto(
        t(-1.0, -2.0, -3.0),
        t(-1.0 - 2 * LN3, -2.0, -3.0 - 2 * LN3),
        b(True, False, False),
        t(-5.0, -6.0),
        t(-5.0 - 2 * LN3, -6.0),
        beta=1.0,
        desirable_weight=2.0,
        undesirable_weight=1.5,
    )
    assert isinstance(out, KTOOutput)
    assert out.losses.tolist() == [approx(0.5), approx(0.375), approx(1.125)]
    assert out.reduce().item() == approx(2 / 3)
    assert out.reduce(num_rows=6).item() == approx(1 / 3)
    assert out.rewards.tolist() == [approx(2 * LN3), approx(0.0), approx(2 * LN3)]
    assert out.kl.item() == approx(LN3)


def test_reference_point_is_clamped_at_zero():
    """KL rows with mean −1 (< 0): z₀ = 0. Desirable r = 0: 1 − σ(0) = 1/2 (λ_D = 1)."""
    out = kto(t(-1.0), t(-1.0), b(True), t(-3.0, -2.0), t(-1.0, -2.0), beta=0.5)
    assert out.kl.item() == 0.0
    assert out.losses.item() == approx(0.5)


def test_reference_point_is_detached():
    """No gradient reaches the KL rows; the rows' gradients are those of z₀ held constant."""
    pol, ref = t(-2.0, -4.0).requires_grad_(True), t(-3.0, -3.0)
    kl_p, kl_r = t(-1.0, -7.0).requires_grad_(True), t(-2.0, -9.0).requires_grad_(True)
    out = kto(pol, ref, b(True, False), kl_p, kl_r, beta=0.8)
    grads = torch.autograd.grad(out.reduce(), [pol, kl_p, kl_r], allow_unused=True)
    assert grads[1] is None and grads[2] is None
    assert not out.kl.requires_grad and not out.rewards.requires_grad
    z0 = 1.5  # mean((−1 + 2), (−7 + 9)) = 1.5
    x = pol.detach().clone().requires_grad_(True)
    r = x - ref
    want = torch.stack(
        [1 - 1 / (1 + torch.exp(-0.8 * (r[0] - z0))), 1 - 1 / (1 + torch.exp(-0.8 * (z0 - r[1])))]
    )
    (want_g,) = torch.autograd.grad(want.mean(), [x])
    torch.testing.assert_close(grads[0], want_g, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- float64 brute force
def brute(pol, ref, desirable, kl_p, kl_r, beta, w_d, w_u):
    z0 = torch.clamp((kl_p - kl_r).mean(), min=0).detach()
    r = pol - ref
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    return torch.where(
        desirable, w_d * (1 - sig(beta * (r - z0))), w_u * (1 - sig(beta * (z0 - r)))
    )


def random_rows(seed, n, k):
    gen = torch.Generator().manual_seed(seed)
    pol = -30 * torch.rand(n, generator=gen, dtype=torch.float64)
    ref = pol + 10 * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    desirable = torch.rand(n, generator=gen) < 0.4
    kl_p = -30 * torch.rand(k, generator=gen, dtype=torch.float64)
    kl_r = kl_p + 3 * (2 * torch.rand(k, generator=gen, dtype=torch.float64) - 0.8)
    return pol, ref, desirable, kl_p, kl_r


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("beta", "w_d", "w_u"), [(0.1, 1.0, 1.0), (0.7, 3.0, 1.3), (2.0, 1.0, 0.4)]
)
def test_matches_float64_bruteforce_values_and_grads(beta, w_d, w_u, dtype):
    pol, ref, desirable, kl_p, kl_r = random_rows(int(10 * beta + w_d), 11, 11)
    ours = [x.to(dtype).requires_grad_(True) for x in (pol, ref)]
    theirs = [x.clone().requires_grad_(True) for x in (pol, ref)]
    out = kto(
        *ours,
        desirable,
        kl_p.to(dtype),
        kl_r.to(dtype),
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
    )
    want = brute(*theirs, desirable, kl_p, kl_r, beta, w_d, w_u)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert out.losses.dtype == dtype
    torch.testing.assert_close(out.losses.double(), want.detach(), **tol)
    u = torch.randn(11, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for g, e in zip(
        torch.autograd.grad((out.losses.double() * u).sum(), ours),
        torch.autograd.grad((want * u).sum(), theirs),
    ):
        torch.testing.assert_close(g.double(), e, **tol)


# ----------------------------------------------------------------------------- mismatched pairs
@pytest.mark.parametrize("n", range(2, 10))
def test_mismatched_indices_never_pair_a_row_with_itself(n):
    prompts, completions = mismatched_indices(n)
    assert prompts.tolist() == list(range(n))
    assert completions.tolist() == [(i + 1) % n for i in range(n)]
    assert bool((prompts != completions).all())
    assert sorted(completions.tolist()) == list(range(n))  # every completion used once


@pytest.mark.parametrize("n", [0, 1])
def test_mismatched_indices_without_a_second_row_give_no_kl_row(n):
    prompts, completions = mismatched_indices(n)
    assert prompts.numel() == 0 and completions.numel() == 0


@pytest.mark.parametrize("n", range(2, 10))
def test_mismatched_indices_skip_rows_of_the_same_prompt(n):
    """Rows 2k and 2k+1 share a prompt (a pair unpaired on the fly): no KL row keeps its own prompt."""
    ids = [i // 2 for i in range(n)]
    prompts, completions = mismatched_indices(n, prompt_ids=ids)
    pairs = list(zip(prompts.tolist(), completions.tolist()))
    assert all(ids[p] != ids[c] for p, c in pairs)
    assert len(pairs) == (n if n > 2 else 0)  # n = 2: one prompt only, no mismatched row exists
    assert mismatched_indices(4, prompt_ids=torch.tensor([7, 7, 7, 7]))[0].numel() == 0


def test_a_single_row_takes_z0_from_the_window():
    """Micro-batch of 1: no KL row of its own. Alone, z₀ = 0; with the window's (Σ, n) = (3, 2), z₀ = 1.5.
    Desirable r = 1.5 with β = 1: 1 − σ(1.5 − 1.5) = 1/2; with z₀ = 0: 1 − σ(1.5)."""
    prompts, _ = mismatched_indices(1)
    empty = t()[prompts]
    alone = kto(t(0.0), t(-1.5), b(True), empty, empty, beta=1.0)
    assert alone.kl.item() == 0.0 and alone.losses.item() == approx(1 / (1 + math.exp(1.5)))
    windowed = kto(t(0.0), t(-1.5), b(True), beta=1.0, kl_sum_and_count=(3.0, 2))
    assert windowed.kl.item() == approx(1.5) and windowed.losses.item() == approx(0.5)


# ----------------------------------------------------------------------------- exact accumulation
def test_z0_from_summed_stats_equals_the_concatenated_batch():
    """Micro-batches of 3, 5, 1 (no KL row: n = 1) and 7 rows, KL rows from mismatched_indices per
    micro-batch. (1) z₀ from the summed (Σ, n) equals z₀ of all the KL rows at once (to 1e-14; exactly on
    integer-valued log-probs). (2) Each micro-batch reduced with the window's row count N = 16 and the
    window's z₀ gives the same total loss and gradients as one call on all 16 rows with all KL rows."""
    sizes = [3, 5, 1, 7]
    pol, ref, desirable, comp_p, comp_r = random_rows(5, 16, 16)
    kl_rows = []  # per micro-batch: (policy, ref) log-probs of its mismatched rows, here simulated
    start = 0
    for s in sizes:
        prompts, completions = mismatched_indices(s)
        kl_rows.append((comp_p[start:][completions] - 0.1 * prompts, comp_r[start:][completions]))
        start += s
    stats = sum(kl_stats(p, r) for p, r in kl_rows)
    all_p, all_r = torch.cat([p for p, _ in kl_rows]), torch.cat([r for _, r in kl_rows])
    assert stats[1].item() == all_p.numel() == 15
    one = kto(pol, ref, desirable, all_p, all_r, beta=0.3)
    windowed_z0 = kto(pol[:1], ref[:1], desirable[:1], beta=0.3, kl_sum_and_count=stats).kl
    assert windowed_z0.item() == pytest.approx(one.kl.item(), rel=1e-14, abs=1e-14)
    ints = [(torch.round(p), torch.round(r)) for p, r in kl_rows]
    int_stats = sum(kl_stats(p, r) for p, r in ints)
    cat = kl_stats(torch.cat([p for p, _ in ints]), torch.cat([r for _, r in ints]))
    assert torch.equal(int_stats, cat)

    x_one = pol.clone().requires_grad_(True)
    total_one = kto(x_one, ref, desirable, all_p, all_r, beta=0.3).reduce()
    total_one.backward()
    x_acc = pol.clone().requires_grad_(True)
    total_acc = 0.0
    for p, r, d in zip(
        torch.split(x_acc, sizes), torch.split(ref, sizes), torch.split(desirable, sizes)
    ):
        step = kto(p, r, d, beta=0.3, kl_sum_and_count=stats).reduce(num_rows=16)
        step.backward()
        total_acc += step.item()
    assert total_acc == pytest.approx(total_one.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(x_acc.grad, x_one.grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- finiteness
EXTREMES = [-1e4, -1e3, -1.0, -1e-9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_values_and_grads_at_extremes(dtype):
    """Policy and reference log-probs over {−1e4, −1e3, −1, −1e-9}² (margins to ±1e4), both labels, and
    KL rows over the same grid (z₀ up to ~1e4), plus an empty KL batch."""
    grid = torch.cartesian_prod(*[torch.tensor(EXTREMES, dtype=dtype)] * 2)
    pol = torch.cat([grid[:, 0], grid[:, 0]]).requires_grad_(True)
    ref = torch.cat([grid[:, 1], grid[:, 1]]).requires_grad_(True)
    desirable = torch.arange(32) < 16
    for kl_p, kl_r in [
        (grid[:, 0], grid[:, 1]),
        (grid[:, 1], grid[:, 0]),
        (grid[:0, 0], grid[:0, 1]),
    ]:
        out = kto(pol, ref, desirable, kl_p, kl_r, beta=0.1, desirable_weight=3.0)
        total = out.reduce()
        assert torch.isfinite(out.losses).all() and torch.isfinite(total) and torch.isfinite(out.kl)
        for g in torch.autograd.grad(total, [pol, ref]):
            assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------- API and errors
def test_registry_and_weight_ratio():
    assert "kto" in UNPAIRED_LOSSES and "kto" not in LOSSES
    spec = UNPAIRED_LOSSES["kto"]
    assert spec.fn is kto and spec.needs_reference
    assert spec.defaults == {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    assert kto_weight_ratio(100, 1000, desirable_weight=10.0) == approx(
        1.0
    )  # §4.2 rule: in [1, 4/3]
    assert kto_weight_ratio(3, 0) == math.inf


def test_errors():
    one, yes = t(-1.0), b(True)
    with pytest.raises(ValueError, match="exactly one"):
        kto(one, one, yes)
    with pytest.raises(ValueError, match="exactly one"):
        kto(one, one, yes, one, one, kl_sum_and_count=(0.0, 1))
    with pytest.raises(ValueError, match="both kl_policy_logps and kl_ref_logps"):
        kto(one, one, yes, one, None)
    with pytest.raises(ValueError, match="desirable must be a bool"):
        kto(one, one, torch.ones(1), one, one)
    with pytest.raises(ValueError, match="undesirable_weight must be > 0"):
        kto(one, one, yes, one, one, undesirable_weight=0.0)
    with pytest.raises(ValueError, match=r"same shape \[B\]"):
        kto(t(-1.0, -2.0), one, b(True, False), one, one)
    with pytest.raises(ValueError, match="prompt_ids"):
        mismatched_indices(3, prompt_ids=[0, 1])
