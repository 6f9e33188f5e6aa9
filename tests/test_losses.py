"""Tests for preftune.losses.

Expected values come from arithmetic written in each test's docstring (evaluated with ``math``) or from
float64 brute-force formulas written here in the plain, unstable-but-fine-in-float64 form
(``log(1 / (1 + exp(-x)))``), never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import LOSSES, LossOutput, LossSpec, compute_loss

LN2, LN3 = math.log(2.0), math.log(3.0)
FORMULAS_NAMES = [
    "sigmoid",
    "cdpo",
    "robust",
    "hinge",
    "ipo",
    "simpo",
    "orpo",
    "bco_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "exo_pair",
    "discopop",
    "sft",
    "nll",
]
REFERENCE_FREE = {"simpo", "orpo", "sft", "nll"}


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def n(*values):
    return torch.tensor(values, dtype=torch.int64)


def run(name, pc, pr, rc=None, rr=None, nc=None, nr=None, **hp):
    """compute_loss on scalars (B = 1) or tuples; token counts default to 1."""

    def vec(x):
        return None if x is None else t(*(x if isinstance(x, tuple) else (x,)))

    pc, pr, rc, rr = vec(pc), vec(pr), vec(rc), vec(rr)
    nc = n(*([1] * len(pc))) if nc is None else n(*(nc if isinstance(nc, tuple) else (nc,)))
    nr = n(*([1] * len(pc))) if nr is None else n(*(nr if isinstance(nr, tuple) else (nr,)))
    return compute_loss(name, pc, pr, rc, rr, chosen_tokens=nc, rejected_tokens=nr, **hp)


def approx(x):
    return pytest.approx(x, rel=1e-5, abs=1e-6)


# Pair A: r_w = ln 3, r_l = 0, so h = ln 3 and with β = 1: σ(βh) = 3/4, σ(−βh) = 1/4.
A = {"pc": -1.0, "rc": -1.0 - LN3, "pr": -2.0, "rr": -2.0}
# Pair B: r_w = ln 3, r_l = −ln 3, so σ(r_w) = 3/4, σ(−r_l) = 3/4, h = 2 ln 3, σ(h) = 9/10.
B = {"pc": -1.0, "rc": -1.0 - LN3, "pr": -2.0 - LN3, "rr": -2.0}


# ----------------------------------------------------------------------------- hand-computed cases
def test_sigmoid_by_hand():
    """β = 1, pair A (h = ln 3): −log σ(ln 3) = −log(3/4) = log(4/3) ≈ 0.28768.
    Rewards: β·r_w = ln 3, β·r_l = 0."""
    out = run("sigmoid", **A, beta=1.0)
    assert out.losses.item() == approx(math.log(4 / 3))
    assert out.chosen_rewards.item() == approx(LN3) and out.rejected_rewards.item() == approx(0.0)
    assert out.token_losses.item() == 0.0


def test_cdpo_by_hand():
    """β = 1, ε = 0.25, pair A: −0.75·log(3/4) − 0.25·log(1/4) = 0.75·log(4/3) + 0.25·log 4."""
    out = run("cdpo", **A, beta=1.0, label_smoothing=0.25)
    assert out.losses.item() == approx(0.75 * math.log(4 / 3) + 0.25 * math.log(4))


def test_robust_by_hand():
    """β = 1, ε = 0.25, pair A: [−0.75·log(3/4) + 0.25·log(1/4)] / (1 − 0.5)
    = 1.5·log(4/3) − 0.5·log 4 ≈ −0.2616 (rDPO may be negative)."""
    out = run("robust", **A, beta=1.0, label_smoothing=0.25)
    assert out.losses.item() == approx(1.5 * math.log(4 / 3) - 0.5 * math.log(4))


def test_hinge_by_hand():
    """Pair A, h = ln 3 ≈ 1.0986. β = 0.5: max(0, 1 − 0.5·ln 3) = 1 − 0.5493 = 0.4507.
    β = 1: 1 − ln 3 < 0, so the loss is 0."""
    assert run("hinge", **A, beta=0.5).losses.item() == approx(1 - 0.5 * LN3)
    assert run("hinge", **A, beta=1.0).losses.item() == 0.0


def test_ipo_by_hand():
    """β = 0.25 → 1/(2β) = 2. r_w = 3 over n_w = 2 tokens, r_l = 2 over n_l = 4:
    averaged ratios 1.5 and 0.5, difference 1; loss (1 − 2)² = 1. Rewards use sums: 0.75 and 0.5."""
    out = run("ipo", pc=-1.0, rc=-4.0, pr=-3.0, rr=-5.0, nc=2, nr=4, beta=0.25)
    assert out.losses.item() == approx(1.0)
    assert out.chosen_rewards.item() == approx(0.75) and out.rejected_rewards.item() == approx(0.5)


def test_sigmoid_norm_by_hand():
    """β = 1. r_w = 2 ln 3 over n_w = 2 tokens → ln 3 per token; r_l = 3 ln 2 over n_l = 3 → ln 2 per token.
    Margin ln 3 − ln 2 = ln 1.5, σ(ln 1.5) = 1.5/2.5 = 0.6, loss −log 0.6 = log(5/3) ≈ 0.5108.
    (Summed DPO would see h = 2 ln 3 − 3 ln 2 = ln(9/8).) Rewards are per token: β·r/n = ln 3 and ln 2."""
    out = run(
        "sigmoid_norm", pc=-1.0, rc=-1.0 - 2 * LN3, pr=-2.0, rr=-2.0 - 3 * LN2, nc=2, nr=3, beta=1.0
    )
    assert out.losses.item() == approx(math.log(5 / 3))
    assert out.chosen_rewards.item() == approx(LN3) and out.rejected_rewards.item() == approx(LN2)
    dpo = run(
        "sigmoid", pc=-1.0, rc=-1.0 - 2 * LN3, pr=-2.0, rr=-2.0 - 3 * LN2, nc=2, nr=3, beta=1.0
    )
    assert dpo.losses.item() == approx(-math.log(1 / (1 + 8 / 9)))  # −log σ(ln(9/8)): not the same


def test_sigmoid_norm_is_sigmoid_on_single_tokens_and_length_invariant():
    """n = 1 everywhere: averaged = summed ratios, so sigmoid_norm == sigmoid. Scaling each response's
    log-probs (policy and reference) and its length by k keeps r/n, hence the loss."""
    pc, pr, rc, rr, _, _ = random_inputs(5)
    ones = torch.ones_like(pc, dtype=torch.int64)
    a = compute_loss(
        "sigmoid_norm", pc, pr, rc, rr, chosen_tokens=ones, rejected_tokens=ones, beta=0.3
    )
    b = compute_loss("sigmoid", pc, pr, rc, rr, chosen_tokens=ones, rejected_tokens=ones, beta=0.3)
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-12, atol=1e-12)
    _, _, _, _, nc, nr = random_inputs(6)
    base = compute_loss("sigmoid_norm", pc, pr, rc, rr, chosen_tokens=nc, rejected_tokens=nr)
    scaled = compute_loss(
        "sigmoid_norm", 7 * pc, 7 * pr, 7 * rc, 7 * rr, chosen_tokens=7 * nc, rejected_tokens=7 * nr
    )
    torch.testing.assert_close(scaled.losses, base.losses, rtol=1e-12, atol=1e-12)


def test_simpo_by_hand():
    """β = 2, γ/β = 0.5 → γ = 1. logp_w = −4 over 4 tokens → ā_w = −1; logp_l = −9 over 3 → ā_l = −3.
    z = 2·(−1 − (−3)) − 1 = 3; loss = −log σ(3) = log(1 + e^−3) ≈ 0.04859. Rewards β·ā = −2, −6."""
    out = run("simpo", pc=-4.0, pr=-9.0, nc=4, nr=3, beta=2.0, gamma_beta_ratio=0.5)
    assert out.losses.item() == approx(math.log(1 + math.exp(-3)))
    assert out.chosen_rewards.item() == approx(-2.0) and out.rejected_rewards.item() == approx(-6.0)


def test_orpo_by_hand():
    """logp_w = −2 ln 2 over 2 tokens → ā_w = −ln 2, p_w = 1/2, odds 1.
    logp_l = −3 ln 4 over 3 tokens → ā_l = −ln 4, p_l = 1/4, odds 1/3.
    log_odds = log(1 / (1/3)) = ln 3; σ(ln 3) = 3/4; odds-ratio term λ·log(4/3) with λ = 0.1.
    NLL: token_losses = 2 ln 2 (sum), so reduce() = 0.1·log(4/3) + 2 ln 2 / 2 = 0.1·log(4/3) + ln 2.
    Rewards β·ā with β = 0.1: −0.1 ln 2 and −0.1 ln 4."""
    out = run("orpo", pc=-2 * LN2, pr=-3 * math.log(4), nc=2, nr=3, orpo_lambda=0.1, beta=0.1)
    assert out.losses.item() == approx(0.1 * math.log(4 / 3))
    assert out.token_losses.item() == approx(2 * LN2)
    assert out.reduce().item() == approx(0.1 * math.log(4 / 3) + LN2)
    assert out.chosen_rewards.item() == approx(-0.1 * LN2)
    assert out.rejected_rewards.item() == approx(-0.1 * math.log(4))


def test_bco_pair_by_hand():
    """β = 1, pair B: −log σ(ln 3) − log σ(ln 3) = 2·log(4/3)."""
    assert run("bco_pair", **B, beta=1.0).losses.item() == approx(2 * math.log(4 / 3))


def test_nca_pair_by_hand():
    """β = 1, pair B: −log σ(ln 3) − ½ log σ(−ln 3) − ½ log σ(ln 3)
    = log(4/3) + ½ log 4 + ½ log(4/3) = 1.5·log(4/3) + ln 2."""
    assert run("nca_pair", **B, beta=1.0).losses.item() == approx(1.5 * math.log(4 / 3) + LN2)


def test_sppo_hard_by_hand():
    """β = 0.5 → 1/(2β) = 1. r_w = 3, r_l = −2: (3 − 1)² + (−2 + 1)² = 4 + 1 = 5."""
    out = run("sppo_hard", pc=-1.0, rc=-4.0, pr=-4.0, rr=-2.0, beta=0.5)
    assert out.losses.item() == approx(5.0)


def test_apo_zero_by_hand():
    """β = 1, pair B: (1 − σ(ln 3)) + σ(−ln 3) = 1/4 + 1/4 = 1/2."""
    assert run("apo_zero", **B, beta=1.0).losses.item() == approx(0.5)


def test_apo_down_by_hand():
    """β = 1, pair B: σ(ln 3) + (1 − σ(2 ln 3)) = 3/4 + (1 − 9/10) = 0.85."""
    assert run("apo_down", **B, beta=1.0).losses.item() == approx(0.85)


def test_exo_pair_by_hand():
    """β = 1, pair A: σ(βh) = 3/4.
    ε = 1/4: (3/4)(log 3/4 − log 3/4) + (1/4)(log 1/4 − log 1/4) = 0 (the target is reached).
    ε = 1/2: (3/4)·log(3/4 / 1/2) + (1/4)·log(1/4 / 1/2) = 0.75·log 1.5 + 0.25·log 0.5 ≈ 0.13081."""
    assert run("exo_pair", **A, beta=1.0, exo_epsilon=0.25).losses.item() == approx(0.0)
    out = run("exo_pair", **A, beta=1.0, exo_epsilon=0.5)
    assert out.losses.item() == approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))


def test_discopop_by_hand():
    """β = 1, τ = 1, pair A: z = ln 3, m = σ(z/τ) = 3/4.
    (1 − m)·(−log σ(z)) + m·e^−z = (1/4)·log(4/3) + (3/4)·(1/3) = 0.25·log(4/3) + 0.25."""
    out = run("discopop", **A, beta=1.0, discopop_tau=1.0)
    assert out.losses.item() == approx(0.25 * math.log(4 / 3) + 0.25)


def test_sft_by_hand():
    """logp_w = −6 over 3 tokens: token_losses = 6, losses = 0, reduce() = 6/3 = 2.
    Without a reference the rewards are the averages ā: −6/3 = −2 and (logp_l = −8, n_l = 4) −8/4 = −2.
    With a reference and β = 0.5: 0.5·(−6 − (−7)) = 0.5 and 0.5·(−8 − (−5)) = −1.5."""
    out = run("sft", pc=-6.0, pr=-8.0, nc=3, nr=4)
    assert out.token_losses.item() == approx(6.0) and out.losses.item() == 0.0
    assert out.reduce().item() == approx(2.0)
    assert out.chosen_rewards.item() == approx(-2.0) and out.rejected_rewards.item() == approx(-2.0)
    with_ref = run("sft", pc=-6.0, pr=-8.0, rc=-7.0, rr=-5.0, nc=3, nr=4, beta=0.5)
    assert with_ref.chosen_rewards.item() == approx(0.5)  # 0.5·(−6 − (−7))
    assert with_ref.rejected_rewards.item() == approx(-1.5)  # 0.5·(−8 − (−5))


def test_weighted_combination_sigmoid_plus_sft_by_hand():
    """RPO = sigmoid + 0.2·sft, β = 1, two pairs.
    Pair 1: h = ln 3 (pair A, logp_w = −1 over 1 token); pair 2: h = 0 (all log-probs −3; 3 chosen tokens).
    Pair terms: log(4/3) and log 2 → mean (log(4/3) + log 2) / 2.
    Token term: 0.2·(1 + 3) NLL over 1 + 3 = 4 chosen tokens = 0.2.
    Total = (log(4/3) + log 2)/2 + 0.2. Rewards come from sigmoid: β·r_w = (ln 3, 0)."""
    out = run(
        ["sigmoid", "sft"],
        pc=(-1.0, -3.0),
        rc=(-1.0 - LN3, -3.0),
        pr=(-2.0, -3.0),
        rr=(-2.0, -3.0),
        nc=(1, 3),
        nr=(2, 2),
        weights=[1.0, 0.2],
        beta=1.0,
    )
    assert out.reduce().item() == approx((math.log(4 / 3) + LN2) / 2 + 0.2)
    assert out.chosen_rewards.tolist() == [approx(LN3), approx(0.0)]
    # Window totals: 4 pairs and 10 tokens in the accumulation window.
    expected = (math.log(4 / 3) + LN2) / 4 + 0.2 * 4 / 10
    assert out.reduce(num_pairs=4, num_tokens=10).item() == approx(expected)
    # Rewards come from the first term that defines them (not sft), whatever the order: in
    # [sft, simpo] they are simpo's β·ā = 2·(−4/4) = −2, not sft's unscaled ā = −1.
    swapped = run(["sft", "simpo"], pc=-4.0, pr=-9.0, nc=4, nr=3, weights=[0.2, 1.0], beta=2.0)
    assert swapped.chosen_rewards.item() == approx(-2.0)
    assert swapped.rejected_rewards.item() == approx(-6.0)


# ----------------------------------------------------------------------------- float64 brute force
def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def brute(name, pc, pr, rc, rr, nc, nr, hp):
    """(pair losses, token losses) in the plain float64 form of docs/FORMULAS.md."""
    beta = hp["beta"]
    nc, nr = nc.clamp(min=1).double(), nr.clamp(min=1).double()
    zero = torch.zeros_like(pc)
    if name in ("sft", "nll"):
        return zero, -pc
    if name == "simpo":
        gamma = hp["gamma_beta_ratio"] * beta
        return -torch.log(_sig(beta * (pc / nc - pr / nr) - gamma)), zero
    if name == "orpo":
        pw, pl = torch.exp(pc / nc), torch.exp(pr / nr)
        log_odds = torch.log(pw / (1 - pw)) - torch.log(pl / (1 - pl))
        return hp["orpo_lambda"] * -torch.log(_sig(log_odds)), -pc
    rw, rl = pc - rc, pr - rr
    h = rw - rl
    if name == "sigmoid":
        return -torch.log(_sig(beta * h)), zero
    if name == "cdpo":
        e = hp["label_smoothing"]
        return -(1 - e) * torch.log(_sig(beta * h)) - e * torch.log(_sig(-beta * h)), zero
    if name == "robust":
        e = hp["label_smoothing"]
        num = -(1 - e) * torch.log(_sig(beta * h)) + e * torch.log(_sig(-beta * h))
        return num / (1 - 2 * e), zero
    if name == "hinge":
        return torch.clamp(1 - beta * h, min=0), zero
    if name == "ipo":
        return (rw / nc - rl / nr - 1 / (2 * beta)) ** 2, zero
    if name == "bco_pair":
        return -torch.log(_sig(beta * rw)) - torch.log(_sig(-beta * rl)), zero
    if name == "nca_pair":
        loss = (
            -torch.log(_sig(beta * rw))
            - 0.5 * torch.log(_sig(-beta * rw))
            - 0.5 * torch.log(_sig(-beta * rl))
        )
        return loss, zero
    if name == "sppo_hard":
        return (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2, zero
    if name == "apo_zero":
        return (1 - _sig(beta * rw)) + _sig(beta * rl), zero
    if name == "apo_down":
        return _sig(beta * rw) + (1 - _sig(beta * h)), zero
    if name == "exo_pair":
        e, s = hp["exo_epsilon"], _sig(beta * h)
        return s * (torch.log(s) - math.log(1 - e)) + (1 - s) * (
            torch.log(1 - s) - math.log(e)
        ), zero
    if name == "discopop":
        z, tau = beta * h, hp["discopop_tau"]
        m = _sig(z / tau)
        return (1 - m) * -torch.log(_sig(z)) + m * torch.exp(-z), zero
    if name == "sigmoid_norm":
        return -torch.log(_sig(beta * (rw / nc - rl / nr))), zero
    if name == "f_dpo":
        div, a = hp["f_divergence"], hp["f_alpha"]
        psi = {
            "reverse_kl": lambda r: r,
            "forward_kl": lambda r: -1 / torch.exp(r),
            "js": lambda r: torch.log(2 * torch.exp(r) / (1 + torch.exp(r))),
            "alpha": lambda r: (1 - torch.exp(r) ** -a) / a,
        }[div]
        return -torch.log(_sig(beta * (psi(rw) - psi(rl)))), zero
    if name in ("aot", "aot_unpaired"):
        e = hp["label_smoothing"]
        if name == "aot":
            delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        else:
            delta = torch.sort(rw).values - torch.sort(rl).values
        return -(1 - e) * torch.log(_sig(beta * delta)) - e * torch.log(_sig(-beta * delta)), zero
    raise AssertionError(f"no brute force for {name}")


def random_inputs(seed, batch=8):
    gen = torch.Generator().manual_seed(seed)
    nc = torch.randint(1, 12, (batch,), generator=gen)
    nr = torch.randint(1, 12, (batch,), generator=gen)
    # average log-probs in (-3, -0.05) so ORPO's odds are well defined; refs within ±15 nats.
    pc = -(0.05 + 2.95 * torch.rand(batch, generator=gen, dtype=torch.float64)) * nc
    pr = -(0.05 + 2.95 * torch.rand(batch, generator=gen, dtype=torch.float64)) * nr
    rc = pc + 15 * (2 * torch.rand(batch, generator=gen, dtype=torch.float64) - 1)
    rr = pr + 15 * (2 * torch.rand(batch, generator=gen, dtype=torch.float64) - 1)
    return pc, pr, rc, rr, nc, nr


def _values_and_grads(losses, token_losses, inputs, seed):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(losses.shape, generator=gen, dtype=torch.float64)
    v = torch.randn(losses.shape, generator=gen, dtype=torch.float64)
    total = (losses.double() * u).sum() + (token_losses.double() * v).sum()
    gs = torch.autograd.grad(total, inputs, allow_unused=True)
    return [
        torch.zeros_like(x, dtype=torch.float64) if g is None else g.double()
        for x, g in zip(inputs, gs)
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matches_float64_bruteforce_values_and_grads(name, dtype):
    spec = LOSSES[name]
    scaled = {k: v if isinstance(v, str) else v * 1.7 for k, v in spec.defaults.items()}
    for seed, hp in [(0, dict(spec.defaults)), (1, scaled)]:
        if name in ("aot", "aot_unpaired") and seed == 1:
            hp["label_smoothing"] = 0.2  # default 0 scales to 0
        if name == "hinge":
            hp["beta"] = 0.03  # keep most pairs on the non-flat side of the hinge
        pc, pr, rc, rr, nc, nr = random_inputs(seed)
        ours = [x.to(dtype).requires_grad_(True) for x in (pc, pr, rc, rr)]
        theirs = [x.clone().requires_grad_(True) for x in (pc, pr, rc, rr)]
        out = compute_loss(name, *ours, chosen_tokens=nc, rejected_tokens=nr, **hp)
        want_l, want_t = brute(name, *theirs, nc, nr, hp)
        tol = (
            {"rtol": 1e-10, "atol": 1e-10}
            if dtype == torch.float64
            else {"rtol": 1e-4, "atol": 1e-5}
        )
        assert out.losses.dtype == dtype
        torch.testing.assert_close(out.losses.double(), want_l.detach(), **tol)
        torch.testing.assert_close(out.token_losses.double(), want_t.detach(), **tol)
        got_g = _values_and_grads(out.losses, out.token_losses, ours, seed)
        want_g = _values_and_grads(want_l, want_t, theirs, seed)
        for g, w in zip(got_g, want_g):
            torch.testing.assert_close(g, w, **tol)


# ----------------------------------------------------------------------------- limiting cases
@pytest.mark.parametrize("name", ["cdpo", "robust"])
def test_zero_label_smoothing_is_sigmoid(name):
    pc, pr, rc, rr, nc, nr = random_inputs(3)
    a = [x.float().requires_grad_(True) for x in (pc, pr, rc, rr)]
    b = [x.float().requires_grad_(True) for x in (pc, pr, rc, rr)]
    out = compute_loss(name, *a, chosen_tokens=nc, rejected_tokens=nr, beta=0.2, label_smoothing=0)
    ref = compute_loss("sigmoid", *b, chosen_tokens=nc, rejected_tokens=nr, beta=0.2)
    torch.testing.assert_close(out.losses, ref.losses)
    for ga, gb in zip(
        torch.autograd.grad(out.losses.sum(), a), torch.autograd.grad(ref.losses.sum(), b)
    ):
        torch.testing.assert_close(ga, gb)


def test_ipo_minimum_at_half_inverse_beta_per_token():
    """β = 0.1 → target 1/(2β) = 5 nats/token. r_w = 12 over 2 tokens (6/token), r_l = 4 over 4
    tokens (1/token): difference 5 → loss 0 and zero gradient; moving r_w either way raises it."""
    beta = 0.1

    def loss_at(r_w):
        x = [t(-10.0 + r_w), t(-3.0), t(-10.0), t(-7.0)]
        for v in x:
            v.requires_grad_(True)
        out = compute_loss(
            "ipo", *x, chosen_tokens=n(2), rejected_tokens=n(4), beta=beta
        ).losses.sum()
        return out, torch.autograd.grad(out, x)

    at_min, grads = loss_at(12.0)
    assert at_min.item() == approx(0.0)
    assert all(abs(g.item()) < 1e-5 for g in grads)
    assert loss_at(11.0)[0].item() > 0.2 and loss_at(13.0)[0].item() > 0.2


@pytest.mark.parametrize("k", [2, 7, 100])
def test_simpo_invariant_to_length_scaling(k):
    """Scaling each response's summed log-prob and its length by k keeps ā, hence the loss."""
    pc, pr, _, _, nc, nr = random_inputs(4)
    base = compute_loss("simpo", pc.float(), pr.float(), chosen_tokens=nc, rejected_tokens=nr)
    scaled = compute_loss(
        "simpo", k * pc.float(), k * pr.float(), chosen_tokens=k * nc, rejected_tokens=k * nr
    )
    torch.testing.assert_close(scaled.losses, base.losses)
    torch.testing.assert_close(scaled.chosen_rewards, base.chosen_rewards)


