"""The DPO loss family as pure functions of per-pair log-probs (spec: docs/FORMULAS.md, "Losses").

Layout: :mod:`~preftune.losses.core` (``LossOutput``, ``LossSpec``, shared numeric helpers),
:mod:`~preftune.losses.dpo_family` and :mod:`~preftune.losses.pair_extra` (losses on log-ratios to a
reference), :mod:`~preftune.losses.fdiv` (``f_dpo``), :mod:`~preftune.losses.transport` (``aot``,
``aot_unpaired``: sorted-batch losses that couple the pairs of a micro-batch),
:mod:`~preftune.losses.reference_free` (``simpo``, ``orpo``, ``sft``), :mod:`~preftune.losses.registry`
(``LOSSES``, ``compute_loss``), :mod:`~preftune.losses.unpaired` (KTO on unpaired rows: ``kto``,
``UNPAIRED_LOSSES``, ``mismatched_indices``, ``kl_stats``) and :mod:`~preftune.losses.options` (per-loss
options: ``wpo_weights``, LD-DPO's ``ld_split``/``ld_logps``). Import everything from ``preftune.losses``.
Adding a loss: write it in the module of its kind, register it in ``LOSSES``, export it here, test it in
``tests/test_losses.py`` (or a ``tests/test_losses_<module>.py`` mirroring its module).

Inputs
------
Every loss takes the same per-pair tensors, all ``[B]``:

- ``policy_chosen_logps``, ``policy_rejected_logps``: **sums** of the policy's log-probs over the response
  tokens (EOS included, prompt and padding excluded), as returned by :mod:`preftune.logprobs`;
- ``ref_chosen_logps``, ``ref_rejected_logps``: the same for the frozen reference (``None`` for the
  reference-free losses ``simpo``, ``orpo`` and for ``sft``);
- ``chosen_tokens``, ``rejected_tokens`` (keyword-only): response token counts ``n`` (int64).

Each loss applies the length normalisation its paper asks for itself (``ipo``, ``sigmoid_norm``: per-token
averaged log-ratios; ``simpo``/``orpo``: ``ā = logp / max(n, 1)``). All maths runs in fp32 (float64 inputs
stay float64), using ``logsigmoid``/``softplus`` forms that stay finite for log-probs from -1e4 to -1e-9
and margins of ±1e3.

Output and reduction
--------------------
A loss returns a :class:`LossOutput`: per-pair ``losses`` (reduced as a mean over pairs), per-pair
``token_losses`` (a SUM over the chosen tokens of a token-level term, e.g. the NLL of ``sft``/``orpo``, reduced
by the total number of chosen tokens) and detached rewards. ``out.reduce()`` gives the batch loss; a trainer
that accumulates gradients passes window totals: ``out.reduce(num_pairs=N_pairs, num_tokens=N_tokens)``.
``aot``/``aot_unpaired`` sort within the call (one micro-batch): their ``losses[i]`` are quantile terms, and
accumulation sums per-micro-batch sorts (:mod:`~preftune.losses.transport`).

Rewards (detached, for logging): ``β·(logp_θ − logp_ref)`` for the losses with a reference, except
``sigmoid_norm`` (``β·r/n``) and ``f_dpo`` (``β·(f'(u) − f'(1))``, ``u = π_θ/π_ref``); ``β·ā`` for
``simpo``/``orpo``; ``sft`` alone reports ``β·(logp_θ − logp_ref)`` when reference log-probs are given, else the
average log-prob ``ā`` (unscaled).

Hyperparameters (keyword arguments; defaults from docs/FORMULAS.md "Defaults")
------------------------------------------------------------------------------
=====================  ======================================================  =====================
name                   meaning                                                 default
=====================  ======================================================  =====================
``beta``               β, the inverse temperature / KL strength (IPO's τ)      0.1; ``simpo`` 2.0;
                                                                               ``sigmoid_norm`` 5.0
``label_smoothing``    ε, the assumed preference-flip rate (``cdpo``,          0.1; ``aot*`` 0
                       ``robust``, ``aot``, ``aot_unpaired``); ε = 0 gives
                       ``sigmoid`` (``aot*``: the paper's logistic loss)
``f_divergence``       ``f_dpo``'s divergence (a string): ``reverse_kl``       ``reverse_kl``
                       (DPO), ``forward_kl``, ``js``, ``alpha``
``f_alpha``            α ∈ (0, 1) of ``f_divergence="alpha"``                  0.5
``gamma_beta_ratio``   γ/β, SimPO's target margin as a fraction of β           0.5
``orpo_lambda``        λ, weight of ORPO's odds-ratio term (NLL has weight 1)  0.1
``exo_epsilon``        ε of EXO's target distribution, 0 < ε < 1               1e-3
``discopop_tau``       τ, DiscoPOP's modulation temperature                    0.05
=====================  ======================================================  =====================

Combinations
------------
``compute_loss(["sigmoid", "sft"], ..., weights=[1.0, 0.2], beta=0.1)`` is the weighted sum of the terms
(RPO): ``losses`` and ``token_losses`` are each summed with the weights. A hyperparameter goes to every term
that accepts it (``beta`` above goes to both), and one that no term accepts is an error. The combination's
rewards come from the first term that defines rewards, i.e. the first term other than ``sft`` (``sft``'s own
rewards are used only when every term is ``sft``).
"""

from preftune.losses.core import LossOutput, LossSpec
from preftune.losses.dpo_family import cdpo, hinge, ipo, robust, sigmoid, sigmoid_norm
from preftune.losses.fdiv import F_DIVERGENCES, f_dpo
from preftune.losses.options import ld_logps, ld_split, public_tokens, wpo_weights
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
from preftune.losses.registry import LOSSES, compute_loss
from preftune.losses.transport import aot, aot_unpaired
from preftune.losses.unpaired import (
    UNPAIRED_LOSSES,
    KTOOutput,
    kl_stats,
    kto,
    kto_weight_ratio,
    mismatched_indices,
)

#: Every loss name ``loss.name`` may take: the pair losses and the unpaired ones.
ALL_LOSSES = {**LOSSES, **UNPAIRED_LOSSES}

__all__ = [
    "ALL_LOSSES",
    "F_DIVERGENCES",
    "LOSSES",
    "UNPAIRED_LOSSES",
    "KTOOutput",
    "LossOutput",
    "LossSpec",
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "cdpo",
    "compute_loss",
    "discopop",
    "exo_pair",
    "f_dpo",
    "hinge",
    "ipo",
    "kl_stats",
    "kto",
    "kto_weight_ratio",
    "ld_logps",
    "ld_split",
    "mismatched_indices",
    "nca_pair",
    "orpo",
    "public_tokens",
    "robust",
    "sft",
    "sigmoid",
    "sigmoid_norm",
    "simpo",
    "sppo_hard",
    "wpo_weights",
]
