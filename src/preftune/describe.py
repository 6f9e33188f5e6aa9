"""What ``preftune data`` reports: a dataset loaded and tokenized exactly as training would, described.

With a tokenizer (`describe_dataset`): rows read and kept, rows per source after mixing, drops per reason,
truncations, token-length percentiles, the padding share at the configured batch size (right padding), a few
rendered examples with the response tokens in ⟦brackets⟧, and warnings (plain-text prompts for a model with a
chat template). Without one (`check_dataset`): every record validated, the schema, bad rows with file, line and
field, and character-length percentiles.

Unpaired rows (KTO, `preftune.data.unpaired`): the same report per row (the completion and its KL row in
place of chosen and rejected), plus the desirable:undesirable counts, their ratio, and the KTO paper's
weighting rule (§4.2: keep λ_D·n_D / (λ_U·n_U) in [1, 4/3]) as the weight to set when it does not hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "check_dataset",
    "describe_dataset",
    "format_check",
    "format_description",
    "label_lines",
]

_FIELDS = ("prompt", "chosen", "rejected")
_ROW_NAMES = {"prompt": "prompt", "chosen": "completion", "rejected": "KL row"}
_PERCENTILES = (50, 90, 99)
_OPEN, _CLOSE = "⟦", "⟧"


def check_dataset(cfg: Any, max_bad: int = 20) -> dict[str, Any]:
    """Validate ``cfg.data`` without a tokenizer (see `preftune.data.check`)."""
    from preftune.data.check import check_records

    report = check_records(cfg.data, seed=cfg.train.seed, max_bad=max_bad)
    report["label_weights"] = _weights(cfg) if report["unpaired"] else None
    return report


def describe_dataset(cfg: Any, tokenizer: Any, examples: int = 3) -> dict[str, Any]:
    """Load ``cfg.data`` with ``tokenizer`` (through the tokenized-data cache) and describe it.

    Raises ``preftune.data.DataError`` for malformed data, as training would.
    """
    from preftune.data import (
        DROP_REASONS,
        batch_indices,
        load_preference_data,
        padding_share,
        pair_lengths,
        row_lengths,
    )

    kto = _kto(cfg)
    data = load_preference_data(
        cfg.data, tokenizer, seed=cfg.train.seed, warn=False, unpaired=True if kto else None
    )
    train, eval_ = data.train, data.eval
    n_train, n_eval = len(train), (len(eval_) if eval_ is not None else 0)
    lengths = _token_lengths(train)
    if data.unpaired:
        lengths = {_ROW_NAMES.get(k, k): v for k, v in lengths.items()}

    padding: dict[str, Any] = {
        "batch_size": cfg.train.batch_size,
        "group_by_length": cfg.data.group_by_length,
    }
    if n_train:
        rows, pairs = row_lengths(train), pair_lengths(train)

        def share(grouped: bool) -> float:
            batches = batch_indices(
                pairs, cfg.train.batch_size, seed=cfg.train.seed, epoch=0, group_by_length=grouped
            )
            return padding_share(batches, rows)

        padding["share"] = share(cfg.data.group_by_length)
        padding["share_other"] = share(not cfg.data.group_by_length)

    return {
        "train_files": list(cfg.data.train_files) + [s.path for s in cfg.data.sources],
        "eval_files": list(cfg.data.eval_files) + [s.path for s in cfg.data.eval_sources],
        "sources": data.sources,
        "warnings": data.warnings,
        "shapes": dict(data.shapes),
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "rows_read": data.rows_read,
        "rows_kept": n_train + n_eval,
        "train_pairs": n_train,
        "eval_pairs": n_eval,
        "drops": {reason: int(data.drops.get(reason, 0)) for reason in DROP_REASONS}
        | {k: int(v) for k, v in data.drops.items() if k not in DROP_REASONS},
        "truncations": {k: int(v) for k, v in data.truncations.items()},
        "lengths": {name: _stats(values) for name, values in lengths.items()},
        "padding": padding,
        "examples": [_render(train[i], tokenizer) for i in range(min(examples, n_train))],
        "cache_path": data.cache_path,
        "unpaired": data.unpaired,
        "labels": data.labels.get("train") if data.unpaired else None,
        "label_weights": _weights(cfg) if data.unpaired else None,
    }


def _kto(cfg: Any) -> bool:
    from preftune.losses import UNPAIRED_LOSSES

    return any(name in UNPAIRED_LOSSES for name in cfg.loss.name)


def _weights(cfg: Any) -> tuple[float, float]:
    """(λ_D, λ_U) as configured for kto (1, 1 for another loss)."""
    params = cfg.loss.params if _kto(cfg) else {}
    return (
        float(params.get("desirable_weight", 1.0)),
        float(params.get("undesirable_weight", 1.0)),
    )


def label_lines(labels: dict[str, int], weights: tuple[float, float] = (1.0, 1.0)) -> list[str]:
    """The desirable:undesirable counts and ratio, and the KTO paper's weighting advice (§4.2)."""
    from preftune.data.unpaired import ratio_text, weight_advice

    n_d, n_u = labels["desirable"], labels["undesirable"]
    ratio = ratio_text(n_d, n_u)
    lines = [f"labels:    {n_d} desirable : {n_u} undesirable ({ratio})"]
    if n_d == 0 or n_u == 0:
        missing = "desirable" if n_d == 0 else "undesirable"
        lines.append(
            f"weights:   no {missing} rows: KTO learns from both kinds, and the paper's rule "
            "(λ_D·n_D / (λ_U·n_U) in [1, 4/3]) cannot hold"
        )
        return lines
    advice = weight_advice(n_d, n_u, *weights)
    shown = f"desirable_weight {weights[0]:g}, undesirable_weight {weights[1]:g}"
    lines.append(
        f"weights:   λ_D·n_D / (λ_U·n_U) = {advice['ratio']:.3g} with {shown}; the KTO paper "
        "(§4.2) keeps it in [1, 4/3]"
    )
    if advice["ok"]:
        lines.append("           within the range: no change needed")
    else:
        other = "undesirable_weight" if advice["key"] == "desirable_weight" else "desirable_weight"
        lines.append(
            f"           with {ratio} data set loss.params.{advice['key']}≈"
            f"{_num(advice['low'])}–{_num(advice['high'])} (and {other} 1)"
        )
    return lines


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def _token_lengths(dataset: Any) -> dict[str, np.ndarray]:
    """Token counts per pair: prompt, chosen, rejected, and the longer row (prompt + longer response)."""
    if len(dataset) == 0:
        lens = {f: np.zeros(0, dtype=np.int64) for f in _FIELDS}
    else:
        import pyarrow.compute as pc

        table = dataset.with_format("arrow")[:]  # list lengths straight from Arrow, no Python lists
        lens = {
            f: pc.list_value_length(table[f"{f}_ids"])
            .to_numpy(zero_copy_only=False)
            .astype(np.int64)
            for f in _FIELDS
        }
    lens["longer row"] = lens["prompt"] + np.maximum(lens["chosen"], lens["rejected"])
    return lens


