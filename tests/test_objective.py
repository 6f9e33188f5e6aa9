"""preftune.objective: the one place a micro-batch's log-probs become its share of the window loss —
LD-DPO and WPO applied as the papers define them, the router term weighted by the micro-batch's pairs."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from preftune.losses import compute_loss
from preftune.model import SequenceLogps
from preftune.model.batches import PairBatch
from preftune.objective import Objective
from preftune.reference import ReferenceLogps

T = torch.tensor


def _batch(weights) -> PairBatch:
    return PairBatch(weights=T(weights), index=torch.arange(len(weights)))


def _pol(**over) -> SequenceLogps:
    """Two pairs: chosen 4 and 2 tokens, rejected 2 and 3 tokens (ℓ_s = 2, 2)."""
    fields = dict(
        chosen_logps=T([-6.0, -2.0], dtype=torch.float64),
        rejected_logps=T([-3.0, -5.0], dtype=torch.float64),
        chosen_tokens=T([4, 2]),
        rejected_tokens=T([2, 3]),
        chosen_prefix_logps=T([-2.5, -2.0], dtype=torch.float64),
        rejected_prefix_logps=T([-3.0, -4.0], dtype=torch.float64),
    )
    fields.update(over)
    return SequenceLogps(**fields)


SIGMOID = functools.partial(compute_loss, "sigmoid", beta=0.5)


def test_ld_alpha_one_is_plain_dpo_and_alpha_half_matches_the_hand_value():
    """Pair 0 (policy): chosen 4 tokens = prefix −2.5 + tail −3.5; rejected 2 tokens (no tail).
    With α = 0.5: chosen −2.5 + 0.5·(−3.5) = −4.25. Reference: all log-probs −1 per token except
    prefixes given as −2 (chosen: −2 + 0.5·(−2) = −3; rejected −2). h = (−4.25 − (−3)) − (−3 − (−2)) = −0.25,
    loss = −log σ(0.5 · −0.25) = log(1 + e^{0.125})."""
    pol = _pol()
    ref = ReferenceLogps(
        T([-4.0, -2.0], dtype=torch.float64),
        T([-2.0, -3.0], dtype=torch.float64),
        T([-2.0, -2.0], dtype=torch.float64),
        T([-2.0, -2.0], dtype=torch.float64),
    )
    batch = _batch([1.0, 0.0])  # only pair 0 counts
    plain, _ = Objective(SIGMOID)(pol, ref, batch, 1.0, 1.0)
    same, _ = Objective(SIGMOID, ld_alpha=1.0)(pol, ref, batch, 1.0, 1.0)
    assert float(same) == pytest.approx(float(plain), abs=1e-12)
    half, _ = Objective(SIGMOID, ld_alpha=0.5)(pol, ref, batch, 1.0, 1.0)
    assert float(half) == pytest.approx(math.log1p(math.exp(0.125)), abs=1e-12)


def test_ld_at_the_reference_starts_at_ln2():
    """Applied to policy and reference alike, LD-DPO's log-ratios are 0 at θ₀."""
    pol = _pol()
    ref = ReferenceLogps(
        pol.chosen_logps, pol.rejected_logps, pol.chosen_prefix_logps, pol.rejected_prefix_logps
    )
    loss, _ = Objective(SIGMOID, ld_alpha=0.3)(pol, ref, _batch([1.0, 1.0]), 2.0, 1.0)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-12)


def test_ld_without_prefix_sums_is_an_error():
    pol = _pol(chosen_prefix_logps=None, rejected_prefix_logps=None)
    with pytest.raises(ValueError, match="prefix"):
        Objective(SIGMOID, ld_alpha=0.5)(pol, None, _batch([1.0, 1.0]), 2.0, 1.0)


def test_wpo_weights_each_pair_by_its_aligned_probability():
    """At the reference every pair loss is ln 2, so the loss is ln 2 · mean of the WPO weights:
    pair 0: ā_w = (−6 − (−2))/4 = −1, ā_l = (−3 − (−1))/2 = −1 -> e^{−2}; pair 1: ā_w = (−2 − 0)/2 = −1,
    ā_l = (−5 − (−2))/3 = −1 -> e^{−2}; data weights 1 and 0.5 -> ln 2 · (e^{−2} + 0.5 e^{−2}) / 2."""
    pol = _pol(
        chosen_log_collision=T([-2.0, 0.0], dtype=torch.float64),
        rejected_log_collision=T([-1.0, -2.0], dtype=torch.float64),
    )
    ref = ReferenceLogps(pol.chosen_logps, pol.rejected_logps)
    loss, _ = Objective(SIGMOID, wpo=True)(pol, ref, _batch([1.0, 0.5]), 2.0, 1.0)
    expected = math.log(2) * (math.exp(-2) + 0.5 * math.exp(-2)) / 2
    assert float(loss) == pytest.approx(
        expected, rel=1e-6
    )  # the weights are float32, as in batches


def test_router_term_is_weighted_by_the_micro_batch_share_of_pairs():
    """2 of the window's 8 pairs: the micro-batch carries a quarter of its router term."""
    pol = _pol(aux_loss=T(0.4, dtype=torch.float64))
    ref = ReferenceLogps(pol.chosen_logps, pol.rejected_logps)
    loss, _ = Objective(SIGMOID)(pol, ref, _batch([1.0, 1.0]), 8.0, 1.0)
    assert float(loss) == pytest.approx(2 * math.log(2) / 8 + 0.4 * 2 / 8, abs=1e-12)


def test_extras_follow_the_options():
    assert Objective(SIGMOID).extras == ()
    assert Objective(SIGMOID, ld_alpha=0.5, wpo=True).extras == ("prefix", "collision")
