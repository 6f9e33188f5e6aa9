"""The on-policy sections of the run config and their checks: ``loop`` (``preftune loop``, iterative
on-policy DPO) and ``geneval`` (a generation eval at the eval points of ``preftune train``).

Imported by :mod:`preftune.config` (which re-exports both), so it imports nothing heavy. The rest of the
config is the training config of every round; :mod:`preftune.loop` sets each round's model, data and
output folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from preftune._configio import ConfigError, setting

__all__ = ["GenEvalConfig", "LoopConfig", "check_geneval", "check_loop"]

PAIR_MODES = ("best-worst", "all")
REFERENCES = ("round_start", "initial")


@dataclass
class LoopConfig:
    rounds: int = setting(2, "rounds of sample -> judge -> pairs -> train -> evaluate")
    prompts: list[str] = setting(
        [], "training prompts: data files with a prompt column or messages"
    )
    eval_prompts: list[str] = setting([], "held-out prompts for each round's generation eval")
    judge: str = setting(
        "rules:", "judge: rules:[COLUMN] | python:MODULE:FUNCTION | reward-model:PATH_OR_HUB_ID"
    )
    samples: int = setting(8, "answers sampled per training prompt per round")
    temperature: float = setting(0.8, "sampling temperature of the training answers")
    top_p: float = setting(1.0, "nucleus sampling of the training answers (1: off)")
    top_k: int = setting(0, "top-k sampling of the training answers (0: off)")
    max_new_tokens: int = setting(
        64, "longest answer, in tokens (longer ones are cut and not paired)"
    )
    pairs: str = setting(
        "best-worst", "best-worst (one pair per prompt) | all (every pair above margin)"
    )
    margin: float = setting(0.0, "smallest judge-score difference of a pair")
    keep_truncated: bool = setting(
        False,
        "pair answers cut at max_new_tokens too (as chosen, they teach stopping mid-sentence)",
    )
    reference: str = setting(
        "round_start",
        "reference of a round: round_start (its starting policy) | initial (the first model)",
    )
    eval_samples: int = setting(4, "sampled answers per held-out prompt (0: greedy only)")
    eval_temperature: float = setting(0.8, "temperature of the sampled held-out answers")
    batch_size: int = setting(16, "prompts per generation batch")


def check_loop(loop: LoopConfig) -> None:
    """One-line ConfigErrors for values a loop cannot use (files are checked when read)."""
    _check_ranges(
        "loop", loop,
        floors={"rounds": 0, "samples": 2, "max_new_tokens": 1, "batch_size": 1, "eval_samples": 0},
        temperatures=("temperature", "eval_temperature"),
    )  # fmt: skip
    if not 0.0 < loop.top_p <= 1.0:
        raise ConfigError(f"loop.top_p: must be in (0, 1], got {loop.top_p}")
    if loop.top_k < 0:
        raise ConfigError(f"loop.top_k: must be >= 0, got {loop.top_k}")
    if not (math.isfinite(loop.margin) and loop.margin >= 0):
        raise ConfigError(f"loop.margin: must be >= 0, got {loop.margin}")
    if loop.pairs not in PAIR_MODES:
        raise ConfigError(
            f"loop.pairs: expected one of {', '.join(PAIR_MODES)}, got {loop.pairs!r}"
        )
    if loop.reference not in REFERENCES:
        raise ConfigError(
            f"loop.reference: expected one of {', '.join(REFERENCES)}, got {loop.reference!r}"
        )


@dataclass
class GenEvalConfig:
    prompts: list[str] = setting(
        [],
        "held-out prompt files: sample, judge and log at each eval point of train (train.eval_every) "
        "and at the end ([]: off)",
    )
    judge: str = setting(
        "rules:", "judge: rules:[COLUMN] | python:MODULE:FUNCTION | reward-model:PATH_OR_HUB_ID"
    )
    samples: int = setting(0, "sampled answers per prompt besides the greedy one")
    temperature: float = setting(0.8, "temperature of the sampled answers")
    max_new_tokens: int = setting(64, "longest answer, in tokens")
    seed: int = setting(
        1, "sampling seed (the same answers at every eval point for an unchanged model)"
    )
    batch_size: int = setting(16, "prompts per generation batch")


def check_geneval(spec: GenEvalConfig) -> None:
    """One-line ConfigErrors for values a generation eval cannot use (files are checked when read)."""
    _check_ranges(
        "geneval", spec, floors={"samples": 0, "max_new_tokens": 1, "batch_size": 1},
        temperatures=("temperature",),
    )  # fmt: skip


def _check_ranges(section: str, spec, *, floors: dict[str, int], temperatures: tuple[str, ...]):
    for key, low in floors.items():
        if getattr(spec, key) < low:
            raise ConfigError(f"{section}.{key}: must be >= {low}, got {getattr(spec, key)}")
    for key in temperatures:
        value = getattr(spec, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{section}.{key}: must be > 0 (sampling), got {value}")
