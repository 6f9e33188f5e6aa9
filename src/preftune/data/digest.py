"""A file's content identity: :func:`file_digest` (BLAKE2b of its bytes), memoised under a cache root by the
file's (size, mtime, ctime, inode), so that a large unchanged file is hashed once. Used by the tokenized
cache's keys (:mod:`preftune.data.cache`) and a Hub split's identity (:mod:`preftune.data.hub`); imports
nothing of preftune.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path

__all__ = ["file_digest"]

_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike, root: Path | None = None) -> str:
    """BLAKE2b of a file's bytes; memoised under ``root`` by (size, mtime_ns, ctime_ns, inode)."""
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    memo = None
    if root is not None:
        memo = (
            root
            / "filehash"
            / (hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:32] + ".json")
        )
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads(memo.read_text())
            if saved["stamp"] == stamp:
                return saved["digest"]
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        with contextlib.suppress(OSError):
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f"{memo.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(
                json.dumps({"stamp": stamp, "digest": digest, "path": os.path.abspath(path)})
            )
            os.replace(tmp, memo)
    return digest
