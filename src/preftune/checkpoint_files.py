"""The files of a checkpoint: which checkpoints a run folder holds, whether they are intact, how the model
file is stored, and the errors that say why a checkpoint cannot be used.

A checkpoint is ``run_dir/checkpoints/step-00000123/`` (zero-padded so that names sort by step) holding a
``COMPLETE`` marker written last; a folder without it is never a checkpoint. The marker's content is the
manifest: the step and, for every other file of the folder (recursively: FSDP's ``dcp/`` shards too), its
size and CRC-32. Writing a checkpoint atomically and restoring its states is :mod:`preftune.checkpoint`'s job.

The model file is safetensors, which refuses tensors sharing memory: tied weights are stored once, with
their other names in the file's metadata, and restored as shared tensors.

Corrupt files are found, not loaded. :func:`verify_checkpoint` checks every file against the manifest (a
truncated, overwritten or bit-flipped file fails; CRC-32 is for corruption, not for tampering). Checkpoints
written before manifests existed (``COMPLETE`` holds only the step) are not verified; their files are simply
loaded. Reading a file that fails to deserialise raises :class:`CheckpointError` naming it (:func:`read_file`),
while errors of *applying* a state (a model of another shape) propagate unchanged.
:func:`load_latest_valid` resumes from the newest checkpoint that verifies and loads, logging each one it
skips (which file, why), and raises :class:`CheckpointError` (exit 2) naming the corrupt files when none does.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CHECKPOINTS_DIR",
    "CheckpointError",
    "DiskFullError",
    "checkpoint_dir_name",
    "find_resumable",
    "is_disk_full",
    "latest_checkpoint",
    "list_checkpoints",
    "load_latest_valid",
    "load_model_state_dict",
    "load_weights_file",
    "read_file",
    "save_model_file",
    "verify_checkpoint",
    "verify_once",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Sub-folder of the run folder that holds the checkpoints.
CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"
STATE = "state.json"
MODEL = "model.safetensors"
#: safetensors metadata key listing the names that alias a stored tensor (tied weights).
_ALIASES_KEY = "preftune.aliases"
_STEP_RE = re.compile(r"^step-(\d+)$")
_MANIFEST_VERSION = 1
_CRC_CHUNK = 1 << 24


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and why.

    A ValueError, so the CLI reports it as a usage error (exit 2, one line): it needs a person's decision.
    """


class DiskFullError(OSError):
    """A save that ran out of space: "no space left on <path>". Its partial folder was removed."""


def checkpoint_dir_name(step: int) -> str:
    """``step-00000123``: zero-padded so that lexical and numeric order agree."""
    return f"step-{step:08d}"


