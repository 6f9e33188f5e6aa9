"""The ``data`` section of the run config: `DataConfig`, its `SourceConfig` entries, and their checks.

Imported by :mod:`preftune.config` (which re-exports both classes), so it imports nothing heavy.

Two ways to name training data, used together when both are given (``train_files`` first):

- ``train_files``: paths, globs or Hub dataset ids (``org/name``: its ``train`` split, or its only one), all
  records, read with the section's own format, shape and column names;
- ``sources``: a list of `SourceConfig` entries, each with its own format, shape and columns (``null``:
  the section's), a Hub ``config`` / ``split`` / ``revision``, and ``fraction`` / ``max_rows`` to take a
  seeded sample of its records: the mixture.

``eval_files`` / ``eval_sources`` name held-out data the same way; ``eval_fraction`` splits the training
records instead (one or the other: an override of either clears the other, see `EXCLUSIVE`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from preftune._configio import ConfigError, setting, suggest

__all__ = [
    "EXCLUSIVE",
    "FORMAT_CHOICES",
    "SHAPE_CHOICES",
    "DataConfig",
    "SourceConfig",
    "check_data",
    "check_examples",
]

FORMAT_CHOICES = ("auto", "jsonl", "json", "csv", "parquet", "arrow")
SHAPE_CHOICES = ("auto", "standard", "conversational", "implicit", "unpaired")
PAIR_SHAPES = ("standard", "conversational", "implicit")
#: Pairs of keys that cannot both be set: an override of one clears the other (the later setting wins).
EXCLUSIVE = (("data.eval_files", "data.eval_fraction"), ("data.eval_sources", "data.eval_fraction"))


@dataclass
class SourceConfig:
    path: str = setting(
        "",
        "a file, glob or saved-dataset folder, or a Hub dataset id org/name (offline: its cache)",
    )
    config: str | None = setting(None, "Hub dataset configuration (load_dataset's name)")
    split: str | None = setting(
        None,
        "split of a Hub dataset or DatasetDict folder (default: train; for eval: validation, eval or "
        "test; or the only split)",
    )
    revision: str | None = setting(None, "Hub dataset revision: branch, tag or commit")
    fraction: float | None = setting(
        None, "use this share of the source's records, in (0, 1] (a sample seeded by train.seed)"
    )
    max_rows: int | None = setting(
        None, "use at most this many of its records (a sample seeded by train.seed)"
    )
    format: str | None = setting(None, "as data.format (null: data.format)")
    shape: str | None = setting(None, "as data.shape (null: data.shape)")
    prompt_column: str | None = setting(None, "null: data.prompt_column")
    chosen_column: str | None = setting(None, "null: data.chosen_column")
    rejected_column: str | None = setting(None, "null: data.rejected_column")
    completion_column: str | None = setting(None, "null: data.completion_column")
    label_column: str | None = setting(None, "null: data.label_column")
    weight_column: str | None = setting(None, "null: data.weight_column; '' for none")
    system_column: str | None = setting(None, "null: data.system_column; '' for none")
    tools_column: str | None = setting(None, "null: data.tools_column; '' for none")


@dataclass
class DataConfig:
    train_files: list[str] = setting(
        [],
        "training files or globs (jsonl, json, csv, parquet, datasets folder) or Hub dataset ids "
        "org/name",
    )
    sources: list[SourceConfig] = setting(
        [],
        "more training sources, mixed in after train_files, each {path, fraction, max_rows, config, "
        "split, revision, format, shape, *_column}; null fields take this section's value",
    )
    eval_files: list[str] = setting(
        [], "evaluation files, globs or Hub ids (default: split eval_fraction off train)"
    )
    eval_sources: list[SourceConfig] = setting([], "more evaluation sources, entries as in sources")
    eval_fraction: float = setting(
        0.0, "share of train records held out for evaluation when no eval_files / eval_sources"
    )
    format: str = setting("auto", "auto | jsonl | json | csv | parquet | arrow")
    shape: str = setting(
        "auto",
        "auto | standard | conversational | implicit (pairs) | unpaired (rows of prompt, completion, "
        "label; auto detects them: completion and label columns, no chosen / rejected)",
    )
    prompt_column: str = setting("prompt", "column holding the prompt")
    chosen_column: str = setting("chosen", "column holding the preferred response")
    rejected_column: str = setting("rejected", "column holding the dispreferred response")
    completion_column: str = setting("completion", "unpaired rows: column holding the completion")
    label_column: str = setting(
        "label",
        "unpaired rows: column saying whether the completion is desirable (true/false, 1/0, "
        "desirable/undesirable, good/bad, thumbs_up/thumbs_down)",
    )
    unpair: bool = setting(
        False,
        "turn each pair into two unpaired rows, (prompt, chosen) desirable and (prompt, rejected) "
        "undesirable, for loss.name=kto",
    )
    weight_column: str | None = setting(None, "optional per-pair weight column")
    system_column: str | None = setting(
        "system", "optional column with a system message for message prompts (used where present)"
    )
    tools_column: str | None = setting(
        "tools",
        "optional column with tool definitions (JSON schemas, or JSON text) passed to the chat "
        "template (used where present)",
    )
    max_length: int = setting(1024, "max tokens of prompt + one response")
    max_prompt_length: int | None = setting(
        512, "max prompt tokens (truncated before the responses)"
    )
    prompt_truncation: str = setting(
        "left", "left keeps the end of a long prompt, right keeps its start"
    )
    add_eos: bool = setting(True, "append EOS to string responses")
    on_drop: str = setting("count", "count | error: what to do with pairs dropped by policy")
    cache_dir: str | None = setting(
        None, "tokenized-data cache (default $PREFTUNE_CACHE or ~/.cache/preftune)"
    )
    group_by_length: bool = setting(False, "batch pairs of similar length to cut padding")


def check_data(data: DataConfig) -> None:
    """The data keys' cross-field checks: one `ConfigError` naming the key."""
    held_out = [k for k in ("eval_files", "eval_sources") if getattr(data, k)]
    if data.eval_fraction > 0 and held_out:
        raise ConfigError(
            f"data.{held_out[0]} and data.eval_fraction: set one (held-out data, or a share of the "
            f"training records); data.eval_fraction=0 clears the fraction"
        )
    for name in ("sources", "eval_sources"):
        for i, src in enumerate(getattr(data, name)):
            _check_source(src, f"data.{name}[{i}]")


