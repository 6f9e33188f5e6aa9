"""What the user sees: metrics.jsonl, TensorBoard, a progress bar, curve plots and atomic JSON files.

Why these shapes:

- ``metrics.jsonl`` is one JSON object per logged step (``{"step", "split", "time", **metrics}``), appended and
  flushed line by line, so a killed run keeps everything it logged and a resumed run continues the same file.
  A resume first calls :meth:`MetricsLogger.truncate_after` to drop the lines the killed run wrote after the
  checkpoint it resumes from (they are logged again, so keeping them would duplicate steps), and a line cut
  in half by the kill is dropped too.
- Metric keys are stored without a split prefix; the ``split`` field says train or eval (``eval/loss`` logged
  with ``split="eval"`` is stored as ``loss``). TensorBoard tags are ``<split>/<key>``.
- Non-main ranks construct the same objects and get no-ops, so the trainer needs no ``if rank == 0``.
- Plots use matplotlib's object API on the Agg canvas, never ``pyplot``: no global backend switch, no display.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS_FILE",
    "TOKENS_PER_S",
    "MetricsLogger",
    "ProgressBar",
    "format_line",
    "plot_run",
    "read_metrics",
    "write_json",
]

METRICS_FILE = "metrics.jsonl"
#: Metric key of the training throughput (tokens per second, all ranks).
TOKENS_PER_S = "tokens_per_s"
_TOKS_KEYS = (TOKENS_PER_S, "tokens/s", "tokens_per_second")


def _scalar(v: Any) -> Any:
    """A plain Python number from a float/int/0-d tensor/numpy scalar; other values pass through."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, str)) or v is None:
        return v
    if hasattr(v, "item"):
        return v.item()
    return v


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "item") and getattr(o, "ndim", 0) == 0:
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    import dataclasses

    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_json(path: str | Path, obj: Any, *, indent: int = 2) -> Path:
    """Write JSON atomically (temporary file, fsync, rename): a kill never leaves a half file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _fmt(v: float, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else str(v)


def _first(metrics: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((metrics[k] for k in keys if k in metrics), None)


def format_line(step: int, metrics: Mapping[str, Any]) -> str:
    """A compact human line: ``step 120 | loss 0.6931 | acc 0.50 | margin 0.012 | logps c -45.2 r -47.8 | ...``.

    Only the metrics present are shown; keys may carry an ``eval/`` prefix.
    """
    m = {k.removeprefix("eval/"): _scalar(v) for k, v in metrics.items()}
    parts = [f"step {step}"]
    if "loss" in m:
        parts.append(f"loss {_fmt(m['loss'], '.4f')}")
    if "rewards/accuracies" in m:
        parts.append(f"acc {_fmt(m['rewards/accuracies'], '.2f')}")
    if "rewards/margins" in m:
        parts.append(f"margin {_fmt(m['rewards/margins'], '.3g')}")
    if "logps/chosen" in m and "logps/rejected" in m:
        c, r = _fmt(m["logps/chosen"], ".1f"), _fmt(m["logps/rejected"], ".1f")
        parts.append(f"logps c {c} r {r}")
    if "grad_norm" in m:
        parts.append(f"grad {_fmt(m['grad_norm'], '.3g')}")
    if "learning_rate" in m:
        parts.append(f"lr {_fmt(m['learning_rate'], '.2e')}")
    toks = _first(m, _TOKS_KEYS)
    if toks is not None:
        parts.append(f"{_fmt(toks, '.0f')} tok/s")
    return " | ".join(parts)


class MetricsLogger:
    """Appends metrics to ``run_dir/metrics.jsonl`` and, when enabled and installed, to TensorBoard.

    The file is opened lazily (after a possible :meth:`truncate_after`) in append mode and flushed after
    every line. ``is_main=False`` makes every method a no-op (other ranks of a distributed run).
    """

    format_line = staticmethod(format_line)

    def __init__(self, run_dir: str | Path, *, tensorboard: bool, is_main: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.tensorboard = tensorboard
        self.is_main = is_main
        self._file: Any = None
        self._writer: Any = None
        self._tb_failed = False
        self._purge_step: int | None = None

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Append ``{"step", "split", "time", **metrics}`` (keys without a ``<split>/`` prefix)."""
        if not self.is_main:
            return
        clean = {k.removeprefix(f"{split}/"): _scalar(v) for k, v in metrics.items()}
        row = {"step": int(step), "split": split, "time": time.time(), **clean}
        if self._file is None:
            self._open()
        self._file.write(json.dumps(row, default=_json_default) + "\n")
        self._file.flush()
        writer = self._tb()
        if writer is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"{split}/{k}", v, int(step))
            writer.flush()

    def truncate_after(self, step: int) -> int:
        """Drop lines with ``step`` above the resumed step (and any half-written line); return how many.

        TensorBoard is told the same through ``purge_step``, so its curves do not double back either.
        """
        if not self.is_main:
            return 0
        self._purge_step = int(step) + 1
        self._close_file()
        if not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                keep = int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line + "\n")
            elif line.strip():
                dropped += 1
        if dropped:
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)
        return dropped

    def close(self) -> None:
        self._close_file()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:  # a kill mid-line leaves a tail without "\n": cut it
                data = f.read()
                if not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _tb(self) -> Any:
        if not self.tensorboard or self._tb_failed:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the optional `tensorboard` extra is not installed
                self._tb_failed = True
                return None
            self._writer = SummaryWriter(
                log_dir=str(self.run_dir / "tensorboard"), purge_step=self._purge_step
            )
        return self._writer


class ProgressBar:
    """A tqdm bar over optimizer steps with loss, reward accuracy, margin and tokens/s.

    Set the postfix at log steps only (``update(1, loss=...)`` or :meth:`set_postfix`): formatting every step
    costs time. :meth:`write` prints through ``tqdm.write`` so log lines do not break the bar; with
    ``enabled=False`` there is no bar but lines still print; ``is_main=False`` silences both.
    """

    def __init__(
        self, total: int, initial: int = 0, enabled: bool = True, *, is_main: bool = True
    ) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.is_main = is_main
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not (enabled and is_main),
            unit="step",
            desc="train",
            dynamic_ncols=True,
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance ``n`` steps; keyword values (``loss``, ``acc``, ``margin``, ``tok_s``) set the postfix."""
        self.bar.update(n)
        if postfix:
            self._show({k.replace("tok_s", "tok/s"): v for k, v in postfix.items()})

    def set_postfix(self, metrics: Mapping[str, Any]) -> None:
        """Show loss, accuracy, margin and tok/s picked from a metrics row."""
        picks = {
            "loss": metrics.get("loss"),
            "acc": metrics.get("rewards/accuracies"),
            "margin": metrics.get("rewards/margins"),
            "tok/s": _first(metrics, _TOKS_KEYS),
        }
        self._show({k: v for k, v in picks.items() if v is not None})

    def write(self, msg: str) -> None:
        if self.is_main:
            self._tqdm.write(msg, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _show(self, values: Mapping[str, Any]) -> None:
        specs = {"loss": ".4f", "acc": ".2f", "margin": ".3g", "tok/s": ".0f"}
        shown = {k: _fmt(_scalar(v), specs.get(k, ".4g")) for k, v in values.items()}
        self.bar.set_postfix(shown, refresh=True)


# ---------------------------------------------------------------------------------------------------
# Reading and plotting


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (optionally one split); blank or half-written lines skipped."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and (split is None or row.get("split") == split):
            rows.append(row)
    return rows


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
