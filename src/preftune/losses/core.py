"""What every loss shares: :class:`LossOutput`, :class:`LossSpec` and the numeric helpers.

Helpers: hyperparameter validation (``_number``, ``_positive``, ``_non_negative``), the log-ratios
``r = logp_θ − logp_ref`` (``_log_ratios``), length averages ``ā = logp / max(n, 1)`` (``_average``),
the stable ``log(1 − e^a)`` (``_log1mexp``) and ``_output``, which detaches the rewards. All maths runs
in fp32 or wider.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["LossOutput", "LossSpec", "hyperparameters"]


@dataclass
class LossOutput:
    """Per-pair loss terms and detached rewards; the caller reduces (see :meth:`reduce`)."""

    losses: Tensor  # [B] per-pair terms, reduced as a mean over pairs
    token_losses: (
        Tensor  # [B] per-pair SUM of token-level terms (sft / ORPO NLL), reduced by total tokens
    )
    chosen_rewards: Tensor  # [B] detached
    rejected_rewards: Tensor  # [B] detached
    chosen_tokens: Tensor  # [B] response token counts of the chosen responses
    # For logging, detached: name -> (pair part [B], token part [B]) of each weighted term of a
    # combination, and of the named components of a loss that has two (ORPO: odds_ratio, nll).
    parts: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # Per-pair weights of the pair terms when they differ from the token terms' (WPO), else None.
    pair_weights: Tensor | None = None

    def reduce(
        self,
        num_pairs: int | float | Tensor | None = None,
        num_tokens: int | float | Tensor | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """``Σ w·losses / num_pairs + Σ w·token_losses / num_tokens`` (a scalar); ``w`` = per-pair weights
        (the pair terms use ``pair_weights`` instead when set: WPO).

        Defaults are this batch's pair count and its total chosen tokens (each at least 1) and weights 1.
        For exact gradient accumulation pass the totals over the whole accumulation window (and all ranks):
        this is the one place the trainer's and the evaluator's loss is reduced.
        """
        if num_pairs is None:
            num_pairs = max(self.losses.shape[0], 1)
        if num_tokens is None:
            num_tokens = self.chosen_tokens.sum().clamp(min=1)
        losses, token_losses = self.losses, self.token_losses
        if self.pair_weights is not None:
            losses = self.pair_weights * losses
        elif weights is not None:
            losses = weights * losses
        if weights is not None:
            token_losses = weights * token_losses
        return losses.sum() / num_pairs + token_losses.sum() / num_tokens


@dataclass(frozen=True)
class LossSpec:
    """Registry entry: how to call a loss and what it needs. Everything the rest of preftune knows about a
    loss (the config's validation, the objective, the diagnostics) it reads from here."""

    fn: Callable[..., LossOutput]
    needs_reference: (
        bool  # needs ref_chosen_logps / ref_rejected_logps (a reference model or a cache)
    )
    # The hyperparameters it accepts, with their defaults: ``fn``'s own keyword defaults
    # (:func:`hyperparameters`), so that each default is written once, beside its maths.
    defaults: Mapping[str, float | str]
    uses: str  # "sums" or "averages" (length-normalised log-probs, computed inside the loss)
    description: str
    defines_rewards: bool = field(
        default=True
    )  # False for sft: a combination takes rewards elsewhere
    choices: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict
    )  # string-valued hyperparameters and their allowed values (f_dpo's f_divergence)
    # Names of the pair part and the token part when a loss has both (ORPO), logged separately.
    components: tuple[str, str] | None = None
    # The per-pair loss at initialisation (policy = reference: every margin 0) when it is the same for every
    # hyperparameter value and data set: log 2 for the sigmoid family. None: it depends on β or the data
    # (IPO, SimPO, sft, ...). Diagnostics' stuck-at-init rule watches the losses that state it.
    init_loss: float | None = None
    # On always-won (separable) pairs the loss's optimum is an infinite reward margin (DPO), so margins keep
    # growing once every pair is won. Diagnostics' unbounded-margins rule watches the losses that say so.
    unbounded_margin: bool = False


def hyperparameters(fn: Callable) -> dict[str, float | str]:
    """A loss function's hyperparameters and their defaults: its keyword-only arguments with a number or
    a string as default (``beta=0.1``, ``f_divergence="reverse_kl"``); inputs default to None."""
    import inspect

    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and isinstance(p.default, (int, float, str))
        and not isinstance(p.default, bool)
    }


def _upcast(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _number(name: str, value, loss: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{loss}: hyperparameter {name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{loss}: hyperparameter {name} must be finite, got {value!r}")
    return value


def _positive(name: str, value, loss: str) -> float:
    value = _number(name, value, loss)
    if value <= 0:
        raise ValueError(f"{loss}: hyperparameter {name} must be > 0, got {value!r}")
    return value


def _non_negative(name: str, value, loss: str) -> float:
    value = _number(name, value, loss)
    if value < 0:
        raise ValueError(f"{loss}: hyperparameter {name} must be >= 0, got {value!r}")
    return value


def _missing_reference(loss: str) -> ValueError:
    return ValueError(
        f"loss {loss!r} needs reference log-probs: pass ref_chosen_logps and ref_rejected_logps "
        "(or use a reference-free loss: simpo, orpo)"
    )


def _log_ratios(
    loss: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``r_w = logp_θ(y_w) − logp_ref(y_w)``, ``r_l`` likewise (fp32)."""
    if ref_chosen is None or ref_rejected is None:
        raise _missing_reference(loss)
    return (
        _upcast(policy_chosen) - _upcast(ref_chosen),
        _upcast(policy_rejected) - _upcast(ref_rejected),
    )


def _average(logps: Tensor, tokens: Tensor) -> Tensor:
    """``ā = logp / max(n, 1)`` in fp32."""
    logps = _upcast(logps)
    return logps / tokens.clamp(min=1).to(logps.dtype)


def _output(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_tokens: Tensor,
    token_losses: Tensor | None = None,
) -> LossOutput:
    return LossOutput(
        losses=losses,
        token_losses=torch.zeros_like(losses) if token_losses is None else token_losses,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        chosen_tokens=chosen_tokens,
    )


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 − e^a)`` for ``a < 0`` (docs/FORMULAS.md "Numerical notes"): ``log(−expm1(a))`` above −ln 2, ``log1p(−exp(a))`` below.

    The input is clamped inside each branch, so the branch that ``torch.where`` discards has finite
    gradients too (no NaN at ``a ≈ 0``). ``a`` is also kept ≤ −1e-20, which only matters at ``a = 0``
    (an empty or certain response), where the true value is −inf.
    """
    near_zero = torch.log(-torch.expm1(a.clamp(min=-math.log(2.0), max=-1e-20)))
    far = torch.log1p(-torch.exp(a.clamp(max=-math.log(2.0))))
    return torch.where(a > -math.log(2.0), near_zero, far)