def check_examples(data: DataConfig, unpaired_loss: bool, loss: str) -> None:
    """The loss/data cross-check: an unpaired loss (kto) reads unpaired rows, a pair loss reads pairs.

    Only what the config says is checked here (``data.shape`` auto is decided per file when loading)."""
    shapes = [("data.shape", data.shape)] + [
        (f"data.{name}[{i}].shape", src.shape)
        for name in ("sources", "eval_sources")
        for i, src in enumerate(getattr(data, name))
    ]
    if unpaired_loss:
        if data.unpair:
            return
        for key, shape in shapes:
            if shape in PAIR_SHAPES:
                raise ConfigError(
                    f"{key}: {shape!r} reads pairs, but loss.name={loss} trains on unpaired rows; "
                    "set it to unpaired (or auto) for rows of prompt, completion and label, or set "
                    "data.unpair=true to split each pair into a desirable and an undesirable row"
                )
        return
    if data.unpair:
        raise ConfigError(
            f"data.unpair: true makes unpaired rows, but loss.name={loss} trains on pairs; "
            "use loss.name=kto or set data.unpair=false"
        )
    for key, shape in shapes:
        if shape == "unpaired":
            raise ConfigError(
                f"{key}: unpaired rows need an unpaired loss (loss.name=kto); loss.name={loss} "
                "trains on pairs (chosen / rejected)"
            )


def _check_source(src: SourceConfig, key: str) -> None:
    if not src.path.strip():
        raise ConfigError(f"{key}.path: give a file, glob, folder or Hub dataset id")
    for name, choices in (("format", FORMAT_CHOICES), ("shape", SHAPE_CHOICES)):
        value = getattr(src, name)
        if value is not None and value not in choices:
            raise ConfigError(
                f"{key}.{name}: expected one of {', '.join(choices)} or null, got {value!r}"
                f"{suggest(str(value), choices)}"
            )
    for name in (
        "prompt_column",
        "chosen_column",
        "rejected_column",
        "completion_column",
        "label_column",
    ):
        if getattr(src, name) == "":
            raise ConfigError(f"{key}.{name}: give a column name (or null for data.{name})")
    if src.fraction is not None and not (math.isfinite(src.fraction) and 0 < src.fraction <= 1):
        raise ConfigError(f"{key}.fraction: must be in (0, 1] or null, got {src.fraction}")
    if src.max_rows is not None and src.max_rows < 1:
        raise ConfigError(f"{key}.max_rows: must be >= 1 or null, got {src.max_rows}")
