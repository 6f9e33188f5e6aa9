"""Resume checks what it resumes: a run's fingerprint, compared before a checkpoint is continued.

:func:`run_fingerprint` records every setting of the run (the config, flattened to dotted keys) and facts the
trainer measures (``facts.<name>``: model files, tokenizer and data fingerprints, world size, parallelism,
precision, layout; see :func:`model_facts`); :func:`write_fingerprint` stores it as ``fingerprint.json`` in
the run folder. On resume, :func:`check_resume` compares it with the current one and refuses
(:class:`RunFolderError`, exit 2) naming each changed setting (old -> new) and how to proceed, unless forced
(``train.resume=force``); the changes are returned so that the trainer records them.

Which settings may change on resume (:data:`SAFE_CHANGES`): those that decide how often things are logged,
saved or evaluated, where files and caches live, and how memory is used for the same computation. Everything
else that defines the run (model, tokenizer, data and its tokenization, loss and its hyperparameters,
optimizer and schedule, batch geometry, seed, precision, parallelism) must match, because a checkpoint of one
cannot be continued as the other without mixing two runs. ``train.max_steps`` may only grow (train longer):
note that the learning-rate schedule is then recomputed for the new length from the resumed step. Safe
changes are returned too (marked safe), so that every difference is on record.

No torch here: the facts are computed by the caller (or, for model files, by :func:`model_facts`, which only
reads file metadata) so that a refused resume fails in seconds, before any model loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FINGERPRINT_FILE",
    "LATE_FACTS",
    "SAFE_CHANGES",
    "UPWARD_ONLY",
    "Change",
    "RunFolderError",
    "atomic_write",
    "check_resume",
    "compare_fingerprints",
    "model_facts",
    "read_fingerprint",
    "run_fingerprint",
    "write_fingerprint",
]

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
_FINGERPRINT_VERSION = 1

#: Settings that may differ between a run's start and a resume, and why that is safe.
SAFE_CHANGES: dict[str, str] = {
    "log.log_every": "how often metrics are printed",
    "log.progress": "the progress bar",
    "log.tensorboard": "an extra copy of the metrics",
    "log.report_to": "where else the metrics go (trackers)",
    "log.run_name": "the trackers' run name",
    "log.project": "the trackers' project",
    "log.diagnostics": "warnings about the metrics; they change nothing",
    "train.save_every": "when checkpoints are written, not what they hold",
    "train.keep_last": "how many checkpoints are kept",
    "train.save_final": "whether final/ is written",
    "train.eval_every": "when evaluation runs; it does not touch the training state",
    "train.eval_batch_size": "evaluation batching; it does not touch the training state",
    "train.max_steps": "training longer (upward only; the schedule follows the new length)",
    "train.resume": "how this start finds its checkpoint",
    "train.overwrite": "applies to fresh starts only",
    "train.output_dir": "the folder may be moved or renamed",
    "train.skip_nonfinite": "what happens on a non-finite step",
    "train.device": "where the run executes (precision is compared as facts.precision)",
    "train.chunk_size": "memory only: the same log-probs computed in other chunks",
    "train.keep_logits_mb": "memory only: the same logits kept rather than recomputed",
    "train.fsdp_cpu_offload": "memory only: where FSDP keeps the same states",
    "model.gradient_checkpointing": "memory only: the same activations recomputed",
    "data.cache_dir": "where the tokenized data is cached (its content is facts.data)",
    "data.on_drop": "a data change shows in facts.data",
    "reference.cache_dir": "where reference log-probs are cached (their key is facts.reference)",
    "reference.batch_size": "batching of the reference precompute (its result is facts.reference)",
    **{
        f"geneval.{key}": "the generation eval reads the policy; it changes no training state"
        for key in (
            "prompts",
            "judge",
            "samples",
            "temperature",
            "max_new_tokens",
            "seed",
            "batch_size",
        )
    },
}
#: Safe settings that may only grow (None, "no limit", counts as neither smaller nor larger: a change).
UPWARD_ONLY = frozenset({"train.max_steps"})


class RunFolderError(ValueError):
    """The run folder cannot be used as asked; the message says why and what to do (exit 2, one line)."""


@dataclass(frozen=True)
class Change:
    """One setting that differs between the run's start (``old``) and now (``new``)."""

    key: str
    old: Any
    new: Any
    safe: bool

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "old": self.old, "new": self.new, "safe": self.safe}


_MISSING = "(not recorded)"


def _show(value: Any) -> str:
    text = json.dumps(value) if value != _MISSING else value
    if isinstance(value, str) and len(value) >= 32 and value.isalnum():  # a hash
        text = json.dumps(value[:12] + "...")
    return text if len(text) <= 80 else text[:77] + "..."


def _plain(value: Any) -> Any:
    """JSON-normalised: tuples become lists, paths and other objects their str."""
    return json.loads(json.dumps(value, default=str))


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = _plain(value)