def test_orpo_finite_at_average_logprob_near_zero():
    pc = t(-1e-9, -5e-9, -2.0).requires_grad_(True)
    pr = t(-3.0, -1e-9, -1e-9).requires_grad_(True)
    out = compute_loss("orpo", pc, pr, chosen_tokens=n(1, 5, 1), rejected_tokens=n(2, 1, 1))
    gc, gr = torch.autograd.grad(out.reduce(), [pc, pr])
    assert (
        torch.isfinite(out.losses).all() and torch.isfinite(gc).all() and torch.isfinite(gr).all()
    )
    # Cross-check the first pair against float64 maths (ā_w = −1e-9, ā_l = −1.5).
    aw, al = -1e-9, -1.5
    log_odds = math.log(math.exp(aw) / -math.expm1(aw)) - math.log(math.exp(al) / -math.expm1(al))
    assert out.losses[0].item() == pytest.approx(0.1 * math.log1p(math.exp(-log_odds)), rel=1e-4)


EXTREMES = [-1e4, -1e3, -1.0, -1e-9]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_values_and_grads_at_extremes(name):
    """Every combination of log-probs in {−1e4, −1e3, −1, −1e-9} for the four inputs (margins up to
    ±1e4, including ±1e3), token counts 1…1000, plus empty responses (logp 0, n 0); fp32."""
    grid = torch.cartesian_prod(*[torch.tensor(EXTREMES)] * 4)  # [256, 4]
    grid = torch.cat([grid, torch.zeros(2, 4)])
    tokens = torch.tensor([1, 3, 1000, 1])[torch.arange(grid.shape[0]) % 4]
    tokens[-2:] = 0
    x = [grid[:, i].clone().requires_grad_(True) for i in range(4)]
    out = compute_loss(name, *x, chosen_tokens=tokens, rejected_tokens=tokens.flip(0))
    total = out.reduce()
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.token_losses).all()
    assert torch.isfinite(total)
    for g in torch.autograd.grad(total, x, allow_unused=True):
        assert g is None or torch.isfinite(g).all()


