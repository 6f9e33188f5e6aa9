"""The diagnostics' rules: each a small pure function of the metric histories that returns a
:class:`Finding` (what was seen, why it usually happens, what to try) or None.

Histories (see :mod:`preftune.diagnostics`): one dict per logged step with the keys of docs/FORMULAS.md
"Metrics"; missing keys make the rules that need them silent. A rule knows metrics, never loss names:
which rules apply to a run's loss is :class:`preftune.diagnostics.Diagnostics`' decision, read from the loss
registry.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LOG2",
    "Finding",
    "check_grad_explosion",
    "check_likelihood_displacement",
    "check_long_warmup",
    "check_nonfinite",
    "check_overfitting",
    "check_stuck_at_log2",
    "check_unbounded_margins",
    "format_warning",
]

LOG2 = math.log(2.0)

History = Sequence[Mapping[str, Any]]


@dataclass
class Finding:
    """One recognised failure pattern: what was seen, why it usually happens, what to try."""

    rule: str
    step: int
    symptom: str
    causes: list[str]
    advice: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def format_warning(f: Finding) -> str:
    """One readable multi-line warning: symptom, likely causes, what to try."""
    lines = [f"preftune warning [{f.rule}] at step {f.step}: {f.symptom}"]
    for title, items in (("likely causes", f.causes), ("what to try", f.advice)):
        if items:
            lines += [f"  {title}:", *(f"    - {x}" for x in items)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Small helpers over histories


def _values(history: History, key: str) -> list[float]:
    """The finite values of ``key`` in order (entries without it are skipped)."""
    vals = (h.get(key) for h in history)
    return [float(v) for v in vals if v is not None and math.isfinite(float(v))]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _drop(xs: Sequence[float]) -> tuple[float, float]:
    """(mean of first half − mean of second half, its standard error) of a window."""
    half = len(xs) // 2
    a, b = xs[:half], xs[len(xs) - half :]
    var = (statistics.pvariance(a) + statistics.pvariance(b)) / 2 if half > 1 else 0.0
    return _mean(a) - _mean(b), math.sqrt(2 * var / half) if half else 0.0


def _step(history: History) -> int:
    return int(history[-1].get("step", len(history))) if history else 0


# ---------------------------------------------------------------------------------------------------
# Rules


def check_stuck_at_log2(
    train: History,
    *,
    init_loss: float | None = LOG2,
    warmup_steps: int = 0,
    points: int = 3,
    tol: float = 0.01,
    acc_band: float = 0.15,
) -> Finding | None:
    """Loss within ``tol`` of its init value (log 2) and accuracy ≈ 0.5 for ``points`` logged steps past warm-up.

    Accuracy counts pairs with chosen reward *strictly* above rejected, so a reference recomputed from the
    trained weights (margin exactly 0) reads 0.0, not 0.5: margins ≈ 0 also count as "no preference".
    """
    if init_loss is None:
        return None
    recent = [h for h in train if h.get("step", 0) > warmup_steps][-points:]
    if len(recent) < points:
        return None
    for h in recent:
        loss, acc = h.get("loss"), h.get("rewards/accuracies")
        margin = h.get("rewards/margins")
        if loss is None or acc is None or not abs(float(loss) - init_loss) <= tol:
            return None
        ties = margin is not None and abs(float(margin)) < 1e-6
        if not (abs(float(acc) - 0.5) <= acc_band or ties):
            return None
    margins = _values(recent, "rewards/margins")
    exact_zero = bool(margins) and max(abs(m) for m in margins) < 1e-6
    causes = [
        "the reference is the policy being trained (log-probs recomputed from the current weights): the "
        "margin stays 0 and the loss log 2",
        "learning rate too low (DPO full fine-tuning uses 5e-7 to 1e-6; LoRA 5e-6 to 5e-5)",
        "completion masks wrong (prompt or padding scored, or no response tokens), so chosen and rejected "
        "look alike",
    ]
    if not exact_zero:
        causes.insert(0, causes.pop(1))
    return Finding(
        rule="stuck_at_log2",
        step=_step(train),
        symptom=(
            f"loss has stayed at {init_loss:.4f} (its value at initialisation) with reward accuracy "
            f"{_mean(_values(recent, 'rewards/accuracies')):.2f} and margin "
            f"{_mean(margins) if margins else float('nan'):.2g} for {points} logged steps after warm-up"
        ),
        causes=causes,
        advice=[
            "use a frozen reference (reference.strategy=copy or precomputed), never the trained weights",
            "raise optim.lr (raising β does not help: the loss is log 2 at init for every β)",
            "check the data with `preftune data`: responses should be masked in, prompts masked out",
        ],
    )


def check_likelihood_displacement(
    train: History, *, window: int = 10, min_drop: float = 1.0, z: float = 3.0
) -> Finding | None:
    """Chosen **and** rejected log-probs both fall over the last ``window`` logged steps.

    "Fall" = the mean of the window's second half is below its first half by more than ``min_drop`` nats and
    by more than ``z`` standard errors (per-step values are batch means over different pairs, so noisy).
    """
    recent = list(train[-window:])
    if len(recent) < window:
        return None
    drops = {}
    for key in ("logps/chosen", "logps/rejected"):
        xs = _values(recent, key)
        if len(xs) < window:
            return None
        d, se = _drop(xs)
        if not (d > min_drop and d > z * se):
            return None
        drops[key] = d
    return Finding(
        rule="likelihood_displacement",
        step=_step(train),
        symptom=(
            f"both chosen and rejected log-probs are falling (by {drops['logps/chosen']:.2f} and "
            f"{drops['logps/rejected']:.2f} nats over the last {window} logged steps)"
        ),
        causes=[
            "likelihood displacement: DPO only constrains the margin, so probability mass can leave both "
            "responses for text that is neither",
            "learning rate too high: large updates push down shared tokens of both responses",
        ],
        advice=[
            "add an NLL term on the chosen responses (RPO): loss.name=[sigmoid, sft] with loss.weights=[1, 0.2]",
            "or use apo_zero, which pushes chosen likelihood up and rejected down explicitly",
            "or lower optim.lr",
        ],
    )


def check_overfitting(
    train: History, eval: History, *, gap: float = 0.2, window: int = 5
) -> Finding | None:
    """Train reward accuracy (mean of ``window`` logged steps up to the last eval) ≥ eval accuracy + ``gap``."""
    if not eval or "rewards/accuracies" not in eval[-1]:
        return None
    at = eval[-1].get("step", math.inf)
    before = [h for h in train if h.get("step", 0) <= at][-window:]
    train_acc, eval_acc = (
        _values(before, "rewards/accuracies"),
        _values(eval[-1:], "rewards/accuracies"),
    )
    if not train_acc or not eval_acc or _mean(train_acc) - eval_acc[0] < gap:
        return None
    symptom = f"train reward accuracy {_mean(train_acc):.2f} is far above eval reward accuracy {eval_acc[0]:.2f}"
    eval_losses = _values(eval, "loss")
    if len(eval_losses) >= 2 and eval_losses[-1] > min(eval_losses[:-1]):
        symptom += f" and eval loss is rising ({min(eval_losses[:-1]):.4f} → {eval_losses[-1]:.4f})"
    return Finding(
        rule="overfitting",
        step=int(eval[-1].get("step", _step(train))),
        symptom=symptom,
        causes=[
            "over-fitting: the policy memorises the training pairs (too many epochs or too small a data set)",
            "noisy preference labels learnt as if they were certain",
        ],
        advice=[
            "train fewer epochs (the DPO paper uses 1) or add data",
            "use a noise-aware loss: cdpo or robust (label_smoothing / flip rate ε ≈ 0.1)",
            "use a larger β to keep the policy closer to the reference",
        ],
    )


def check_nonfinite(train: History) -> Finding | None:
    """The latest loss or gradient norm is NaN or infinite."""
    if not train:
        return None
    bad = [
        k
        for k in ("loss", "grad_norm")
        if k in train[-1] and not math.isfinite(float(train[-1][k]))
    ]
    if not bad:
        return None
    return Finding(
        rule="nonfinite",
        step=_step(train),
        symptom=f"non-finite {' and '.join(bad)} ({', '.join(f'{k}={train[-1][k]}' for k in bad)})",
        causes=[
            "learning rate too high for the model or the schedule's warm-up too short",
            "low-precision overflow (float16 or a bf16 log-softmax) -- log-probs must be computed in fp32",
            "an empty response (no scored tokens) or a corrupt example",
        ],
        advice=[
            "lower optim.lr or lengthen the warm-up; keep optim.max_grad_norm set",
            "use model.dtype=bfloat16 (autocast, fp32 master weights) or float32 rather than float16",
            "resume from the last checkpoint; train.skip_nonfinite=true skips isolated bad steps",
        ],
    )


def check_grad_explosion(
    train: History, *, factor: float = 10.0, min_points: int = 5, window: int = 50
) -> Finding | None:
    """The latest gradient norm exceeds ``factor`` × the median of the previous ≤ ``window`` logged norms."""
    if len(train) < min_points + 1 or "grad_norm" not in train[-1]:
        return None
    last = float(train[-1]["grad_norm"])
    prev = _values(train[-window - 1 : -1], "grad_norm")
    if len(prev) < min_points or not math.isfinite(last):
        return None
    median = statistics.median(prev)
    if median <= 0 or last <= factor * median:
        return None
    return Finding(
        rule="grad_explosion",
        step=_step(train),
        symptom=f"gradient norm {last:.3g} is {last / median:.0f}x its running median {median:.3g}",
        causes=[
            "learning rate too high (or warm-up too short)",
            "low-precision overflow (float16), or extreme log-ratios from a very long or degenerate response",
        ],
        advice=[
            "lower optim.lr or lengthen the warm-up; keep optim.max_grad_norm (gradient clipping) on",
            "train in float32 or bfloat16 autocast rather than float16",
        ],
    )


def check_unbounded_margins(
    train: History,
    *,
    window: int = 10,
    min_margin: float = 5.0,
    min_accuracy: float = 0.95,
    min_rise: float = 1.0,
    z: float = 3.0,
) -> Finding | None:
    """The margins keep growing after every pair is already won (for a loss whose optimum is an infinite
    margin, ``LossSpec.unbounded_margin``: DPO's sigmoid).

    Trigger: over the last ``window`` logged steps the mean accuracy ≥ ``min_accuracy``, the latest margin
    ≥ ``min_margin`` (σ(5) ≈ 0.993: the loss is ~0) and the second half's mean margin exceeds the first half's
    by more than ``min_rise`` and ``z`` standard errors (still climbing, not a plateau). With deterministic
    (always-won) preferences DPO's optimum is an infinite margin, so the policy keeps drifting from the
    reference (Azar et al. 2023, the IPO motivation).
    """
    recent = list(train[-window:])
    margins, accs = _values(recent, "rewards/margins"), _values(recent, "rewards/accuracies")
    if len(margins) < window or len(accs) < window:
        return None
    half = window // 2
    first, second = _mean(margins[:half]), _mean(margins[-half:])
    fall, se = _drop(margins)
    if _mean(accs) < min_accuracy or margins[-1] < min_margin or not -fall > max(min_rise, z * se):
        return None
    return Finding(
        rule="unbounded_margins",
        step=_step(train),
        symptom=(
            f"reward margins keep growing ({first:.1f} → {second:.1f}) with reward accuracy "
            f"{_mean(accs):.2f}: the loss is ~0 yet the policy keeps moving away from the reference"
        ),
        causes=[
            "deterministic (always-won) preferences: DPO's optimum is an infinite margin, so nothing holds "
            "the policy near the reference once every pair is separated",
        ],
        advice=[
            "use ipo, whose squared loss targets a finite margin",
            "or cdpo (label_smoothing ε ≈ 0.1), which bounds the optimal margin",
            "or stop earlier / use a larger β",
        ],
    )


def check_long_warmup(warmup_steps: int, total_steps: int) -> Finding | None:
    """Warm-up of half the run or more: the learning rate peaks late (or never), so most steps train at a
    fraction of ``optim.lr`` — e.g. an example config's ``warmup_steps: 150`` on a 12-step run."""
    if total_steps <= 0 or warmup_steps * 2 < total_steps:
        return None
    share = min(warmup_steps, total_steps) / total_steps
    return Finding(
        rule="long_warmup",
        step=0,
        symptom=(
            f"warm-up is {warmup_steps} steps of a {total_steps}-step run: the learning rate stays below "
            f"its peak for {share:.0%} of the run"
        ),
        causes=["optim.warmup_steps set for a longer run (it overrides optim.warmup_ratio)"],
        advice=[
            "lower optim.warmup_steps, or set it to null and use optim.warmup_ratio (e.g. 0.1)"
        ],
    )
