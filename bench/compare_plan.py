"""compare.py's plan: the rows (model, data set, length, mode, steps, rounds, systems), the settings both
systems share, and the targets of issue 7 each row is judged on. Stdlib only: the parent never imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from _common import DATASETS

REPO = Path(__file__).resolve().parents[1]

GIB = 1024**3
BATCH = 2  # pairs per optimizer step (issue 7)
BETA = 0.1  # both systems' β, stated for the comparison (preftune's own default lives in its loss registry)
SEED = 42
# Targets of issue 7 (SmolLM-135M shape only): tokens/s ratio at 512, peak-RSS ratio at 1024.
SPEED_TARGETS = {"prompt-heavy": 2.5, "response-heavy": 1.3, "mixed": 1.5}
RSS_TARGETS = {"prompt-heavy": 0.5, "response-heavy": 0.75}
GC_RSS_TARGET_GIB = 12.0
EXACT_TARGET = 1e-4


@dataclass
class Row:
    model: str
    dataset: str
    max_length: int
    mode: str  # default | precomputed | padded | gc | exact
    warmup: int = 1
    steps: int = 4
    rounds: int = 2
    lr: float = 1e-6
    systems: tuple[str, ...] = ("preftune", "trl")

    @property
    def name(self) -> str:
        return f"{self.model}/{self.dataset}/{self.max_length}/{self.mode}"

    @property
    def n_pairs(self) -> int:
        # Exactness: one batch of the first 2 pairs, repeated (2 steps). Timing: exactly one epoch, so both
        # systems train on the same pairs overall (each in its own shuffled order).
        return BATCH if self.mode == "exact" else BATCH * (self.warmup + self.steps)


MODES = {
    "default": "preftune defaults (reference auto = frozen copy; prefix sharing auto = on for Llama) vs TRL frozen reference copy",
    "precomputed": "preftune reference.strategy=precomputed vs TRL precompute_ref_log_probs=True",
    "padded": "preftune train.prefix_sharing=false (two padded rows per pair, as TRL) vs TRL frozen reference copy",
    "gc": "preftune only, model.gradient_checkpointing=true (default reference)",
    "exact": "first-step loss, policy and reference of different random inits, same 2 pairs",
}


def plan(kind: str) -> list[Row]:
    rows: list[Row] = []
    if kind == "short":
        rows.append(Row("tiny", "mixed", 512, "exact", warmup=0, steps=2, rounds=1, lr=1e-4))
        rows.append(Row("20m", "prompt-heavy", 512, "exact", warmup=0, steps=2, rounds=1, lr=1e-4))
        for ds in DATASETS:
            for mode in ("default", "precomputed"):
                rows.append(Row("tiny", ds, 512, mode, warmup=1, steps=4, rounds=2))
        rows.append(Row("tiny", "prompt-heavy", 512, "padded", warmup=1, steps=4, rounds=2))
        rows.append(Row("20m", "prompt-heavy", 512, "default", warmup=1, steps=3, rounds=2))
        rows.append(Row("20m", "prompt-heavy", 512, "precomputed", warmup=1, steps=3, rounds=2))
        return rows
    for model in ("tiny", "20m", "smol135m"):
        rows.append(Row(model, "prompt-heavy", 512, "exact", warmup=0, steps=2, rounds=1, lr=1e-4))
    rows.append(Row("tiny", "mixed", 512, "exact", warmup=0, steps=2, rounds=1, lr=1e-4))
    for model, (warmup, steps, rounds) in {
        "tiny": (2, 6, 3),
        "20m": (1, 5, 3),
        "smol135m": (1, 4, 2),
    }.items():
        for ds in DATASETS:
            for mode in ("default", "precomputed", "padded"):
                rows.append(Row(model, ds, 512, mode, warmup=warmup, steps=steps, rounds=rounds))
    for ds in ("prompt-heavy", "response-heavy"):  # the peak-RSS targets
        for mode in ("default", "precomputed"):
            rows.append(Row("smol135m", ds, 1024, mode, warmup=1, steps=3, rounds=2))
    rows.append(
        Row(
            "smol135m",
            "prompt-heavy",
            4096,
            "gc",
            warmup=1,
            steps=2,
            rounds=1,
            systems=("preftune",),
        )
    )
    return rows


def target_for(row: Row) -> tuple[str, float, str] | None:
    """(metric, bound, direction) of issue 7 that this row is judged on, if any."""
    if row.mode == "exact":
        return ("rel_diff", EXACT_TARGET, "<=")
    if row.model != "smol135m":
        return None
    if row.mode == "gc":
        return ("peak_rss_gib", GC_RSS_TARGET_GIB, "<=")
    if row.max_length == 512 and row.mode in ("default", "precomputed", "padded"):
        return ("tokens_per_s", SPEED_TARGETS[row.dataset], ">=")
    if row.max_length == 1024 and row.dataset in RSS_TARGETS:
        return ("peak_rss", RSS_TARGETS[row.dataset], "<=")
    return None
