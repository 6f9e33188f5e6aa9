"""The registry :data:`LOSSES` (name → :class:`LossSpec`) and :func:`compute_loss`, the one entry point:
validates names, hyperparameters and shapes, routes each hyperparameter to the terms that accept it and
sums weighted combinations (see "Combinations" in :mod:`preftune.losses`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from preftune.losses.core import LossOutput, LossSpec, _missing_reference, hyperparameters
from preftune.losses.dpo_family import cdpo, hinge, ipo, robust, sigmoid, sigmoid_norm
from preftune.losses.fdiv import F_DIVERGENCES, f_dpo
from preftune.losses.pair_extra import (
    apo_down,
    apo_zero,
    bco_pair,
    discopop,
    exo_pair,
    nca_pair,
    sppo_hard,
)
from preftune.losses.reference_free import orpo, sft, simpo
from preftune.losses.transport import aot, aot_unpaired

__all__ = ["LOSSES", "compute_loss"]

_LOG2 = math.log(2.0)


def _spec(fn, needs_reference: bool, uses: str, description: str, **facts) -> LossSpec:
    """A registry entry whose hyperparameter defaults are ``fn``'s own (stated once, in its signature)."""
    return LossSpec(fn, needs_reference, hyperparameters(fn), uses, description, **facts)


_SFT_SPEC = _spec(
    sft, False, "sums", "token-mean NLL of the chosen responses", defines_rewards=False
)

LOSSES: dict[str, LossSpec] = {
    "sigmoid": _spec(
        sigmoid, True, "sums", "DPO: -log σ(βh)", init_loss=_LOG2, unbounded_margin=True
    ),
    "cdpo": _spec(cdpo, True, "sums", "conservative DPO (label smoothing ε)", init_loss=_LOG2),
    "robust": _spec(
        robust, True, "sums", "robust DPO, unbiased under flip rate ε", init_loss=_LOG2
    ),
    "hinge": _spec(hinge, True, "sums", "SLiC/RSO hinge: max(0, 1 - βh)"),
    "ipo": _spec(ipo, True, "averages", "IPO on per-token averaged log-ratios"),
    "simpo": _spec(
        simpo, False, "averages", "SimPO: reference-free, length-averaged, target margin γ"
    ),
    "orpo": _spec(
        orpo,
        False,
        "averages",
        "ORPO: NLL + λ·odds-ratio term, reference-free",
        components=("odds_ratio", "nll"),
    ),
    "bco_pair": _spec(bco_pair, True, "sums", "paired binary classifier loss"),
    "nca_pair": _spec(nca_pair, True, "sums", "paired noise-contrastive alignment"),
    "sppo_hard": _spec(sppo_hard, True, "sums", "SPPO, hard labels: ±1/(2β)"),
    "apo_zero": _spec(apo_zero, True, "sums", "APO-zero: chosen up, rejected down"),
    "apo_down": _spec(apo_down, True, "sums", "APO-down: both down, rejected more"),
    "exo_pair": _spec(exo_pair, True, "sums", "EXO: KL to the (1-ε, ε) target"),
    "discopop": _spec(
        discopop, True, "sums", "DiscoPOP: log-ratio modulated logistic/exponential loss"
    ),
    "sigmoid_norm": _spec(
        sigmoid_norm,
        True,
        "averages",
        "length-normalised DPO (Tülu 3): -log σ(β(r_w/n_w - r_l/n_l))",
    ),
    "f_dpo": _spec(
        f_dpo,
        True,
        "sums",
        "f-DPO: DPO under reverse KL, forward KL, JS or α-divergence",
        choices={"f_divergence": F_DIVERGENCES},
    ),
    "aot": _spec(
        aot,
        True,
        "sums",
        "AOT, paired: sorted policy vs reference log-likelihood ratios (couples the micro-batch)",
    ),
    "aot_unpaired": _spec(
        aot_unpaired,
        True,
        "sums",
        "AOT, unpaired: sorted chosen vs rejected log-ratios (couples the micro-batch)",
    ),
    "sft": _SFT_SPEC,
    "nll": _SFT_SPEC,  # another name for sft (docs/FORMULAS.md "Reference-free losses")
}


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_pair_tensors(tensors: Mapping[str, Tensor | None]) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1 or any(len(s) != 1 for s in shapes.values()):
        detail = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(
            f"all per-pair inputs must be 1-D tensors of the same shape [B]; got {detail}"
        )


