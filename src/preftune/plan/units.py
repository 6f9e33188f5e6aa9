"""Bytes and counts as text, shared by the plan's modules."""

from __future__ import annotations

GIB = 1024**3


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
