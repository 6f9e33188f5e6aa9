"""Curve plots of a run from its metrics.jsonl.

matplotlib's object API on the Agg canvas, never ``pyplot``: no global backend switch, no display.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from preftune.tracking._files import METRICS_FILE, read_metrics


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(ax, rows, key, label, **style) -> bool:
    x, y = _series(rows, key)
    if not x:
        return False
    ax.plot(x, y, label=label, marker="o" if len(x) <= 30 else None, markersize=3, **style)
    return True


def _panel(ax, title, ylabel, lines) -> None:
    """``lines``: (rows, key, label, style) tuples; 'no data' when none has points."""
    drawn = [_plot(ax, rows, key, label, **style) for rows, key, label, style in lines]
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if any(drawn):
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves into one PNG (default ``run_dir/curves.png``) and return its path.

    Panels: loss, reward accuracy, reward margins (train and eval), chosen/rejected log-probs, chosen/rejected
    rewards, learning rate with gradient norm. Runs without eval and single-point runs are drawn (points get
    markers); a run with no metrics at all raises ValueError.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"no metrics in {run_dir / METRICS_FILE}")
    train = [r for r in rows if r.get("split", "train") == "train"]
    ev = [r for r in rows if r.get("split") == "eval"]
    solid, dashed = {}, {"linestyle": "--"}
    c_col, r_col = {"color": "tab:green"}, {"color": "tab:red"}

    fig = Figure(figsize=(16, 8.5), layout="constrained")
    axes = fig.subplots(2, 3)
    fig.suptitle(f"preftune run: {run_dir.resolve().name}")
    for ax, (title, ylabel, key) in zip(
        axes[0],
        [
            ("Loss", "loss", "loss"),
            ("Reward accuracy", "share of pairs with chosen > rejected", "rewards/accuracies"),
            ("Reward margin", "β·(chosen − rejected log-ratio)", "rewards/margins"),
        ],
    ):
        _panel(ax, title, ylabel, [(train, key, "train", solid), (ev, key, "eval", dashed)])
    axes[0][1].set_ylim(-0.02, 1.02)
    for ax, (title, ylabel, prefix) in zip(
        axes[1][:2],
        [
            ("Log-probs of responses", "summed log-prob (nats)", "logps"),
            ("Implicit rewards", "β·log-ratio to the reference", "rewards"),
        ],
    ):
        lines = [
            (train, f"{prefix}/chosen", "chosen (train)", c_col),
            (train, f"{prefix}/rejected", "rejected (train)", r_col),
            (ev, f"{prefix}/chosen", "chosen (eval)", {**c_col, **dashed}),
            (ev, f"{prefix}/rejected", "rejected (eval)", {**r_col, **dashed}),
        ]
        _panel(ax, title, ylabel, lines)

    ax = axes[1][2]  # two scales: learning rate left, gradient norm right
    ax2 = ax.twinx()
    drawn = [
        _plot(ax, train, "learning_rate", "learning rate", color="tab:blue"),
        _plot(ax2, train, "grad_norm", "grad norm", color="tab:orange"),
    ]
    ax.set(title="Learning rate and gradient norm", xlabel="optimizer step", ylabel="learning rate")
    ax2.set_ylabel("gradient norm (before clipping)")
    ax.grid(True, alpha=0.3)
    if any(drawn):
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)

    steps = [r["step"] for r in rows if isinstance(r.get("step"), (int, float))]
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        if steps and min(steps) == max(steps):  # a single step: give the axis some width
            ax.set_xlim(steps[0] - 1, steps[0] + 1)

    out = Path(out) if out is not None else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    return out
