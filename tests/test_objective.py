"""preftune.objective: the one place a micro-batch's log-probs become its share of the window loss —
LD-DPO and WPO applied as the papers define them, the router term weighted by the micro-batch's pairs."""

from __future__ import annotations

import contextlib
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


# ----------------------------------------------------------------------------- KTO on unpaired rows


def _unpaired_rows(n: int = 6) -> list[dict]:
    """Rows shaped as the data layer gives them: chosen_ids = the completion, rejected_ids = the
    completion of the next row's prompt (its KL row), label = desirable."""
    g = torch.Generator().manual_seed(4)
    prompts = [
        torch.randint(3, 49, (int(k),), generator=g).tolist() for k in (3, 5, 2, 4, 6, 3)[:n]
    ]
    completions = [
        torch.randint(3, 49, (int(k),), generator=g).tolist() for k in (4, 2, 5, 3, 1, 6)[:n]
    ]
    return [
        {
            "prompt_ids": prompts[i],
            "chosen_ids": completions[i],
            "rejected_ids": completions[(i + 1) % n],
            "label": i % 3 != 0,
            "weight": 1.0,
            "index": i,
        }
        for i in range(n)
    ]


def _kto_grads(tiny_dir, rows, windows, shared: bool):
    import copy

    from preftune.distributed import DistContext
    from preftune.model import PaddedLayout, SharedPromptLayout, load_model, resolve_source
    from preftune.objective import KTOObjective
    from preftune.reference import CopyReference
    from preftune.trainer import window_backward

    model = load_model(resolve_source(tiny_dir), device=torch.device("cpu")).double()
    if shared:
        layout = SharedPromptLayout(pad_token_id=0, chunk_size=4, attention_layers=2)
    else:
        layout = PaddedLayout(pad_token_id=0, chunk_size=4)
    reference = CopyReference(copy.deepcopy(model), layout)
    torch.manual_seed(0)
    with torch.no_grad():  # off θ₀, so that r and z₀ are not all zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    policy = layout.module(model)
    micro = [layout.collate([rows[i] for i in idx]) for idx in windows]
    objective = KTOObjective(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    window_backward(
        policy, reference, micro, objective, layout=layout, device=torch.device("cpu"),
        autocast=contextlib.nullcontext, dist=DistContext(),
    )  # fmt: skip
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("shared", [False, True])
def test_kto_accumulation_equals_one_big_batch(tiny_dir, shared):
    """z₀ is the mean over every KL row of the step, computed before the first backward: 3 + 1 + 2 rows
    give the gradient of one batch of 6 (fp64, 1e-10). A per-micro-batch z₀ (TRL's) would fail this."""
    rows = _unpaired_rows()
    big = _kto_grads(tiny_dir, rows, [[0, 1, 2, 3, 4, 5]], shared)
    small = _kto_grads(tiny_dir, rows, [[0, 1, 2], [3], [4, 5]], shared)
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-10, atol=1e-10, msg=name)
    assert any(g.abs().sum() > 0 for g in big.values())


def test_kto_at_the_reference_is_half_the_weight():
    """At θ₀: r = 0 and z₀ = max(0, 0) = 0, so every row's term is λ·σ(0) = λ/2: with λ_D = 1 for 4
    desirable rows and λ_U = 1.5 for 2 undesirable ones, the mean is (4·0.5 + 2·0.75) / 6 = 7/12."""
    from preftune.objective import KTOObjective
    from preftune.reference import ReferenceLogps

    logps = torch.tensor([-3.0, -2.0, -4.0, -1.0, -5.0, -2.5], dtype=torch.float64)
    pol = SequenceLogps(logps, logps.flip(0), torch.ones(6), torch.ones(6))
    ref = ReferenceLogps(logps.clone(), logps.flip(0))
    batch = PairBatch(
        weights=torch.ones(6), index=torch.arange(6), labels=torch.tensor([1, 1, 0, 1, 0, 1]).bool()
    )
    objective = KTOObjective(beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    window = objective.prepare([batch], lambda b: (pol, ref), lambda t: t)
    assert window.tolist() == [0.0, 6.0]  # Σ (logp_θ − logp_ref) over the KL rows, count
    loss, out = objective(pol, ref, batch, 6.0, 1.0, window)
    assert float(loss) == pytest.approx(7 / 12, abs=1e-12)
    metrics = objective.metrics(out, pol, batch)
    assert float(metrics["kl"][0]) == 0.0 and float(metrics["rewards/desirable"][1]) == 4.0


def test_wpo_weighs_the_preference_terms_not_an_added_nll_term():
    """[sigmoid, sft] with WPO: the sft (token) term keeps the data weights; the logged parts add up."""
    combo = functools.partial(compute_loss, ["sigmoid", "sft"], beta=0.5)
    pol = _pol(
        chosen_log_collision=T([-2.0, 0.0], dtype=torch.float64),
        rejected_log_collision=T([-1.0, -2.0], dtype=torch.float64),
    )
    ref = ReferenceLogps(pol.chosen_logps, pol.rejected_logps)
    batch = _batch([1.0, 1.0])
    loss, out = Objective(combo, wpo=True)(pol, ref, batch, 2.0, 6.0)
    nll = (6.0 + 2.0) / 6.0  # −Σ chosen logps / chosen tokens, unweighted by WPO
    assert float(loss) == pytest.approx(math.log(2) * math.exp(-2) + nll, rel=1e-6)
    terms = Objective(combo, wpo=True).terms(out, batch, 2.0, 6.0)
    assert float(terms["loss/sigmoid"] + terms["loss/sft"]) == pytest.approx(float(loss), rel=1e-6)
