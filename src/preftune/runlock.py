"""The run lock: one writer per run folder. :class:`RunLock` takes ``<run_dir>/.lock`` (JSON: pid, host,
start time, a token) with ``O_CREAT | O_EXCL``; the rules (a second run stops at once naming the holder,
stale locks of dead processes on this host are taken over, a lock held on another host is respected) are
:mod:`preftune.runfolder`'s docstring. Moved out of that module, which imports everything here and is where
to import from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from preftune.fingerprint import RunFolderError, atomic_write

__all__ = ["LOCK_FILE", "RunLock"]

log = logging.getLogger("preftune.runfolder")  # the logger name of the module the lock came from

LOCK_FILE = ".lock"
_TAKEOVER_FILE = ".lock.takeover"
_UNREADABLE_GRACE_S = 5.0  # a lock file just created may not hold its JSON yet
_TAKEOVER_STALE_S = 30.0  # a takeover guard this old belongs to a process that died taking over


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name may hold spaces and ")"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder_alive(info: dict) -> bool | None:
    """True/False for a holder on this host; None when it cannot be checked (another host)."""
    if info.get("host") != socket.gethostname():
        return None
    pid = int(info.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
        return False
    recorded, now = info.get("process_start"), _process_start(pid)
    return not (recorded and now and recorded != now)  # the pid now names another process


def _read_lock(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "pid" in info else None


def _describe(info: dict) -> str:
    return f"pid {info.get('pid')} on host {info.get('host')!r} (since {info.get('started', '?')})"


class RunLock:
    """An exclusive lock on a run folder, held from :meth:`acquire` (or ``with``) to :meth:`release`.

    The folder must exist. A kill leaves the lock file behind; the next run on the same host sees that its
    process is gone and takes it over.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.info: dict | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunFolderError` naming its holder."""
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "process_start": _process_start(os.getpid()),
            "token": uuid.uuid4().hex,
        }
        deadline = time.monotonic() + 2 * _UNREADABLE_GRACE_S
        while time.monotonic() < deadline:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._take_over_if_stale(info):
                    self.info = info
                    return
                time.sleep(0.05)
                continue
            except OSError as e:
                raise _unusable(self.run_dir, e) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            self.info = info
            return
        raise RunFolderError(
            f"{self.run_dir}: could not take the run lock {self.path} (another process keeps taking it)"
        )

    def _take_over_if_stale(self, info: dict) -> bool:
        """True when the existing lock was stale and is now ours; raises when its holder is alive."""
        holder = _read_lock(self.path)
        if holder is None:  # being written right now, or left empty by a process killed meanwhile
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return False
            if age < _UNREADABLE_GRACE_S:
                return False
            why = "an unreadable lock file"
        else:
            alive = _holder_alive(holder)
            if alive is not False:
                where = "" if alive else " (on another host: it cannot be checked from here)"
                raise RunFolderError(
                    f"{self.run_dir} is in use by {_describe(holder)}{where}; wait for that run to end or "
                    f"use another train.output_dir. If that process is gone, delete {self.path}"
                )
            why = f"the lock of {_describe(holder)}, which no longer runs"
        if not self._replace(holder, info):
            return False
        log.warning("took over %s: %s", self.path, why)
        return True

    def _replace(self, seen: dict | None, info: dict) -> bool:
        """Replace the lock file with ours if it still holds ``seen``; one process at a time does this."""
        guard = self.run_dir / _TAKEOVER_FILE
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > _TAKEOVER_STALE_S:
                    guard.unlink()
            return False
        os.close(fd)
        try:
            if _read_lock(self.path) != seen:  # someone else took it over first
                return False
            atomic_write(self.path, json.dumps(info))
            return True
        finally:
            with contextlib.suppress(OSError):
                guard.unlink()

    def release(self) -> None:
        """Remove the lock file if it is still ours (safe to call twice)."""
        if self.info is None:
            return
        holder = _read_lock(self.path)
        if holder is not None and holder.get("token") == self.info["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.info = None


def _unusable(run_dir: Path, e: OSError) -> RunFolderError:
    return RunFolderError(
        f"train.output_dir {run_dir} cannot be used: {e.strerror or e}; expected a writable folder"
    )
