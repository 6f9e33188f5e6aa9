"""A run folder is what it says: one run at a time, started with the settings it records, nothing mixed in.

Four guarantees, each a small piece the trainer calls (rank 0 only under torchrun):

- **One writer.** :class:`RunLock` (:mod:`preftune.runlock`; importable from here too) takes
  ``<run_dir>/.lock`` (JSON: pid, host, start time) with ``O_CREAT | O_EXCL``, so exactly one process holds
  it. A second ``preftune train`` on the same folder stops at once, naming the holder's pid and host. A lock left by a process that no longer runs (same host, pid
  gone, or the pid now belongs to another process) is taken over with a log line; a lock held on another
  host cannot be checked from here and is always respected (the message says which file to delete if that
  process is gone).
- **Resume checks what it resumes.** :mod:`preftune.fingerprint` (its names are importable from here too):
  the run's settings and facts are stored in ``fingerprint.json`` and compared before a resume.
- **A fresh start starts empty.** :func:`prepare_fresh` refuses a folder that holds another run's files
  unless told to overwrite it (then it clears the folder's contents, and only those). It never clears a folder
  holding files a run does not write (a mistyped ``output_dir`` pointing at a source tree or a home folder).
- **A run that fails before its first step leaves nothing behind.** :class:`RunFolder` creates and locks the
  folder; on a failure before :meth:`RunFolder.keep` it removes what it created.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from preftune.fingerprint import (
    FINGERPRINT_FILE,
    LATE_FACTS,
    SAFE_CHANGES,
    UPWARD_ONLY,
    Change,
    RunFolderError,
    check_resume,
    compare_fingerprints,
    model_facts,
    read_fingerprint,
    run_fingerprint,
    write_fingerprint,
)
from preftune.runlock import (
    _TAKEOVER_FILE,
    LOCK_FILE,
    RunLock,
    _unusable,
)
from preftune.runlock import _process_start as _process_start

__all__ = [
    "FINGERPRINT_FILE",
    "LOCK_FILE",
    "RUN_ENTRIES",
    "SAFE_CHANGES",
    "UPWARD_ONLY",
    "Change",
    "RunFolder",
    "RunFolderError",
    "RunLock",
    "check_resume",
    "compare_fingerprints",
    "model_facts",
    "prepare_fresh",
    "read_fingerprint",
    "run_fingerprint",
    "write_fingerprint",
]

log = logging.getLogger(__name__)


#: Names a run writes in its folder; :func:`prepare_fresh` clears only folders holding nothing else.
RUN_ENTRIES = frozenset(
    {
        LOCK_FILE,
        _TAKEOVER_FILE,
        FINGERPRINT_FILE,
        "config.yaml",
        "data_drops.json",
        "metrics.jsonl",
        "report.json",
        "tensorboard",
        "wandb",
        "checkpoints",
        "final",
        "final-merged",
        "curves.png",
    }
)
_RUN_PREFIXES = (".tmp-", f"{FINGERPRINT_FILE}.", f"{LOCK_FILE}.")


# ---------------------------------------------------------------------------------------------------
# Fresh starts and the folder's life


def _check_folder(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(
            f"train.output_dir {run_dir} is a file; expected a folder (or a new path)"
        )
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunFolderError(f"train.output_dir {run_dir} is not writable")


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or name.startswith(_RUN_PREFIXES)


def _leftovers(run_dir: Path) -> list[Path]:
    own = {LOCK_FILE, _TAKEOVER_FILE}
    return sorted(p for p in run_dir.iterdir() if p.name not in own)


def _remove(path: Path) -> None:
    """Remove one entry without following links (a link to a folder is unlinked, not emptied)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def prepare_fresh(
    run_dir: str | os.PathLike,
    *,
    overwrite: bool,
    fingerprint: Mapping[str, Any] | None = None,
) -> list[str]:
    """Make ``run_dir`` ready for a run starting at step 0; return the names of the entries removed.

    An empty folder (or one holding only the lock) is ready. A folder with leftovers is cleared when
    ``overwrite``, or when they are this same run's (``fingerprint`` matches the stored one with no unsafe
    change) and it has no checkpoint yet (a restart before the first checkpoint); otherwise
    :class:`RunFolderError`. Nothing is removed from a folder holding entries a run does not write
    (:data:`RUN_ENTRIES`): it is refused even with ``overwrite``. Links are removed, never followed.
    """
    run_dir = Path(run_dir)
    _check_folder(run_dir)
    if not run_dir.exists():
        return []
    leftovers = _leftovers(run_dir)
    if not leftovers:
        return []
    names = [p.name + ("/" if p.is_dir() else "") for p in leftovers]
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    foreign = [p.name for p in leftovers if not _is_run_entry(p.name)]
    if foreign:
        raise RunFolderError(
            f"train.output_dir {run_dir} holds files a run does not write ({', '.join(foreign[:6])}); "
            "refusing to use or clear it: choose an empty or new train.output_dir"
        )
    same_run = False
    # A complete checkpoint is checkpoints/step-N/COMPLETE (preftune.checkpoint's layout).
    has_checkpoint = any((run_dir / "checkpoints").glob("step-*/COMPLETE"))
    if fingerprint is not None and not has_checkpoint:
        with contextlib.suppress(RunFolderError):
            saved = read_fingerprint(run_dir)
            same_run = saved is not None and all(
                c.safe or c.key in LATE_FACTS for c in compare_fingerprints(saved, fingerprint)
            )
    if not (overwrite or same_run):
        raise RunFolderError(
            f"train.output_dir {run_dir} already holds a run ({shown}); resume it with "
            "train.resume=auto, choose a new train.output_dir, or set train.overwrite=true to clear it"
        )
    for path in leftovers:
        _remove(path)
    why = (
        "train.overwrite=true"
        if overwrite
        else "the same run, restarted before its first checkpoint"
    )
    log.warning("cleared %s (%s): removed %s", run_dir, why, shown)
    return names


