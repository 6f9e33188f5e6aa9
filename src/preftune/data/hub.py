"""Hub datasets: ``org/name`` (with a configuration, split and revision) read with ``datasets.load_dataset``.

Which strings are Hub ids: those shaped ``org/name`` (one slash, Hub name characters, not ending in a data file
extension) that are not an existing local path. Anything else that does not exist is a missing local path
and never a network lookup.

Where the data comes from:

- online: ``load_dataset(org/name, name=config, split=split, revision=revision)``; if the Hub cannot be
  reached, the local cache as below (with a log line);
- offline (``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1``, read when the data is loaded): the
  repository's snapshot in the Hub cache (``$HF_HUB_CACHE/datasets--org--name/snapshots/<commit>/``, the
  layout ``huggingface_hub`` writes, where ``load_dataset`` downloads to; the revision resolved through
  ``refs/``), loaded as a local folder (its Parquet, JSON, CSV, ... files, the README's ``configs``, split
  names from the file names). Not there: a `DataError` saying so; nothing is looked up on the network.

Split: the one named, else ``train`` (eval data: ``validation``, ``eval`` or ``test``), else the only one; a
missing split is a `DataError` listing those the dataset has. Every failure is one line naming the dataset.
Its identity in the tokenized-data cache key is the checksum of the Arrow files ``datasets`` prepared.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from .digest import file_digest
from .errors import DataError

__all__ = ["choose_split", "dataset", "dataset_digest", "looks_like_hub_id", "split_names"]

log = logging.getLogger("preftune.data")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_FILE_SUFFIX = re.compile(
    r"\.(jsonl|ndjson|jsonlines|json|csv|tsv|parquet|pq|arrow|gz|txt|yaml|yml)$", re.I
)
EVAL_SPLITS = ("validation", "eval", "test")
_TRUE = ("1", "on", "yes", "true")
_loaded: dict[tuple, Any] = {}  # datasets already opened in this process


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` shaped, not a file name; the caller checks that no local path has this name."""
    return bool(_HUB_ID.match(text)) and ".." not in text and not _FILE_SUFFIX.search(text)


def describe(repo: str, config: str | None, split: str | None) -> str:
    """How a Hub source is named in messages and locations: ``org/name:config [split train]``."""
    return repo + (f":{config}" if config else "") + (f" [split {split}]" if split else "")


def choose_split(
    splits: list[str], requested: str | None, role: str, where: str, fix: str
) -> str | None:
    """The split to read (see the module docstring); ``fix`` says how to name another one."""
    if requested is not None:
        if requested in splits or not splits:
            return requested
        raise DataError(f"{where}: no split {requested!r}; it has {', '.join(splits)}")
    wanted = ("train",) if role == "train" else EVAL_SPLITS
    for name in wanted:
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    raise DataError(
        f"{where}: splits {', '.join(splits)}; none is named {' / '.join(wanted)} for the {role} data. {fix}"
    )


def _offline() -> bool:
    if any(
        os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return True
    import huggingface_hub.constants as hub_constants

    return bool(hub_constants.HF_HUB_OFFLINE)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _snapshot(repo: str, revision: str | None) -> str | None:
    """The repository's folder in the local Hub cache at ``revision`` (default main), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(
            repo,
            repo_type="dataset",
            revision=revision,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=True,
        )
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None


def _where_from(repo: str, revision: str | None) -> tuple[str, dict[str, Any]]:
    """What to hand ``datasets``: the repo id online, its snapshot folder offline."""
    if not _offline():
        return repo, {"revision": revision}
    snapshot = _snapshot(repo, revision)
    if snapshot is None:
        cache = os.environ.get("HF_HUB_CACHE") or "the default Hub cache"
        at = f" at revision {revision}" if revision else ""
        raise DataError(
            f"{repo}: no such local path, and offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) "
            f"while the Hub dataset {repo}{at} is not in the local cache ({cache}); load it once online, "
            "or give a local file"
        )
    return snapshot, {}


def _call(repo: str, label: str, fn: Any, **kwargs: Any) -> Any:
    """Run a ``datasets`` call on ``repo``, retried from the local cache when the Hub cannot be reached;
    every failure becomes one `DataError` line naming the dataset (as ``label``)."""
    where, extra = _where_from(repo, kwargs.pop("revision", None))
    try:
        return fn(where, **extra, **kwargs)
    except ConnectionError as e:
        snapshot = _snapshot(repo, extra.get("revision"))
        if snapshot is None:
            raise DataError(
                f"{label}: the Hub cannot be reached and the dataset is not in the local cache "
                f"({_one_line(e, 160)})"
            ) from None
        log.info("%s: the Hub cannot be reached; using the local cache %s", label, snapshot)
        try:
            return fn(snapshot, **kwargs)
        except Exception as e2:
            raise DataError(
                f"{label}: cannot load it from the local cache ({_one_line(e2)})"
            ) from None
    except FileNotFoundError as e:
        raise DataError(f"{label}: no such local path or Hub dataset ({_one_line(e)})") from None
    except DataError:
        raise
    except Exception as e:  # DatasetNotFoundError, a bad config name, a corrupt file, ...
        raise DataError(f"{label}: cannot load it as a Hub dataset ({_one_line(e)})") from None


def split_names(repo: str, config: str | None, revision: str | None) -> list[str]:
    import datasets

    name = describe(repo, config, None)
    return list(
        _call(repo, name, datasets.get_dataset_split_names, config_name=config, revision=revision)
    )


def dataset(repo: str, config: str | None, split: str, revision: str | None) -> Any:
    """The split as a (memory-mapped) ``datasets.Dataset``, opened once per process."""
    import datasets

    cache_dir = os.environ.get("HF_DATASETS_CACHE") or None
    key = (repo, config, split, revision, os.environ.get("HF_HUB_CACHE"), cache_dir, _offline())
    if key not in _loaded:
        _loaded[key] = _call(
            repo,
            describe(repo, config, split),
            datasets.load_dataset,
            name=config,
            split=split,
            revision=revision,
            cache_dir=cache_dir,
        )
    return _loaded[key]


def dataset_digest(ds: Any, root: Path | None) -> str:
    """Content identity of a loaded split: the checksum of its Arrow files (else datasets' fingerprint)."""
    files = sorted(f["filename"] for f in (ds.cache_files or []))
    if not files:
        return f"fingerprint:{ds._fingerprint}"
    h = hashlib.blake2b(digest_size=32)
    for name in files:
        h.update(file_digest(name, root).encode())
    return h.hexdigest()
