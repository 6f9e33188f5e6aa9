"""The C heap of a process that trains on CPU: memory freed in one step is kept for the next.

PyTorch's CPU tensors come from ``malloc``. With glibc's defaults a large block (above the mmap threshold,
at most 32 MiB, e.g. a tied embedding's 113 MB gradient) is ``munmap``-ed when freed, and the top of the
heap is handed back to the kernel once more than 128 KiB of it is free. Every step frees and allocates the
same activations and gradients again, so each step rebuilds them from fresh pages: one page fault per
4 KiB, measured at ~7 % of a SmolLM-135M-shaped CPU step (bench/README.md, "CPU heap"). While a run trains
on CPU, :func:`keep_freed_memory` makes glibc serve every block from its heap and never trim it, so
steady-state steps reuse pages that are already mapped. The peak resident memory stays what the run needs
(the heap grows to about the same peak; glibc before 2.38 cannot reuse a free block of exactly the size
of a 64-byte-aligned request, so a little more is measured: +1 % peak RSS on that shape); freed memory
is only not returned between steps. On exit glibc's documented defaults are set back and the heap is
trimmed (``malloc_trim``).

Nothing happens off Linux/glibc (musl, macOS, Windows), under another allocator preloaded in place of
glibc's malloc (then glibc's settings are not the ones in use, and changing them is harmless), or when the
user tuned glibc's heap in the environment (``MALLOC_*_`` variables, ``GLIBC_TUNABLES`` with
``glibc.malloc``): their settings win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["keep_freed_memory", "user_heap_settings"]

log = logging.getLogger(__name__)

# mallopt(3) parameters and glibc's defaults for them (man 3 mallopt).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024, _M_TOP_PAD: 128 * 1024}
_KEEP = {
    _M_MMAP_MAX: 0,  # no block is mmap-ed: all come from the heap, and freed ones stay in it
    _M_TRIM_THRESHOLD: 2**31 - 1,  # the largest int: the heap top is never handed back
    _M_TOP_PAD: 64 * 1024 * 1024,  # grow the heap in 64 MiB steps rather than page by page
}
_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)


def user_heap_settings(environ: dict[str, str] | None = None) -> str | None:
    """The environment variable through which the user tuned glibc's heap, or None."""
    env = os.environ if environ is None else environ
    for name in _ENV:
        if name in env:
            return name
    if "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _set(libc, values: dict[int, int]) -> bool:
    return all(libc.mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in values.items())


@contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Inside: glibc keeps freed memory for reuse (yields True), else nothing changes (yields False)."""
    libc = _glibc() if enabled else None
    if libc is not None:
        tuned = user_heap_settings()
        if tuned is not None:
            log.debug(
                "CPU heap: left as %s sets it (train.keep_freed_memory does not apply)", tuned
            )
            libc = None
    if libc is not None and not _set(libc, _KEEP):
        _set(libc, _DEFAULTS)
        libc = None
    if libc is not None:
        log.debug(
            "CPU heap: memory freed during a step is kept for the next (train.keep_freed_memory)"
        )
    try:
        yield libc is not None
    finally:
        if libc is not None:
            _set(libc, _DEFAULTS)
            libc.malloc_trim(ctypes.c_size_t(0))