# ----------------------------------------------------------------------------- API and errors
def test_registry_matches_formulas():
    assert set(FORMULAS_NAMES) <= set(LOSSES)
    for name, spec in LOSSES.items():
        assert isinstance(spec, LossSpec)
        assert spec.needs_reference == (name not in REFERENCE_FREE), name
        assert spec.uses in ("sums", "averages")
        assert spec.fn.__doc__ and "Default" in spec.fn.__doc__
        assert "beta" in spec.defaults
    assert LOSSES["sigmoid"].defaults["beta"] == 0.1
    assert LOSSES["simpo"].defaults == {"beta": 2.0, "gamma_beta_ratio": 0.5}
    assert LOSSES["orpo"].defaults["orpo_lambda"] == 0.1
    assert LOSSES["cdpo"].defaults["label_smoothing"] == 0.1
    assert LOSSES["exo_pair"].defaults["exo_epsilon"] == 1e-3
    assert LOSSES["discopop"].defaults["discopop_tau"] == 0.05
    assert LOSSES["sigmoid_norm"].defaults == {"beta": 5.0}
    assert LOSSES["sigmoid_norm"].uses == "averages"
    assert LOSSES["f_dpo"].defaults["f_divergence"] == "reverse_kl"
    assert LOSSES["f_dpo"].choices["f_divergence"] == ("reverse_kl", "forward_kl", "js", "alpha")
    assert (
        LOSSES["aot"].defaults
        == LOSSES["aot_unpaired"].defaults
        == {
            "beta": 0.1,
            "label_smoothing": 0.0,
        }
    )


