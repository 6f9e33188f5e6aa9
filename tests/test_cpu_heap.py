"""preftune.cpu_heap: inside ``keep_freed_memory`` a freed block's pages are reused without page faults."""

from __future__ import annotations

import logging
import platform
import resource

import pytest
import torch

from preftune.cpu_heap import _ENV, _glibc, keep_freed_memory, user_heap_settings

glibc_only = pytest.mark.skipif(_glibc() is None, reason="mallopt needs Linux with glibc")

_MB = 1024 * 1024


# One "step": activations and gradients of several sizes, two above glibc's largest mmap threshold (32 MiB).
_STEP_BYTES = [64 * _MB, 6 * _MB, 2 * _MB, 113 * _MB, 6 * _MB, 1 * _MB] * 2


def _step_faults() -> int:
    """Minor page faults of allocating, writing and freeing one step's tensors."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(n // 4) for n in _STEP_BYTES]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc_only
def test_a_repeated_step_reuses_its_pages_inside_and_faults_afresh_outside(monkeypatch):
    """By default the two blocks above 32 MiB are fresh mmaps each step and the heap's free top is handed
    back, so a step faults on most of its 384 MiB (= 98304 pages of 4 KiB; at least the 177 MiB of the
    two big blocks = 45312 pages); kept, steps come to reuse earlier steps' pages (under a tenth of that).
    Not always from the second step on: glibc before 2.38 cannot put a 64-byte-aligned block into a free
    hole of exactly its size, so in a heap that earlier tests fragmented a few steps may still grow it."""
    for name in (*_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    big_blocks = 177 * _MB // resource.getpagesize()
    _step_faults()
    default = [_step_faults() for _ in range(3)]
    assert min(default) >= big_blocks, default  # fresh pages every step
    with keep_freed_memory() as kept:
        assert kept
        steady = [_step_faults() for _ in range(6)]
        assert min(steady) < big_blocks // 10, steady
    restored = [_step_faults() for _ in range(3)]
    assert min(restored) >= big_blocks, restored  # glibc's defaults are back


def test_disabled_or_user_tuned_changes_nothing(monkeypatch, caplog):
    with keep_freed_memory(enabled=False) as kept:
        assert not kept
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert user_heap_settings() == "MALLOC_TRIM_THRESHOLD_"
    with caplog.at_level(logging.DEBUG, logger="preftune.cpu_heap"), keep_freed_memory() as kept:
        assert not kept
    if _glibc() is not None:
        assert "left as MALLOC_TRIM_THRESHOLD_ sets it" in caplog.text


def test_user_heap_settings_reads_glibc_tunables():
    assert user_heap_settings({}) is None
    assert user_heap_settings({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is None
    assert user_heap_settings({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == "GLIBC_TUNABLES"
    assert user_heap_settings({"MALLOC_MMAP_MAX_": "0"}) == "MALLOC_MMAP_MAX_"


def test_nothing_is_set_off_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
    assert _glibc() is None
    with keep_freed_memory() as kept:
        assert not kept