def run_fingerprint(config: Any, facts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything that defines a run, as ``{"version", "settings": {dotted key: value}, "facts": {...}}``.

    ``config``: the Config dataclass or ``config_to_dict(cfg)``; nested sections and dict-valued fields are
    flattened to dotted keys (``optim.lr``, ``loss.params.label_smoothing``), so each difference is named.
    ``facts``: what the trainer measured, JSON values (hashes, counts, names), compared as ``facts.<name>``.
    """
    settings: dict[str, Any] = {}
    _flatten(config, "", settings)
    return {
        "version": _FINGERPRINT_VERSION,
        "settings": settings,
        "facts": {str(k): _plain(v) for k, v in (facts or {}).items()},
    }


def _flat(fp: Mapping[str, Any]) -> dict[str, Any]:
    flat = dict(fp.get("settings", {}))
    flat.update({f"facts.{k}": v for k, v in fp.get("facts", {}).items()})
    return flat


def _is_safe(key: str, old: Any, new: Any) -> bool:
    if key not in SAFE_CHANGES:
        return False
    if key in UPWARD_ONLY:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
        return numbers and new >= old
    return True


def compare_fingerprints(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[Change]:
    """Every setting and fact that differs, sorted by key, each marked safe (:data:`SAFE_CHANGES`) or not.

    A key recorded on one side only (a setting added by a newer preftune, a fact not measured then) is a
    change from or to "(not recorded)".
    """
    old, new = _flat(saved), _flat(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a != b:
            changes.append(Change(key, a, b, _is_safe(key, a, b)))
    return changes


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_fingerprint(run_dir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> Path:
    """Store ``fingerprint`` as ``run_dir/fingerprint.json`` atomically (a reader sees old or new)."""
    path = Path(run_dir) / FINGERPRINT_FILE
    atomic_write(path, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    return path


def read_fingerprint(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The stored fingerprint, None when there is none; :class:`RunFolderError` when it is unreadable."""
    path = Path(run_dir) / FINGERPRINT_FILE
    try:
        fp = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunFolderError(
            f"{path}: unreadable ({e}); cannot tell which settings this run was started with. "
            "Resume anyway with train.resume=force, or use a new train.output_dir"
        ) from None
    if not isinstance(fp, dict) or not isinstance(fp.get("settings"), dict):
        raise RunFolderError(f"{path}: not a run fingerprint; resume with train.resume=force")
    return fp


#: Facts measured only once the models are loaded (the layout the setup probe picks, the precomputed
#: reference's key): compared in a second, late check (``late=True``), after the cheap first one.
LATE_FACTS = frozenset({"facts.layout", "facts.reference"})


def check_resume(
    run_dir: str | os.PathLike, current: Mapping[str, Any], *, force: bool, late: bool = False
) -> list[Change]:
    """Compare the run's stored fingerprint with ``current`` before resuming it.

    Returns every change (safe ones and, when ``force``, the others) for the trainer to record. Raises
    :class:`RunFolderError` naming each unsafe change (old -> new) and how to proceed when not ``force``.
    A folder without a fingerprint (a run started before fingerprints) resumes with a warning. The caller
    writes ``current`` afterwards (:func:`write_fingerprint`), so the next resume compares with it.
    ``late=False`` compares everything but :data:`LATE_FACTS`; ``late=True`` only those.
    """
    run_dir = Path(run_dir)
    try:
        saved = read_fingerprint(run_dir)
    except RunFolderError:
        if not force:
            raise
        if not late:
            log.warning(
                "resuming %s without comparing settings: its fingerprint is unreadable", run_dir
            )
        return []
    if saved is None:
        if not late:
            log.warning(
                "%s has no %s: resuming without comparing settings", run_dir, FINGERPRINT_FILE
            )
        return []
    changes = [c for c in compare_fingerprints(saved, current) if (c.key in LATE_FACTS) == late]
    blocking = [c for c in changes if not c.safe]
    if blocking and not force:
        raise RunFolderError(
            f"{run_dir} holds a run started with other settings: {'; '.join(map(str, blocking))}. "
            "To start a new run with these settings, use another train.output_dir (or "
            "train.resume=never train.overwrite=true to replace this run); to continue this one with "
            "them, set train.resume=force (the changes are recorded in metrics.jsonl and report.json)"
        )
    for c in changes:
        if c.safe:
            log.info("resume: %s (allowed)", c)
        else:
            log.warning("resume: %s (forced)", c)
    return changes


# ---------------------------------------------------------------------------------------------------
# Model facts

#: Files of a model folder that hold weights (or, for config.json, define what they mean).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5")


def model_facts(source: Any) -> dict[str, Any]:
    """A cheap fingerprint of a model's files, read from file metadata only (no weights are read).

    ``source``: a :class:`preftune.model.ModelSource` (``name_or_path``, ``revision``, ``gguf_file``,
    ``local``). A local folder: the hash of its ``config.json`` and, per weight file, its size and
    modification time (whole seconds: a model overwritten in place by one of the same shape differs in
    time). A Hub id: the cached snapshot's commit and each weight file's size and content hash (the cache's
    blob name), so a re-download of the same revision is the same model; ``{"hub": id}`` alone when it is
    not in the local cache (then the loader fails anyway). The path itself is a setting (``model.path``).
    """
    folder = Path(source.name_or_path).expanduser()
    facts: dict[str, Any] = {}
    if not source.local:
        folder = _hub_snapshot(source.name_or_path, source.revision)
        facts["hub"] = source.name_or_path
        if folder is None:
            return facts
        facts["commit"] = folder.name
    config = folder / "config.json"
    if config.is_file():
        facts["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
    files = {}
    names = [source.gguf_file] if source.gguf_file else sorted(os.listdir(folder))
    for name in names:
        path = folder / name
        if not name.endswith(_WEIGHT_SUFFIXES) or not path.is_file():
            continue
        st = path.stat()
        if source.local:
            files[name] = [st.st_size, int(st.st_mtime)]
        else:  # a Hub cache snapshot links to blobs named by their content hash
            files[name] = [st.st_size, Path(os.path.realpath(path)).name]
    facts["files"] = files
    return facts


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local Hub cache folder of ``repo_id`` at ``revision`` (None when not cached); no network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None
