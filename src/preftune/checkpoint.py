"""Checkpoints that survive a kill: everything needed to resume bitwise, written atomically.

Layout (one folder per optimizer step, zero-padded so names sort by step)::

    run_dir/checkpoints/step-00000123/
        model.safetensors   model state dict; tensors that share storage (tied embeddings) stored once
        optimizer.pt        optimizer.state_dict()
        scheduler.pt        scheduler.state_dict()
        rng.pt              python random, numpy, torch CPU (+ CUDA) generator states
        state.json          TrainState: step counters, data position, reference cache key, extras
        COMPLETE            written last: a folder without it is never a checkpoint. Its content is the
                            manifest: the step and, for every other file, its size and CRC-32
        dcp/                FSDP runs only, instead of model.safetensors and optimizer.pt: every rank's
                            shards (torch.distributed.checkpoint), see preftune.distributed

Why a temporary folder and a rename: a SIGKILL (OOM killer, pre-emption) can land anywhere in a save. All
files go into ``checkpoints/.tmp-step-00000123-<pid>/``, each is fsynced, and only then is the folder renamed
into place -- a directory rename is atomic on POSIX, so the latest complete checkpoint is always either the
old one or the new one, never a half-written one. Stale temporary folders of dead processes are removed by
the next save. Old checkpoints are pruned only after the new one is in place.

Finding checkpoints, verifying them against their manifest and falling back from a corrupt one
(:func:`load_latest_valid`) live in :mod:`preftune.checkpoint_files`; its names are importable from here too.
Capturing and restoring the RNG states, and what training changes in a model (with LoRA: the adapters
only), live in :mod:`preftune.checkpoint_state`.

A save makes its checkpoint the latest: checkpoints of a *higher* step (an abandoned continuation, e.g. one
skipped as corrupt at resume, or one after an explicit ``train.resume=PATH``) are removed with the pruning,
so that pruning can never remove the checkpoint just written. A save that runs out of disk space removes its
partial folder and raises :class:`DiskFullError` ("no space left on <path>"); the previous checkpoints are
untouched.

Distributed use: only rank 0 calls :func:`save_checkpoint` (it runs no collective). Under DDP every rank
holds the full state, so rank 0 saves its own; under FSDP the ranks first write their shards into rank 0's
:func:`staging_dir`, which rank 0 then completes with ``staged_dir=``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.checkpoint_files import (
    CHECKPOINTS_DIR,
    COMPLETE,
    MODEL,
    STATE,
    CheckpointError,
    DiskFullError,
    build_manifest,
    checkpoint_dir_name,
    find_resumable,
    is_disk_full,
    json_read,
    latest_checkpoint,
    list_checkpoints,
    load_latest_valid,
    load_model_state_dict,
    load_weights_file,
    read_file,
    save_model_file,
    step_of,
    torch_read,
    verify_checkpoint,
    verify_once,
)
from preftune.checkpoint_state import (
    _changing_state,
    _load_changing_state,
    capture_rng_state,
    restore_rng_state,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "CheckpointError",
    "DiskFullError",
    "TrainState",
    "capture_rng_state",
    "checkpoint_dir_name",
    "find_resumable",
    "is_disk_full",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_valid",
    "load_model_state_dict",
    "restore_rng_state",
    "save_checkpoint",
    "staging_dir",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

_OPTIMIZER = "optimizer.pt"
_SCHEDULER = "scheduler.pt"
_RNG = "rng.pt"
_FORMAT_VERSION = 1
_TMP_RE = re.compile(r"^\.tmp-.*-(\d+)$")


@dataclass
class TrainState:
    """Counters and positions that, with the model/optimizer/scheduler/RNG states, define where a run is.

    ``batch_in_epoch`` is the index of the *next* micro-batch in the epoch's batch list, so a resumed run
    rebuilds the epoch's (seeded) order and skips that many micro-batches. ``reference_key`` is the hash key
    of the precomputed reference log-prob cache, so a resume reuses exactly the same reference. ``extra``
    holds anything else JSON-serialisable the trainer wants back (e.g. the data-order seed).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    pairs_seen: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    reference_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Build from ``state.json`` content; unknown keys (a newer writer) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------------------------------------------
# Atomic writing


def _fsync_path(path: Path) -> None:
    """fsync a file or directory so the data (or the rename) survives a crash, not only a kill.

    A file's fsync error (ENOSPC, EIO: data that never reached the disk) is raised; a directory's is not
    (some filesystems refuse fsync on directories).
    """
    is_dir = path.is_dir()
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if not is_dir:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def _write_file(path: Path, writer: Callable[[Path], None]) -> None:
    """Write one file of a checkpoint with ``writer(path)`` and fsync it (a seam for the kill test)."""
    writer(path)
    _fsync_path(path)


