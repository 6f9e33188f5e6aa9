"""Tests for preftune.losses.fdiv (f-DPO, Wang et al. 2023, arXiv 2309.16240).

Expected values come from arithmetic in the docstrings or from the plain float64 formulas ψ(u) = f'(u)
written here with ``u = exp(r)``, never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import LOSSES, compute_loss
from preftune.losses.fdiv import EXP_CAP, _expm1_capped

DIVERGENCES = ["reverse_kl", "forward_kl", "js", "alpha"]


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def ones(k):
    return torch.ones(k, dtype=torch.int64)


def fdpo(pc, pr, rc, rr, **hp):
    return compute_loss(
        "f_dpo", pc, pr, rc, rr, chosen_tokens=ones(len(pc)), rejected_tokens=ones(len(pc)), **hp
    )


def by_ratios(r_w, r_l, **hp):
    """Log-ratios r_w, r_l as inputs: policy = r, reference = 0."""
    r_w, r_l = t(*r_w), t(*r_l)
    return fdpo(r_w, r_l, torch.zeros_like(r_w), torch.zeros_like(r_l), **hp)


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------- hand-computed cases
def test_forward_kl_by_hand():
    """β = 1, r_w = ln 2 (u_w = 2), r_l = −ln 2 (u_l = 1/2). ψ(u) = −1/u: ψ_w = −1/2, ψ_l = −2.
    z = −1/2 + 2 = 1.5; loss = −log σ(1.5) = log(1 + e^−1.5) ≈ 0.20141.
    Rewards β·(ψ(u) − ψ(1)) = 1 − 1/u: 1/2 and −1."""
    out = by_ratios([math.log(2)], [-math.log(2)], beta=1.0, f_divergence="forward_kl")
    assert out.losses.item() == approx(math.log1p(math.exp(-1.5)))
    assert out.chosen_rewards.item() == approx(0.5)
    assert out.rejected_rewards.item() == approx(-1.0)


def test_js_by_hand():
    """β = 1, u_w = 3, u_l = 1. ψ(u) = log(2u/(1+u)): ψ_w = log(6/4) = log 1.5, ψ_l = log 1 = 0.
    σ(log 1.5) = 1.5/2.5 = 0.6, loss = −log 0.6 = log(5/3) ≈ 0.51083. Rewards: log 1.5 and 0."""
    out = by_ratios([math.log(3)], [0.0], beta=1.0, f_divergence="js")
    assert out.losses.item() == approx(math.log(5 / 3))
    assert out.chosen_rewards.item() == approx(math.log(1.5))
    assert out.rejected_rewards.item() == approx(0.0)


def test_alpha_by_hand():
    """β = 1, α = 1/2, u_w = 4, u_l = 1. ψ(u) = (1 − u^−α)/α: ψ_w = (1 − 1/2)/(1/2) = 1, ψ_l = 0.
    loss = −log σ(1) = log(1 + e^−1) ≈ 0.31326. β = 2 doubles the margin: log(1 + e^−2)."""
    out = by_ratios([math.log(4)], [0.0], beta=1.0, f_divergence="alpha", f_alpha=0.5)
    assert out.losses.item() == approx(math.log1p(math.exp(-1)))
    assert out.chosen_rewards.item() == approx(1.0)
    out2 = by_ratios([math.log(4)], [0.0], beta=2.0, f_divergence="alpha", f_alpha=0.5)
    assert out2.losses.item() == approx(math.log1p(math.exp(-2)))


def test_every_divergence_starts_at_log2():
    """At θ = θ_ref every u = 1, ψ_w = ψ_l, the margin is 0: loss log 2, rewards 0."""
    for div in DIVERGENCES:
        out = by_ratios([0.0, 0.0], [0.0, 0.0], f_divergence=div)
        assert out.losses.tolist() == [approx(math.log(2))] * 2, div
        assert out.chosen_rewards.tolist() == [0.0, 0.0], div


# ----------------------------------------------------------------------------- exact DPO limit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reverse_kl_is_exactly_sigmoid(dtype):
    """Bit-for-bit: values, rewards and gradients."""
    gen = torch.Generator().manual_seed(0)
    base = [-30 * torch.rand(16, generator=gen, dtype=torch.float64) for _ in range(4)]
    a = [x.to(dtype).requires_grad_(True) for x in base]
    b = [x.to(dtype).requires_grad_(True) for x in base]
    n = ones(16)
    f = compute_loss("f_dpo", *a, chosen_tokens=n, rejected_tokens=n, beta=0.3)
    s = compute_loss("sigmoid", *b, chosen_tokens=n, rejected_tokens=n, beta=0.3)
    assert torch.equal(f.losses, s.losses)
    assert torch.equal(f.chosen_rewards, s.chosen_rewards)
    assert torch.equal(f.rejected_rewards, s.rejected_rewards)
    for ga, gb in zip(
        torch.autograd.grad(f.losses.sum(), a), torch.autograd.grad(s.losses.sum(), b)
    ):
        assert torch.equal(ga, gb)


def test_alpha_limits_are_reverse_and_forward_kl():
    """(1 − u^−α)/α → log u as α → 0 and → 1 − 1/u (forward KL) as α → 1."""
    r_w, r_l = [1.3, -0.4, 2.0], [-0.7, 0.2, 1.9]
    rev = by_ratios(r_w, r_l, f_divergence="reverse_kl").losses
    fwd = by_ratios(r_w, r_l, f_divergence="forward_kl").losses
    small = by_ratios(r_w, r_l, f_divergence="alpha", f_alpha=1e-7).losses
    near_one = by_ratios(r_w, r_l, f_divergence="alpha", f_alpha=1 - 1e-7).losses
    torch.testing.assert_close(small, rev, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(near_one, fwd, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- float64 brute force
def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def brute(pc, pr, rc, rr, beta, div, alpha):
    u_w, u_l = torch.exp(pc - rc), torch.exp(pr - rr)
    psi = {
        "reverse_kl": torch.log,
        "forward_kl": lambda u: -1.0 / u,
        "js": lambda u: torch.log(2 * u / (1 + u)),
        "alpha": lambda u: (1 - u ** (-alpha)) / alpha,
    }[div]
    return -torch.log(_sig(beta * (psi(u_w) - psi(u_l))))


def random_inputs(seed, batch=12, spread=4.0):
    """Log-ratios within ±spread nats, so the plain float64 formula does not overflow."""
    gen = torch.Generator().manual_seed(seed)
    pc = -20 * torch.rand(batch, generator=gen, dtype=torch.float64)
    pr = -20 * torch.rand(batch, generator=gen, dtype=torch.float64)
    rc = pc + spread * (2 * torch.rand(batch, generator=gen, dtype=torch.float64) - 1)
    rr = pr + spread * (2 * torch.rand(batch, generator=gen, dtype=torch.float64) - 1)
    return pc, pr, rc, rr


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("div", "alpha", "beta"),
    [
        ("reverse_kl", 0.5, 0.1),
        ("forward_kl", 0.5, 0.1),
        ("forward_kl", 0.5, 1.3),
        ("js", 0.5, 0.1),
        ("js", 0.5, 2.0),
        ("alpha", 0.5, 0.1),
        ("alpha", 0.1, 0.7),
        ("alpha", 0.9, 0.2),
    ],
)
def test_matches_float64_bruteforce_values_and_grads(div, alpha, beta, dtype):
    seed = int(1000 * alpha + 10 * beta) + DIVERGENCES.index(div)
    pc, pr, rc, rr = random_inputs(seed)
    ours = [x.to(dtype).requires_grad_(True) for x in (pc, pr, rc, rr)]
    theirs = [x.clone().requires_grad_(True) for x in (pc, pr, rc, rr)]
    out = fdpo(*ours, beta=beta, f_divergence=div, f_alpha=alpha)
    want = brute(*theirs, beta, div, alpha)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert out.losses.dtype == dtype
    torch.testing.assert_close(out.losses.double(), want.detach(), **tol)
    w = torch.randn(len(pc), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got_g = torch.autograd.grad((out.losses.double() * w).sum(), ours)
    want_g = torch.autograd.grad((want * w).sum(), theirs)
    for g, e in zip(got_g, want_g):
        torch.testing.assert_close(g.double(), e, **tol)


# ----------------------------------------------------------------------------- the exponent cap
def test_capped_expm1_is_exact_inside_the_cap():
    x = torch.cat(
        [torch.linspace(-1e4, EXP_CAP, 20001, dtype=torch.float64), t(EXP_CAP, 0.0, -1e-12)]
    )
    assert torch.equal(_expm1_capped(x), torch.expm1(x))
    x32 = x.float()
    assert torch.equal(_expm1_capped(x32), torch.expm1(x32))


def test_capped_expm1_beyond_the_cap_is_linear_finite_and_increasing():
    x = t(EXP_CAP, EXP_CAP + 1, 1e3, 1e4).requires_grad_(True)
    y = _expm1_capped(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and bool((y[1:] > y[:-1]).all())
    assert y[1].item() == pytest.approx(math.expm1(EXP_CAP) + math.exp(EXP_CAP), rel=1e-12)
    torch.testing.assert_close(g[1:], torch.full((3,), math.exp(EXP_CAP), dtype=torch.float64))


@pytest.mark.parametrize(("div", "alpha"), [("forward_kl", 0.5), ("alpha", 0.5)])
def test_cap_does_not_change_values_up_to_the_bound(div, alpha):
    """Chosen log-ratios down to the bound (−r ≤ 50 for forward KL, −α r ≤ 50 for α) give the float64
    formula's values. Rewards (β = 1) are ψ(u) − ψ(1) itself, 1 − 1/u or (1 − u^−α)/α, checked to 1e-12;
    the loss is checked with β = 1e-22, which keeps β·ψ ≈ e^50·1e-22 ≈ 0.5 inside σ's useful range."""
    bound = EXP_CAP if div == "forward_kl" else EXP_CAP / alpha
    r_w = t(-bound, -0.999 * bound, -bound / 2, -1.0, -1e-6, 0.0, 3.0, 1e3)
    r_l = t(-bound, 2.0, -3.0, 0.5, -0.5, 1e-6, 1.0, -1.0)
    a = alpha if div == "alpha" else 1.0  # forward KL's ψ − ψ(1) is the α = 1 form
    want_psi = (1 - torch.exp(-a * r_w)) / a
    out = by_ratios(r_w.tolist(), r_l.tolist(), beta=1.0, f_divergence=div, f_alpha=alpha)
    torch.testing.assert_close(out.chosen_rewards, want_psi, rtol=1e-12, atol=1e-15)
    zero = torch.zeros(8, dtype=torch.float64)
    out = by_ratios(r_w.tolist(), r_l.tolist(), beta=1e-22, f_divergence=div, f_alpha=alpha)
    want = brute(r_w, r_l, zero, zero, 1e-22, div, alpha)
    torch.testing.assert_close(out.losses, want, rtol=1e-12, atol=0.0)
    assert (
        abs(out.losses[1].item() - math.log(2)) > 0.1
    )  # the entry near the bound is not a trivial log 2


