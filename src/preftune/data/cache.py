"""On-disk cache of tokenized splits, keyed by a hash of everything that decides their content.

Layout: ``<root>/data/<key>/{train.arrow, eval.arrow, meta.json}`` where ``root`` is ``cache_dir``, else
``$PREFTUNE_CACHE``, else ``~/.cache/preftune``. The ``.arrow`` files are Arrow IPC streams, opened
memory-mapped with ``datasets.Dataset.from_file``. An entry is built in ``<root>/data/.tmp-<key>-<random>/`` and
renamed into place in one step, so a reader sees a complete entry or none; when two processes race (e.g. every
DDP rank on a cold cache), the first rename wins and the other's copy is discarded. Staging folders left by a
crashed run are removed once they are a day old.

The key is the SHA-256 of (canonical JSON):
- ``CODE_VERSION`` (bump it whenever tokenization/rendering code changes its output);
- each input file's content hash (BLAKE2b of its bytes, every file of a saved-dataset folder; for a Hub dataset,
  of the Arrow files ``datasets`` prepared), with its format and split, in order (the path itself is not part
  of the key: moving a file keeps its cache), and per source its shape, columns and sampling (mix.py). Content hashes
  are memoised per path under ``<root>/data/filehash/`` together with (size, mtime_ns, ctime_ns, inode); any
  write to a file changes its ctime, so a changed file is always re-hashed and a stale hash is never reused;
- the tokenizer fingerprint: its full ``tokenizer.json`` (``backend_tokenizer.to_str()``: vocab, merges,
  normalizer, pre-tokenizer, post-processor, added tokens), chat template, special tokens and their ids, class;
- every tokenization setting (shape, columns, max_length, max_prompt_length, prompt_truncation, add_eos) and the
  eval split (fraction and seed, or eval files); for unpaired rows also ``data.unpair`` and the seed of the
  KL partners (`preftune.data.unpaired`), so that a change of either recomputes the entry. ``on_drop`` is not in the key: a hit re-checks the stored drop
  counts and raises when ``on_drop="error"``.

Verified before use: ``meta.json`` records, for each ``.arrow`` file, its size in bytes, its BLAKE2b checksum
and its number of rows, and carries a SHA-256 of its own content. An entry is used only if meta.json is intact,
every file has its size and checksum (the checksum is memoised like an input file's, by size, mtime, ctime and
inode, so an untouched entry is not re-read on every hit; any write to a file changes its ctime) and its Arrow
stream holds the recorded rows. Anything else (bytes flipped, a truncated file, a well-formed file with other
values, a wrong row count, an edited meta.json) is logged as one line naming the file and why, and the entry
is recomputed and replaced. (Checking on every hit costs one read of the cache the first time after a write.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .digest import file_digest
from .sources import SourceFile

__all__ = [
    "CODE_VERSION",
    "UNPAIRED_SCHEMA",
    "PairWriter",
    "cache_base",
    "cache_key",
    "cache_root",
    "committed_entry",
    "file_digest",
    "max_weight",
    "read_entry",
    "source_digest",
    "split_rows",
    "tokenizer_fingerprint",
]

# 2: special_token_in_content drops, bounded records, checksums; 3: system / tools columns, string prompts
# and whole conversations in the conversational shape, mixtures (unpaired rows: their own key parts)
CODE_VERSION = "preftune.data/3"
_FLUSH_ROWS = 1024
_META = "meta.json"

log = logging.getLogger("preftune.data")

SCHEMA = pa.schema(
    [
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
        ("weight", pa.float32()),
        ("index", pa.int64()),
    ]
)
#: Unpaired rows (preftune.data.unpaired): chosen_ids = the completion, rejected_ids = the KL row's.
UNPAIRED_SCHEMA = SCHEMA.insert(3, pa.field("label", pa.bool_()))


def cache_base(explicit: str | os.PathLike | None) -> Path:
    """preftune's one cache folder: ``explicit``, else ``$PREFTUNE_CACHE`` (empty = unset), else
    ``~/.cache/preftune``; ``~`` expanded in each."""
    base = explicit or os.environ.get("PREFTUNE_CACHE") or os.path.join("~", ".cache", "preftune")
    return Path(os.path.expanduser(str(base)))


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """Where tokenized data is cached: ``<cache_base>/data``."""
    return cache_base(cache_dir) / "data"


# -------------------------------------------------------------------------------------------- hashing


def source_digest(src: SourceFile, root: Path | None = None) -> dict:
    """Content identity of one input (file, every file of a saved-dataset folder, a Hub dataset's Arrow files)."""
    if src.format == "hub":
        from . import hub

        ds = hub.dataset(src.path, src.config, src.split, src.revision)
        return {"hub": src.path, "digest": hub.dataset_digest(ds, root), "split": src.split}
    if os.path.isdir(src.path):
        h = hashlib.blake2b(digest_size=32)
        for dirpath, dirnames, filenames in os.walk(src.path):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                h.update(os.path.relpath(full, src.path).encode() + b"\0")
                h.update(file_digest(full, root).encode())
        digest = h.hexdigest()
    else:
        digest = file_digest(src.path, root)
    # How the bytes are read is part of the identity: the same bytes named .gz are not plain text.
    gz = src.path.endswith(".gz")
    return {"digest": digest, "format": src.format, "gzip": gz, "split": src.split}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    specials = {
        name: [getattr(tokenizer, name, None), getattr(tokenizer, f"{name}_id", None)]
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    extra = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "specials": specials,
        "all_special_tokens": [str(t) for t in getattr(tokenizer, "all_special_tokens", [])],
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    blob = json.dumps({"code": CODE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


# ------------------------------------------------------------------------------------------ read/write


class PairWriter:
    """Appends tokenized pairs to an Arrow IPC stream; ``index`` counts 0.. in write order."""

    def __init__(self, path: Path, *, with_row: bool = False, labels: bool = False):
        schema = UNPAIRED_SCHEMA if labels else SCHEMA
        self.schema = schema.append(pa.field("_row", pa.int64())) if with_row else schema
        self._writer = pa.ipc.new_stream(str(path), self.schema)
        self._cols: dict[str, list] = {name: [] for name in self.schema.names}
        self.count = 0

    def add(
        self,
        prompt: list[int],
        chosen: list[int],
        rejected: list[int],
        weight: float,
        row: int = -1,
        label: bool | None = None,
    ):
        cols = self._cols
        if "label" in cols:
            cols["label"].append(bool(label))
        cols["prompt_ids"].append(prompt)
        cols["chosen_ids"].append(chosen)
        cols["rejected_ids"].append(rejected)
        cols["weight"].append(weight)
        cols["index"].append(self.count)
        if "_row" in cols:
            cols["_row"].append(row)
        self.count += 1
        if len(cols["index"]) >= _FLUSH_ROWS:
            self.flush()

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def flush(self) -> None:
        if self._cols["index"]:
            self._writer.write_batch(pa.record_batch(self._cols, schema=self.schema))
            self._cols = {name: [] for name in self.schema.names}

    def close(self) -> None:
        self.flush()
        self._writer.close()


def split_rows(source: Path, train: Path, eval_: Path, eval_rows: np.ndarray) -> tuple[int, int]:
    """Split a stream written with ``_row`` into two streams (re-indexed, ``_row`` removed)."""
    counts = [0, 0]
    writers = [pa.ipc.new_stream(str(train), SCHEMA), pa.ipc.new_stream(str(eval_), SCHEMA)]
    try:
        with pa.memory_map(str(source)) as mm:
            for batch in pa.ipc.open_stream(mm):
                is_eval = np.isin(batch.column("_row").to_numpy(), eval_rows)
                for side, mask in ((0, ~is_eval), (1, is_eval)):
                    part = batch.filter(pa.array(mask))
                    if part.num_rows == 0:
                        continue
                    index = pa.array(
                        np.arange(counts[side], counts[side] + part.num_rows, dtype=np.int64)
                    )
                    arrays = [part.column(name) for name in SCHEMA.names[:-1]] + [index]
                    writers[side].write_batch(pa.record_batch(arrays, schema=SCHEMA))
                    counts[side] += part.num_rows
    finally:
        for w in writers:
            w.close()
    return counts[0], counts[1]


def max_weight(path: Path) -> float:
    """The largest pair weight in a tokenized split's Arrow stream."""
    import pyarrow.compute as pc

    best = 0.0
    with pa.memory_map(str(path)) as mm:
        for batch in pa.ipc.open_stream(mm):
            top = pc.max(batch.column("weight")).as_py()
            best = max(best, top or 0.0)
    return best


def read_entry(root: Path, key: str) -> dict | None:
    """The stored meta of a complete, verified entry, or None (a problem with an existing entry is logged)."""
    meta, problem = _verified_meta(root, key)
    if problem is not None:
        log.warning("data cache %s; recomputing it", problem)
    return meta


def _verified_meta(root: Path, key: str) -> tuple[dict | None, str | None]:
    """(meta, None) for a good entry, (None, None) for no entry, (None, "<file>: <why>") for a bad one."""
    entry = root / key
    if not entry.is_dir():
        return None, None
    try:
        meta = json.loads((entry / _META).read_text())
    except (OSError, ValueError) as e:
        return None, f"{entry / _META}: unreadable ({e})"
    if not isinstance(meta, dict) or meta.get("checksum") != _meta_checksum(meta):
        return None, f"{entry / _META}: its checksum does not match its content"
    arrow = meta.get("arrow") or {}
    if "train.arrow" not in arrow or bool(meta.get("has_eval")) != ("eval.arrow" in arrow):
        return None, f"{entry / _META}: does not list its Arrow files"
    for name, want in arrow.items():
        problem = _arrow_problem(entry / name, want, root)
        if problem is not None:
            return None, f"{entry / name}: {problem}"
    meta["path"] = str(entry)
    return meta, None


def _arrow_problem(path: Path, want: dict, root: Path) -> str | None:
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"missing or unreadable ({e.strerror})"
    if size != want["bytes"]:
        return f"{size} bytes, expected {want['bytes']} (truncated or overwritten)"
    if file_digest(path, root) != want["blake2b"]:
        return "its checksum does not match (the content changed)"
    try:
        rows = _count_rows(path)
    except (OSError, pa.ArrowException) as e:
        return f"not a readable Arrow stream ({e})"
    if rows != want["rows"]:
        return f"{rows} rows, expected {want['rows']}"
    return None


def _count_rows(path: Path) -> int:
    with pa.memory_map(str(path)) as mm:
        return sum(batch.num_rows for batch in pa.ipc.open_stream(mm))


def _meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k not in ("checksum", "path")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _remove_stale_staging(root: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove staging folders left by runs that died mid-write (older than a day, so never a live one)."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def committed_entry(root: Path, key: str) -> Iterator[tuple[Path, dict]]:
    """Stage an entry in a temp folder; on success write ``meta`` and rename it into place atomically."""
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root)
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    meta: dict = {}
    try:
        yield tmp, meta
        meta = {"code": CODE_VERSION, **meta}
        meta["arrow"] = {
            name: {
                "bytes": (tmp / name).stat().st_size,
                "blake2b": file_digest(tmp / name),
                "rows": _count_rows(tmp / name),
            }
            for name in ("train.arrow", "eval.arrow")
            if (tmp / name).is_file()
        }
        meta["checksum"] = _meta_checksum(meta)
        (tmp / _META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        target = root / key
        if target.exists() and _verified_meta(root, key)[0] is None:  # a bad entry: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process committed first: fine if its entry is good
            if _verified_meta(root, key)[0] is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
