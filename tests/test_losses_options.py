"""Tests for preftune.losses.options: WPO pair weights (Zhou et al. 2024, arXiv 2406.11827) and LD-DPO
log-probs (Liu et al. 2024, arXiv 2409.06411).

Expected values come from arithmetic in the docstrings or from plain float64 formulas written here (products
of per-token probabilities, explicit loops over tokens), never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import compute_loss, ld_logps, ld_split, public_tokens, wpo_weights

LN2 = math.log(2.0)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def n(*values):
    return torch.tensor(values, dtype=torch.int64)


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------- WPO
def test_wpo_weights_by_hand():
    """Chosen: logp = −2 ln 2 over 2 tokens → per-token probability e^(−ln 2) = 1/2.
    Rejected: logp = −3 ln 4 over 3 tokens → 1/4. Pair weight 1/2 · 1/4 = 1/8.
    Sampled alignment: each token divided by Σ_v π(v)²; with log Σπ² = −ln 2 at every chosen token (sum
    −2 ln 2) and −ln 2 at every rejected token (sum −3 ln 2): chosen (1/2)/(1/2) = 1, rejected
    (1/4)/(1/2) = 1/2, pair weight 1/2."""
    pc, pr, nc, nr = t(-2 * LN2), t(-3 * math.log(4)), n(2), n(3)
    assert wpo_weights(pc, pr, nc, nr).item() == approx(1 / 8)
    aligned = wpo_weights(pc, pr, nc, nr, t(-2 * LN2), t(-3 * LN2))
    assert aligned.item() == approx(1 / 2)


def test_wpo_weights_are_detached():
    pc, pr = t(-2.0, -3.0).requires_grad_(True), t(-1.0, -5.0).requires_grad_(True)
    w = wpo_weights(pc, pr, n(2, 3), n(1, 4))
    assert not w.requires_grad
    out = compute_loss(
        "sigmoid",
        pc,
        pr,
        t(-2.5, -3.0),
        t(-1.0, -4.0),
        chosen_tokens=n(2, 3),
        rejected_tokens=n(1, 4),
    )
    assert out.reduce(weights=w).requires_grad  # the loss still has its gradient


def _token_data(seed, rows=6, length=9, vocab=11):
    """Random logits, labels and a response mask (with prompt and padding positions) per row."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(rows, length, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows, length), generator=gen)
    starts = torch.randint(0, 3, (rows,), generator=gen)
    ends = torch.randint(4, length + 1, (rows,), generator=gen)
    pos = torch.arange(length)
    mask = (pos >= starts[:, None]) & (pos < ends[:, None])
    mask[0] = False  # an empty response
    return logits, labels, mask


def test_wpo_weights_from_model_quantities_match_the_paper_product():
    """The model layer supplies Σ_t log π(y_t) and Σ_t log Σ_v π(v)² over response tokens; the weight must
    equal the paper's per-token product Π_t (π(y_t) / Σ_v π(v)²)^(1/n), computed here in plain float64
    probabilities, with the product over no token = 1 for an empty response. Rows 0-2 are chosen, 3-5
    rejected."""
    logits, labels, mask = _token_data(0)
    logp = torch.log_softmax(logits, -1)
    tok = logp.gather(-1, labels[..., None])[..., 0]
    collision = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)  # log Σ π²
    sums = (tok * mask).sum(-1)
    coll = (collision * mask).sum(-1)
    counts = mask.sum(-1)
    got = wpo_weights(sums[:3], sums[3:], counts[:3], counts[3:], coll[:3], coll[3:])
    probs = torch.softmax(logits, -1)
    want = []
    for i in range(3):
        w = 1.0
        for row in (i, i + 3):
            k = int(mask[row].sum())
            f = 1.0
            for j in torch.nonzero(mask[row])[:, 0].tolist():
                f *= (probs[row, j, labels[row, j]] / (probs[row, j] ** 2).sum()).item()
            w *= f ** (1 / k) if k else 1.0
        want.append(w)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    plain = wpo_weights(sums[:3], sums[3:], counts[:3], counts[3:])
    want_plain = torch.exp(sums[:3] / counts[:3].clamp(min=1)) * torch.exp(
        sums[3:] / counts[3:].clamp(min=1)
    )
    torch.testing.assert_close(plain, want_plain, rtol=1e-12, atol=1e-15)