def read_file(file: Path, reader: Callable[[Path], _T]) -> _T:
    """``reader(file)``, with any failure to read or deserialise it raised as a CheckpointError naming it."""
    try:
        return reader(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except MemoryError:  # not the file's fault
        raise
    # torch, pickle, zip, safetensors and json errors all mean "this file is unreadable"
    except Exception as e:
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{file}: unreadable ({text})") from e


def torch_read(file: Path) -> Any:
    return torch.load(file, map_location="cpu", weights_only=True)


def json_read(file: Path) -> Any:
    return json.loads(file.read_text(encoding="utf-8"))


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def build_manifest(folder: Path, step: int) -> dict[str, Any]:
    """Size and CRC-32 of every file under ``folder`` (recursively: FSDP's ``dcp/`` shards too)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != COMPLETE:
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
    return {"step": step, "manifest_version": _MANIFEST_VERSION, "files": files}


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception in its chain) means the disk or quota is full."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(
            k in text for k in ("No space left on device", "os error 28", "Disk quota exceeded")
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


# ---------------------------------------------------------------------------------------------------
# Model state dict <-> safetensors (tied weights)


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr())


def _dedup_state_dict(
    sd: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory once: safetensors refuses shared storage.

    Exact aliases (same storage, offset, shape, strides -- e.g. a tied ``lm_head.weight``) become one entry
    plus an alias record ``{alias: kept_name}``; tensors that merely overlap are saved as copies.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, ...]] = set()
    for name in sorted(sd):
        t = sd[name].detach()
        if t.device.type == "meta":
            raise ValueError(f"cannot checkpoint '{name}': it is on the meta device")
        view = (*_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and view in by_view:
            aliases[name] = by_view[view]
            continue
        if t.numel() > 0 and _storage_key(t) in storages:
            t = t.clone()  # overlapping but not identical: a private copy
        elif t.numel() > 0:
            by_view[view] = name
            storages.add(_storage_key(t))
        kept[name] = t.contiguous().cpu()
    return kept, aliases


def save_model_file(path: Path, sd: dict[str, torch.Tensor]) -> None:
    tensors, aliases = _dedup_state_dict(sd)
    save_file(tensors, str(path), metadata={_ALIASES_KEY: json.dumps(aliases), "format": "pt"})


def load_model_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict (CPU) of a checkpoint folder, tied names restored as shared tensors.

    For the distributed layer, which loads on rank 0 and broadcasts/shards itself. A file that cannot be
    read raises :class:`CheckpointError` naming it.
    """
    return read_file(Path(path) / MODEL, _read_model_file)


def load_weights_file(file: str | Path) -> dict[str, torch.Tensor]:
    """A weights file written by :func:`save_model_file` (tied names restored); CheckpointError if corrupt."""
    return read_file(Path(file), _read_model_file)


def _read_model_file(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    sd = load_file(str(file), device="cpu")
    for alias, name in json.loads(meta.get(_ALIASES_KEY, "{}")).items():
        sd[alias] = sd[name]
    return sd


# ---------------------------------------------------------------------------------------------------
# Finding and verifying checkpoints


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (``.tmp-*`` and unmarked folders excluded)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None. Not verified: to resume, use
    :func:`load_latest_valid` (or :func:`find_resumable`)."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def step_of(path: Path) -> int:
    return int(_STEP_RE.match(path.name).group(1))  # type: ignore[union-attr]


def verify_checkpoint(path: str | Path) -> str | None:
    """None when ``path`` is a complete checkpoint whose files all match its manifest; otherwise why not,
    naming the file ("<file>: 812 bytes, expected 4096 (truncated)"). Reads every file once (CRC-32).

    A checkpoint without a manifest (written before manifests) passes when its marker and state.json exist.
    """
    path = Path(path)
    marker = path / COMPLETE
    if not marker.is_file():
        return f"{path}: not a complete checkpoint (no {COMPLETE} marker)"
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{marker}: unreadable ({e})"
    if not isinstance(manifest, dict):  # an old marker: the step only
        return None if (path / STATE).is_file() else f"{path / STATE}: missing"
    files = manifest.get("files")
    if not isinstance(files, dict) or STATE not in files:
        return f"{marker}: not a checkpoint manifest"
    for rel, want in files.items():
        file = path / rel
        try:
            size = file.stat().st_size
        except OSError:
            return f"{file}: missing"
        if size != want["bytes"]:
            return f"{file}: {size} bytes, expected {want['bytes']} (truncated or overwritten)"
        try:
            crc = _crc32(file)
        except OSError as e:
            return f"{file}: unreadable ({e.strerror or e})"
        if crc != want["crc32"]:
            return f"{file}: its checksum does not match (the file is corrupt)"
    return None


def find_resumable(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies (:func:`verify_checkpoint`), logging each newer one skipped;
    None when the run has no checkpoint; :class:`CheckpointError` when it has some but none verifies."""
    found = _first_good(run_dir, None)
    return found[0] if found else None


def load_latest_valid(run_dir: str | Path, load: Callable[[Path], _T]) -> tuple[Path, _T] | None:
    """Resume from the newest checkpoint that verifies and loads: ``(path, load(path))``.

    ``load`` restores the states (e.g. ``lambda p: load_checkpoint(p, model=..., ...)`` or the distributed
    layer's loader); a :class:`CheckpointError` it raises (an unreadable file) moves on to the previous
    checkpoint, which overwrites whatever the failed attempt restored. Each skipped checkpoint is logged with
    the file and the reason. None when the run has no checkpoint; :class:`CheckpointError` naming every
    corrupt file when it has checkpoints but none can be resumed from. Other errors of ``load`` propagate.
    """
    return _first_good(run_dir, load)


def _first_good(run_dir: str | Path, load: Callable[[Path], _T] | None) -> tuple[Path, Any] | None:
    candidates = list_checkpoints(run_dir)[::-1]
    if not candidates:
        return None
    problems = []
    for ckpt in candidates:
        why = verify_once(ckpt)
        if why is None:
            if load is None:
                return ckpt, None
            try:
                return ckpt, load(ckpt)
            except CheckpointError as e:
                why = str(e)
        log.warning(
            "checkpoint %s cannot be resumed from: %s; trying the one before", ckpt.name, why
        )
        problems.append(why)
    raise CheckpointError(
        f"no checkpoint of {Path(run_dir)} can be resumed from: {'; '.join(problems)}. "
        "Restore the files, or delete the corrupt checkpoints to resume from an earlier one "
        "(or start over: train.resume=never with train.overwrite=true)"
    )


# Checkpoints verified by this process, by (folder, marker inode, marker mtime): a resume verifies once.
_verified: set[tuple[str, int, int]] = set()


def verify_once(path: Path) -> str | None:
    """:func:`verify_checkpoint`, remembering success for this process."""
    try:
        st = (path / COMPLETE).stat()
    except OSError:
        return verify_checkpoint(path)
    key = (str(path.resolve()), st.st_ino, st.st_mtime_ns)
    if key in _verified:
        return None
    why = verify_checkpoint(path)
    if why is None:
        _verified.add(key)
    return why