class RunFolder:
    """Create (when needed) and lock a run folder; on a failure before :meth:`keep`, leave no trace.

    ``with RunFolder(path) as folder: ...; folder.keep()`` (call :meth:`keep` once the run has done its
    first step, or when it resumes). On an exception (KeyboardInterrupt included) before that, the folder is
    removed if this context created it (and the parent folders it created, when empty), or emptied if it was
    empty before or cleared by :meth:`start_fresh`; a folder that holds a run being resumed is left as it is.
    The lock is released in every case.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir)
        self.lock = RunLock(self.path)
        self._created: list[Path] = []  # folders this context made, outermost first
        self._was_empty = False
        self._kept = False

    def keep(self) -> None:
        """From now on the folder holds results: a failure leaves it in place."""
        self._kept = True

    def start_fresh(
        self, *, overwrite: bool, fingerprint: Mapping[str, Any] | None = None
    ) -> list[str]:
        """:func:`prepare_fresh` on this folder; a failure before :meth:`keep` then empties it again."""
        removed = prepare_fresh(self.path, overwrite=overwrite, fingerprint=fingerprint)
        self._was_empty = True
        return removed

    def __enter__(self) -> RunFolder:
        _check_folder(self.path)
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unusable(self.path, e) from None
        self._created = missing[::-1]
        self._was_empty = not _leftovers(self.path)
        try:
            self.lock.acquire()
        except BaseException:
            self._undo()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        failed_early = exc_type is not None and not self._kept
        if failed_early and (self._created or self._was_empty):
            for path in _leftovers(self.path):
                with contextlib.suppress(OSError):
                    _remove(path)
        self.lock.release()
        if failed_early:
            self._undo()

    def _undo(self) -> None:
        """Remove the (empty) folders this context created, innermost first."""
        for path in reversed(self._created):
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty: never removes what another process put there