def compute_loss(
    name: str | Sequence[str],
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    weights: Sequence[float] | None = None,
    **hparams,
) -> LossOutput:
    """The one entry point: a loss of :data:`LOSSES`, or a weighted sum of several.

    Args:
        name: a loss name (``"sigmoid"``) or a list of names (``["sigmoid", "sft"]``).
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]`` SUMS of
            response-token log-probs (reference ones may be ``None`` for reference-free losses).
        chosen_tokens, rejected_tokens: ``[B]`` response token counts.
        weights: one weight per name (default all 1.0); ``losses`` and ``token_losses`` are weighted sums.
        **hparams: hyperparameters (module docstring), each routed to every term that accepts it; a
            string-valued one (``f_divergence``) must be one of its ``LossSpec.choices``.

    Returns:
        :class:`LossOutput`; rewards come from the first term that defines them (not ``sft``).

    Raises:
        ValueError: unknown loss or hyperparameter (with a suggestion), a string hyperparameter outside
            its choices (naming them), a reference-needing loss without
            reference log-probs, wrong number of weights, out-of-range hyperparameters, shape mismatches.
    """
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("compute_loss needs at least one loss name")
    for n in names:
        if n not in LOSSES:
            raise ValueError(
                f"unknown loss {n!r}{_suggest(n, LOSSES)} Known losses: {', '.join(LOSSES)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"a loss may appear only once in a combination, got {names}")
    if weights is None:
        weights = [1.0] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(
            f"got {len(weights)} weights for {len(names)} losses {names}; give one weight per loss"
        )
    for w in weights:
        if (
            isinstance(w, bool)
            or not isinstance(w, (int, float))
            or not (math.isfinite(w) and w >= 0)
        ):
            raise ValueError(f"loss weights must be finite numbers >= 0, got {weights}")

    specs = [LOSSES[n] for n in names]
    accepted = set().union(*(spec.defaults for spec in specs))
    for key in hparams:
        if key not in accepted:
            owners = [n for n, s in LOSSES.items() if key in s.defaults]
            hint = f" (it is a hyperparameter of {', '.join(owners)})" if owners else ""
            raise ValueError(
                f"unknown hyperparameter {key!r} for loss {' + '.join(names)}{hint}"
                f"{_suggest(key, accepted)} Accepted: {', '.join(sorted(accepted))}"
            )
    for key, value in hparams.items():
        options = next((s.choices[key] for s in specs if key in s.choices), None)
        if options is not None and (not isinstance(value, str) or value not in options):
            raise ValueError(
                f"hyperparameter {key} of loss {' + '.join(names)} must be one of "
                f"{', '.join(options)}, got {value!r}{_suggest(str(value), options)}"
            )
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    for n, spec in zip(names, specs):
        if spec.needs_reference and ref_chosen_logps is None:
            raise _missing_reference(n)
    _check_pair_tensors(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
            "chosen_tokens": chosen_tokens,
            "rejected_tokens": rejected_tokens,
        }
    )

    outputs = []
    for spec in specs:
        kwargs = {k: v for k, v in hparams.items() if k in spec.defaults}
        outputs.append(
            spec.fn(
                policy_chosen_logps,
                policy_rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                chosen_tokens=chosen_tokens,
                rejected_tokens=rejected_tokens,
                **kwargs,
            )
        )
    parts = {}
    for name, w, out, spec in zip(names, weights, outputs, specs):
        pair, token = (w * out.losses).detach(), (w * out.token_losses).detach()
        if len(names) > 1:
            parts[name] = (pair, token)
        if spec.components is not None:
            pair_name, token_name = spec.components
            parts[f"{name}/{pair_name}"] = (pair, torch.zeros_like(token))
            parts[f"{name}/{token_name}"] = (torch.zeros_like(pair), token)
    if len(outputs) == 1 and weights[0] == 1.0:
        outputs[0].parts = parts
        return outputs[0]
    rewards_from = next(
        (o for o, s in zip(outputs, specs) if s.defines_rewards),
        outputs[0],
    )
    return LossOutput(
        losses=sum(w * o.losses for w, o in zip(weights, outputs)),
        token_losses=sum(w * o.token_losses for w, o in zip(weights, outputs)),
        chosen_rewards=rewards_from.chosen_rewards,
        rejected_rewards=rewards_from.rejected_rewards,
        chosen_tokens=chosen_tokens,
        parts=parts,
    )