def _torch_writer(obj: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        # Through an unbuffered Python file: a failed write (ENOSPC) then reaches us as an OSError in the
        # exception chain; torch.save(obj, path) reports only "unexpected pos".
        with open(path, "wb", buffering=0) as f:
            torch.save(obj, f)

    return write


def _text_writer(text: str) -> Callable[[Path], None]:
    return lambda p: p.write_text(text, encoding="utf-8")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_tmp(ckpt_root: Path, keep: Path | None = None) -> None:
    """Remove ``.tmp-*`` folders left by a killed save (ours, or of a process that no longer runs)."""
    for p in ckpt_root.iterdir():
        m = _TMP_RE.match(p.name)
        if not m or not p.is_dir() or p == keep:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _remove_dir(ckpt_root: Path, p: Path) -> None:
    """Delete a checkpoint folder: rename it to ``.tmp-*`` first so a kill mid-delete leaves no husk."""
    doomed = ckpt_root / f".tmp-del-{p.name}-{os.getpid()}"
    os.rename(p, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Public API


def staging_dir(run_dir: str | Path, step: int, pid: int | None = None) -> Path:
    """The temporary folder a save of ``step`` by process ``pid`` (default: this one) writes into."""
    pid = os.getpid() if pid is None else pid
    return Path(run_dir) / CHECKPOINTS_DIR / f".tmp-{checkpoint_dir_name(step)}-{pid}"


def save_checkpoint(
    run_dir: str | Path,
    state: TrainState,
    *,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    keep_last: int,
    model_state_dict: dict[str, torch.Tensor] | None = None,
    optimizer_state_dict: dict[str, Any] | None = None,
    extra_state_dicts: dict[str, dict[str, torch.Tensor]] | None = None,
    staged_dir: Path | None = None,
) -> Path:
    """Write a checkpoint for ``state.step`` atomically; keep the newest ``keep_last``; return its folder.

    RNG states are captured here, so call it at a step boundary, after the optimizer step and before the
    next draw. Given state dicts take precedence over ``model``/``optimizer`` (already gathered by the
    distributed layer; call on rank 0 only). A ``None`` optimizer/scheduler is simply not saved.
    ``staged_dir``: the :func:`staging_dir` of this process that other ranks already wrote their shards into
    (FSDP's distributed checkpoint); it is completed and renamed into place, with no model file of its own
    unless a model or state dict is given. ``extra_state_dicts``: other weights the run changes (TR-DPO's
    reference), each written as ``<name>.safetensors``.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if model_state_dict is None and model is not None:
        model_state_dict = _changing_state(model)
    if model_state_dict is None and staged_dir is None:
        raise ValueError("save_checkpoint needs a model or a model_state_dict")
    if optimizer_state_dict is None and optimizer is not None:
        optimizer_state_dict = optimizer.state_dict()
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root, keep=staged_dir)

    name = checkpoint_dir_name(state.step)
    tmp = staged_dir or staging_dir(run_dir, state.step)
    try:
        tmp.mkdir(exist_ok=staged_dir is not None)
        state_json = {"format_version": _FORMAT_VERSION, **state.to_dict()}
        if model_state_dict is not None:
            _write_file(tmp / MODEL, lambda p: save_model_file(p, model_state_dict))
        for extra_name, extra_sd in (extra_state_dicts or {}).items():
            _write_file(
                tmp / f"{extra_name}.safetensors", lambda p, sd=extra_sd: save_model_file(p, sd)
            )
        if optimizer_state_dict is not None:
            _write_file(tmp / _OPTIMIZER, _torch_writer(optimizer_state_dict))
        if scheduler is not None:
            _write_file(tmp / _SCHEDULER, _torch_writer(scheduler.state_dict()))
        _write_file(tmp / _RNG, _torch_writer(capture_rng_state()))
        _write_file(tmp / STATE, _text_writer(json.dumps(state_json, indent=2) + "\n"))
        manifest = json.dumps(build_manifest(tmp, state.step), indent=1) + "\n"
        _write_file(tmp / COMPLETE, _text_writer(manifest))
        _fsync_path(tmp)
        final = root / name
        if final.exists():  # the same step saved again (e.g. the final save after a periodic one)
            _remove_dir(root, final)
        os.rename(tmp, final)
        _fsync_path(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            kept = [p.name for p in list_checkpoints(run_dir)]
            raise DiskFullError(
                f"no space left on {root}: the checkpoint of step {state.step} was not written (its partial "
                f"folder was removed); last good checkpoint: {kept[-1] if kept else 'none'}"
            ) from e
        raise

    # Newer steps belong to an abandoned continuation; then the oldest beyond keep_last go.
    kept = list_checkpoints(run_dir)
    doomed = [p for p in kept if step_of(p) > state.step]
    older = [p for p in kept if step_of(p) <= state.step]
    for old in doomed + older[:-keep_last]:
        with contextlib.suppress(OSError):
            _remove_dir(root, old)
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    load_model_state: bool = True,
    extra_models: dict[str, torch.nn.Module] | None = None,
) -> TrainState:
    """Restore model, optimizer, scheduler and RNG states from a checkpoint folder; return its TrainState.

    ``load_model_state=False`` leaves the model alone (the distributed layer loads it itself with
    :func:`load_model_state_dict`). Tensors are read to CPU; ``load_state_dict`` moves them to the
    parameters' devices. Restoring the RNG states last means the caller's next draw equals the draw the
    saved run would have made next.

    Every file is verified against the manifest first (once per checkpoint and process) and read before it
    is applied: a corrupt or unreadable file raises :class:`CheckpointError` naming it; an error applying a
    state (e.g. a model of another shape) propagates as is.
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    why = verify_once(path)
    if why is not None:
        raise CheckpointError(why)
    data = read_file(path / STATE, json_read)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path / STATE}: expected a JSON object")
    data.pop("format_version", None)
    rng = read_file(path / _RNG, torch_read)
    if model is not None and load_model_state:
        _load_changing_state(model, load_model_state_dict(path), path)
        for extra_name, extra in (extra_models or {}).items():
            file = path / f"{extra_name}.safetensors"
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (the run saves its {extra_name} weights)")
            extra.load_state_dict(load_weights_file(file), strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(read_file(path / _OPTIMIZER, torch_read))
    if scheduler is not None and (path / _SCHEDULER).is_file():
        scheduler.load_state_dict(read_file(path / _SCHEDULER, torch_read))
    restore_rng_state(rng)
    return TrainState.from_dict(data)