def _stats(values: np.ndarray) -> dict[str, int | None]:
    from preftune.data.check import percentiles

    return percentiles(values)


def _render(example: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return {
        "index": int(example.get("index", -1)),
        "weight": float(example.get("weight", 1.0)),
        "label": example.get("label"),
        **{f"{f}_tokens": len(example[f"{f}_ids"]) for f in _FIELDS},
        **{f: decode(example[f"{f}_ids"]) for f in _FIELDS},
    }


# ---------------------------------------------------------------------------------------------------
# Text


def _clip(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    return "…" + text[-limit:] if keep_end else text[:limit] + "…"


def format_description(d: dict[str, Any], *, max_chars: int = 400) -> str:
    """Plain-text report of :func:`describe_dataset`'s dict (no ANSI codes)."""
    out = []
    files = ", ".join(d["train_files"]) or "-"
    shapes = sorted(set(d["shapes"].values()))
    out.append(f"data:      {files}" + (f"  (shape: {', '.join(shapes)})" if shapes else ""))
    if d["eval_files"]:
        out.append(f"eval data: {', '.join(d['eval_files'])}")
    out.extend(f"warning:   {w}" for w in d.get("warnings", []))
    out.append(
        f"limits:    max_length {d['max_length']}, max_prompt_length {d['max_prompt_length']}"
    )
    kind = " unpaired rows" if d.get("unpaired") else ""
    out.append(
        f"rows:      {d['rows_read']} read -> {d['rows_kept']} kept{kind} "
        f"({d['train_pairs']} train, {d['eval_pairs']} eval)"
    )
    dropped = sum(d["drops"].values())
    unit = "rows" if d.get("unpaired") else "pairs"
    out.append(f"dropped:   {dropped}" + (f" {unit}, by reason:" if dropped else ""))
    for reason, count in d["drops"].items():
        if dropped:
            out.append(f"  {reason:<34} {count:>8}")
    unit = "rows" if d.get("unpaired") else "pairs"
    cut = {k: v for k, v in d["truncations"].items() if v}
    out.append(
        "truncated: " + (", ".join(f"{k} in {v} {unit}" for k, v in cut.items()) if cut else "none")
    )
    if d.get("labels") is not None:
        out.extend(label_lines(d["labels"], d.get("label_weights") or (1.0, 1.0)))
    sources = d.get("sources", [])
    if len(sources) > 1 or any(x["selected"] != x["records"] for x in sources):
        out.append("")
        out.extend(_source_rows(sources, pairs=True))

    out.append("")
    out.append(f"tokens per {unit[:-1]} (train, n={d['train_pairs']})")
    out.extend(_length_rows(d["lengths"]))

    pad = d["padding"]
    if "share" in pad:
        grouped = pad["group_by_length"]
        out.append("")
        out.append(
            f"padding:   {pad['share']:.1%} of token slots at batch_size {pad['batch_size']} "
            f"(right padding, group_by_length={str(grouped).lower()}); "
            f"group_by_length={str(not grouped).lower()} would give {pad['share_other']:.1%}"
        )
        out.append(
            "           (padded layout; the shared-prompt layout, used where the model supports it, "
            "packs each batch in one row and pads nothing)"
        )

    if d["examples"]:
        out.append("")
        out.append(f"examples (response tokens in {_OPEN}{_CLOSE}; prompt shown once):")
    for i, ex in enumerate(d["examples"], 1):
        weight = f", weight {ex['weight']:g}" if ex["weight"] != 1.0 else ""
        if ex.get("label") is not None:
            out.append(
                f"--- example {i}: row {ex['index']}, "
                f"{'desirable' if ex['label'] else 'undesirable'}, prompt {ex['prompt_tokens']} "
                f"tokens, completion {ex['chosen_tokens']}, KL row {ex['rejected_tokens']}{weight}"
            )
        else:
            out.append(
                f"--- example {i}: pair {ex['index']}, prompt {ex['prompt_tokens']} tokens, "
                f"chosen {ex['chosen_tokens']}, rejected {ex['rejected_tokens']}{weight}"
            )
        prompt = _clip(ex["prompt"], max_chars, keep_end=True)
        out.append(f"{prompt}{_OPEN}{_clip(ex['chosen'], max_chars)}{_CLOSE}")
        second = "KL row:" if ex.get("label") is not None else "rejected:"
        out.append(f"{second} {_OPEN}{_clip(ex['rejected'], max_chars)}{_CLOSE}")
    if d["train_pairs"] == 0:
        out.append("")
        out.append(f"no training {unit} kept: check the drops above and data.max_length")
    if d.get("cache_path"):
        out.append("")
        out.append(f"tokenized cache: {d['cache_path']}")
    return "\n".join(out)


def _length_rows(lengths: dict[str, dict[str, int | None]]) -> list[str]:
    cols = [*(f"p{q}" for q in _PERCENTILES), "max"]
    rows = [f"  {'':<12}" + "".join(f"{c:>8}" for c in cols)]
    for name, stats in lengths.items():
        cells = ["-" if stats[c] is None else str(stats[c]) for c in cols]
        rows.append(f"  {name:<12}" + "".join(f"{c:>8}" for c in cells))
    return rows


def _source_rows(sources: list[dict[str, Any]], *, pairs: bool) -> list[str]:
    """The rows-per-source table (after mixing)."""
    width = max([len("source"), *(len(x["name"]) for x in sources)])
    cols = ["records", "selected", *(("train", "eval", "dropped") if pairs else ())]
    rows = [
        "rows per source (after mixing):",
        f"  {'source':<{width}}  role " + "".join(f"{c:>9}" for c in cols),
    ]
    for x in sources:
        cells = "".join(f"{x[c]:>9}" for c in cols)
        rows.append(f"  {x['name']:<{width}}  {x['role']:<5}" + cells)
    return rows


def format_check(d: dict[str, Any]) -> str:
    """Plain-text report of :func:`check_dataset`'s dict."""
    out = []
    for f in d["files"]:
        head = f"{f['role']} file: {f['name']}  ({f['format']}"
        out.append(head + (f", shape {f['shape']})" if f["shape"] else ")"))
        if f["error"]:
            out.append(f"  error: {f['error']}")
        if f["types"]:
            out.append("  schema: " + ", ".join(f"{k}: {v}" for k, v in f["types"].items()))
        elif f["columns"]:
            out.append("  columns: " + ", ".join(f["columns"]))
        kept = f", {f['selected']} kept by the mixture" if f["sampled"] else ""
        out.append(f"  records: {f['records']} read{kept}, {f['valid']} valid, {f['bad']} bad")
    if len(d["sources"]) > 1 or any(x["selected"] != x["records"] for x in d["sources"]):
        out.append("")
        out.extend(_source_rows(d["sources"], pairs=False))
    if d["bad_rows"]:
        out.append("")
        shown = len(d["bad_rows"])
        out.append(
            f"bad rows ({d['bad']}" + (f", first {shown} shown" if shown < d["bad"] else "") + "):"
        )
        out.extend(f"  {line}" for line in d["bad_rows"])
    if d.get("labels") is not None:
        out.append("")
        out.extend(label_lines(d["labels"], d.get("label_weights") or (1.0, 1.0)))
    if d["valid"]:
        out.append("")
        unit = "row" if d.get("unpaired") else "pair"
        out.append(f"characters per {unit} (valid records, n={d['valid']})")
        out.extend(_length_rows(d["lengths"]))
    out.append("")
    out.append(
        "no tokenizer: records checked, not tokenized (pass --tokenizer DIR or model.path=DIR for token "
        "lengths, drops, padding and rendered examples)"
    )
    return "\n".join(out)