# ----------------------------------------------------------------------------- finiteness
EXTREMES = [-1e4, -1e3, -1.0, -1e-9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("div", "alpha"), [("forward_kl", 0.5), ("js", 0.5), ("alpha", 0.1), ("alpha", 0.9)]
)
def test_finite_values_and_grads_at_extremes(div, alpha, dtype):
    """Every combination of log-probs in {−1e4, −1e3, −1, −1e-9} for the four inputs (log-ratios and
    margins up to ±1e4, including ±1e3), plus empty responses."""
    grid = torch.cartesian_prod(*[torch.tensor(EXTREMES, dtype=dtype)] * 4)
    grid = torch.cat([grid, torch.zeros(2, 4, dtype=dtype)])
    x = [grid[:, i].clone().requires_grad_(True) for i in range(4)]
    tokens = ones(grid.shape[0])
    out = compute_loss(
        "f_dpo", *x, chosen_tokens=tokens, rejected_tokens=tokens, f_divergence=div, f_alpha=alpha
    )
    total = out.reduce()
    assert torch.isfinite(out.losses).all() and torch.isfinite(total)
    assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all()
    for g in torch.autograd.grad(total, x, retain_graph=True):
        assert torch.isfinite(g).all()
    # The policy's chosen log-prob never has a gradient pointing the wrong way (loss falls as it rises).
    assert bool((torch.autograd.grad(out.losses.sum(), x[0])[0] <= 0).all())