def test_wpo_weighted_reduction():
    """reduce(weights=w) is Σ w·loss / N: with w = (1/8, 1/2) and h = (0, 0), β = 1: (1/8 + 1/2)·log 2 / 2."""
    z = t(-1.0, -1.0)
    out = compute_loss(
        "sigmoid", z, z, z, z, chosen_tokens=n(1, 1), rejected_tokens=n(1, 1), beta=1.0
    )
    assert out.reduce(weights=t(1 / 8, 1 / 2)).item() == approx((1 / 8 + 1 / 2) * LN2 / 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wpo_weights_finite_at_extremes(dtype):
    """Log-probs −1e4…−1e-9, token counts 0…1000, log Σπ² from log(1/V) (V = 256k) down to 0."""
    grid = torch.cartesian_prod(*[torch.tensor([-1e4, -1e3, -1.0, -1e-9, 0.0], dtype=dtype)] * 2)
    counts = torch.tensor([0, 1, 3, 1000, 1])[torch.arange(grid.shape[0]) % 5]
    for c in (None, torch.full_like(grid[:, 0], -math.log(256_000)), torch.zeros_like(grid[:, 0])):
        w = wpo_weights(grid[:, 0], grid[:, 1], counts, counts.flip(0), c, c)
        assert torch.isfinite(w).all() and bool((w >= 0).all())
        assert bool((w <= 256_000.0**2 * (1 + 1e-5)).all())


def test_wpo_error_one_collision_only():
    with pytest.raises(ValueError, match="both"):
        wpo_weights(t(-1.0), t(-1.0), n(1), n(1), chosen_log_collision=t(-1.0))


# ----------------------------------------------------------------------------- LD-DPO
def test_ld_split_and_logps_by_hand():
    """Row 0 (the longer response, 4 tokens) after a 1-token prompt, then padding:
        token log-probs [−9 (prompt), −1, −2, −3, −4, 0 (pad)], ℓ_s = 2 (the shorter response's length)
        prefix = −1 − 2 = −3, tail = −3 − 4 = −7; α = 0.5: −3 + 0.5·(−7) = −6.5; α = 1: −10; α = 0: −3.
    Row 1 (the shorter response, 2 tokens) after a 3-position prompt: [0, 0, −5 (prompt), −6, −7, 0 (pad)]:
        prefix = −6 − 7 = −13, tail = 0 (positions are counted from the response's first token)."""
    token_logps = t(-9.0, -1.0, -2.0, -3.0, -4.0, 0.0, 0.0, 0.0, -5.0, -6.0, -7.0, 0.0).reshape(
        2, 6
    )
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    public = public_tokens(n(4), n(2))
    assert public.tolist() == [2]
    prefix, tail = ld_split(token_logps, mask, public.repeat(2))
    assert prefix.tolist() == [-3.0, -13.0] and tail.tolist() == [-7.0, 0.0]
    assert ld_logps(prefix, tail, 0.5).tolist() == [-6.5, -13.0]
    assert ld_logps(prefix, tail, 1.0).tolist() == [-10.0, -13.0]
    assert ld_logps(prefix, tail, 0.0).tolist() == [-3.0, -13.0]


def test_ld_split_parts_add_up_and_gradients_are_one_and_alpha():
    """prefix + tail = the masked sum; d ld_logps / d token = 1 on the first ℓ_s response tokens, α on the
    rest of the response, 0 on prompt and padding (explicit loop over positions)."""
    logits, labels, mask = _token_data(1)
    tok = (
        torch.log_softmax(logits, -1)
        .gather(-1, labels[..., None])[..., 0]
        .detach()
        .requires_grad_(True)
    )
    counts = mask.sum(-1)
    public = public_tokens(counts[:3], counts[3:]).repeat(2)
    prefix, tail = ld_split(tok, mask, public)
    torch.testing.assert_close(prefix + tail, (tok * mask).sum(-1), rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(ld_logps(prefix, tail, 0.3).sum(), [tok])
    for row in range(6):
        seen = 0
        for j in range(mask.shape[1]):
            if not mask[row, j]:
                want = 0.0
            else:
                seen += 1
                want = 1.0 if seen <= public[row] else 0.3
            assert g[row, j].item() == approx(want), (row, j)
    assert bool(
        (tail[:3] == 0).logical_or(tail[3:] == 0).all()
    )  # the shorter of each pair has no tail


def test_ld_logps_error_alpha_out_of_range():
    with pytest.raises(ValueError, match=r"ld_alpha must be in \[0, 1\]"):
        ld_logps(t(-1.0), t(-1.0), 1.5)