def test_rewards_are_detached_and_output_shapes():
    x = [t(-1.0, -2.0).requires_grad_(True) for _ in range(4)]
    out = compute_loss("sigmoid", *x, chosen_tokens=n(1, 2), rejected_tokens=n(3, 4))
    assert isinstance(out, LossOutput)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.losses.shape == out.token_losses.shape == out.chosen_rewards.shape == (2,)
    assert out.losses.requires_grad


def test_reference_free_losses_run_without_reference():
    for name in ("simpo", "orpo", "sft"):
        out = run(name, pc=-2.0, pr=-3.0)
        assert torch.isfinite(out.reduce())


def test_error_unknown_hyperparameter_suggests_closest():
    with pytest.raises(ValueError, match=r"'betta'.*did you mean 'beta'"):
        run("sigmoid", **A, betta=0.1)
    with pytest.raises(ValueError, match=r"'gamma_beta_ratio'.*simpo"):
        run("sigmoid", **A, gamma_beta_ratio=0.5)
    with pytest.raises(ValueError, match=r"did you mean 'label_smoothing'"):
        run("cdpo", **A, label_smooth=0.1)


def test_error_unknown_loss_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown loss 'sigmod'.*did you mean 'sigmoid'"):
        run("sigmod", **A)
    with pytest.raises(ValueError, match=r"did you mean 'simpo'"):
        run(["simpo_", "sft"], **A)


def test_error_missing_reference_names_the_loss():
    with pytest.raises(ValueError, match=r"'ipo' needs reference"):
        run("ipo", pc=-1.0, pr=-2.0)
    with pytest.raises(ValueError, match=r"'sigmoid' needs reference"):
        run(["sft", "sigmoid"], pc=-1.0, pr=-2.0, weights=[0.2, 1.0])
    with pytest.raises(ValueError, match="both"):
        run("sigmoid", pc=-1.0, pr=-2.0, rc=-1.0)


def test_error_bad_weights_and_ranges():
    with pytest.raises(ValueError, match="2 losses"):
        run(["sigmoid", "sft"], **A, weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        run(["sigmoid", "sft"], **A, weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="beta"):
        run("sigmoid", **A, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        run("robust", **A, label_smoothing=0.5)
    with pytest.raises(ValueError, match="exo_epsilon"):
        run("exo_pair", **A, exo_epsilon=1.0)
    with pytest.raises(ValueError, match="discopop_tau"):
        run("discopop", **A, discopop_tau=-1.0)
    with pytest.raises(ValueError, match=r"\[B\]"):
        compute_loss("simpo", t(-1.0, -2.0), t(-1.0), chosen_tokens=n(1), rejected_tokens=n(1))