# ----------------------------------------------------------------------------- errors
def test_unknown_divergence_names_the_choices():
    with pytest.raises(ValueError, match=r"f_divergence.*reverse_kl, forward_kl, js, alpha.*'kl'"):
        by_ratios([0.0], [0.0], f_divergence="kl")
    with pytest.raises(ValueError, match=r"did you mean 'js'"):
        by_ratios([0.0], [0.0], f_divergence="jss")
    with pytest.raises(ValueError, match=r"f_divergence.*one of"):
        by_ratios([0.0], [0.0], f_divergence=1.0)
    with pytest.raises(ValueError, match=r"f_alpha must be in \(0, 1\)"):
        by_ratios([0.0], [0.0], f_divergence="alpha", f_alpha=1.0)
    with pytest.raises(ValueError, match="f_alpha"):
        by_ratios([0.0], [0.0], f_divergence="alpha", f_alpha="half")
    # The function validates on its own too (called without compute_loss).
    with pytest.raises(ValueError, match="reverse_kl, forward_kl, js, alpha"):
        LOSSES["f_dpo"].fn(
            t(0.0),
            t(0.0),
            t(0.0),
            t(0.0),
            chosen_tokens=ones(1),
            rejected_tokens=ones(1),
            f_divergence="tv",
        )
