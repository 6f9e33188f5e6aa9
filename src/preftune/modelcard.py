"""The model card (``README.md``) written into a run's ``final/`` folder, as the Hub expects one.

It says what the folder is and how to make it again: the base model, the data files and their
fingerprints, the loss and its hyperparameters, the optimizer and schedule, the steps trained, the final
eval metrics, the preftune version, and the command that reproduces the run (the resolved config is saved
beside it as ``preftune_config.yaml``). The YAML front matter carries the Hub's metadata fields
(``base_model``, ``library_name``, ``tags``, ``datasets`` for Hub ids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from preftune.config import Config, config_to_dict

__all__ = ["CONFIG_FILE", "write_model_card"]

#: The resolved config saved beside the card (``preftune train final/preftune_config.yaml`` reruns it).
CONFIG_FILE = "preftune_config.yaml"


def _is_hub_id(text: str) -> bool:
    return "/" in text and not Path(text).expanduser().exists() and not text.startswith((".", "/"))


def _table(metrics: dict[str, float]) -> list[str]:
    if not metrics:
        return ["(no eval split)"]
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    return rows


def write_model_card(
    folder: Path,
    cfg: Config,
    *,
    steps: int,
    final_eval: dict[str, float],
    data_fingerprint: str,
    drops: dict[str, int],
) -> Path:
    """Write ``README.md`` and ``preftune_config.yaml`` into ``folder``; returns the card's path."""
    from preftune import __version__

    folder = Path(folder)
    resolved = config_to_dict(cfg)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    m, loss = cfg.model, cfg.loss
    base = m.path + (f" ({m.gguf_file})" if m.gguf_file else "")
    base += f" @ {m.revision}" if m.revision else ""
    files = list(cfg.data.train_files) + [s.path for s in getattr(cfg.data, "sources", []) or []]
    front: dict[str, Any] = {
        "library_name": "peft" if m.lora.enabled else "transformers",
        "tags": ["preftune", *loss.name, *(["lora"] if m.lora.enabled else [])],
    }
    if m.path:
        front["base_model"] = m.path
    hub_data = [f for f in files if _is_hub_id(str(f))]
    if hub_data:
        front["datasets"] = hub_data
    hparams = {"beta": loss.beta, **loss.params}
    options = {
        k: v
        for k, v in (
            ("ld_alpha", loss.ld_alpha),
            ("wpo_weighting", loss.wpo_weighting or None),
            ("reference.sync", None if cfg.reference.sync.mode == "none" else cfg.reference.sync),
        )
        if v is not None
    }
    o = cfg.optim
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {folder.parent.name}",
        "",
        f"Preference-tuned from `{base or '(a model given in memory)'}` with preftune {__version__}.",
        "",
        "## Training",
        f"- loss: `{', '.join(loss.name)}`"
        + (f" (weights {loss.weights})" if loss.weights else "")
        + f"; hyperparameters {hparams}"
        + (f"; options {options}" if options else ""),
        f"- reference: `{cfg.reference.strategy}`",
        f"- optimizer: AdamW, lr {o.lr}, {o.scheduler} schedule, warm-up "
        f"{o.warmup_steps if o.warmup_steps is not None else f'{o.warmup_ratio:.0%}'}, "
        f"weight decay {o.weight_decay}, grad clip {o.max_grad_norm}",
        f"- batch: {cfg.train.batch_size} pairs x {cfg.train.grad_accum} accumulation per device; "
        f"{steps} optimizer steps; seed {cfg.train.seed}",
        f"- LoRA: r {m.lora.r}, alpha {m.lora.alpha}, targets {m.lora.target_modules}"
        if m.lora.enabled
        else "- full fine-tuning (fp32 master weights)",
        "",
        "## Data",
        *(f"- `{f}`" for f in files),
        f"- tokenized data fingerprint: `{data_fingerprint}`; pairs dropped: {drops or 'none'}",
        "",
        "## Final evaluation",
        *_table(final_eval),
        "",
        "## Reproduce",
        "```bash",
        f"pip install 'preftune=={__version__}'",
        f"preftune train {CONFIG_FILE}   # the resolved config of this run, saved beside this card",
        "```",
        "",
    ]
    card = folder / "README.md"
    card.write_text("\n".join(lines), encoding="utf-8")
    return card
