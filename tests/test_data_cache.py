"""preftune.data.cache: hits do not tokenize; any change of data, tokenizer or settings invalidates."""

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
from _data_helpers import STANDARD, CountingTokenizer, DataCfg, char_tokenizer, write_jsonl

from preftune.data import DataError, load_preference_data
from preftune.data.cache import cache_root, file_digest


def _setup(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD)
    cfg = DataCfg(train_files=[str(path)], cache_dir=str(tmp_path / "cache"), max_length=30)
    return path, cfg


def _counting(merges=()):
    return char_tokenizer(merges, cls=CountingTokenizer)


def test_second_load_is_a_hit_without_tokenizing(tmp_path):
    _, cfg = _setup(tmp_path)
    tok = _counting()
    first = load_preference_data(cfg, tok)
    calls = CountingTokenizer.calls
    assert calls > 0 and not first.cache_hit
    second = load_preference_data(cfg, tok)
    assert CountingTokenizer.calls == calls  # the tokenizer was not called
    assert second.cache_hit and second.fingerprint == first.fingerprint
    assert second.drops == first.drops and second.truncations == first.truncations
    assert second.rows_read == 3 and second.shapes == first.shapes
    assert second.train[:] == first.train[:]
    entries = os.listdir(cache_root(cfg.cache_dir))
    assert not [e for e in entries if e.startswith(".tmp-")]  # staged folder renamed into place
    assert second.cache_path.endswith(second.fingerprint)


def test_the_same_bytes_named_gz_are_not_a_hit(tmp_path):
    """A cached plain file must not stand in for a .gz holding the same bytes: that file is unreadable."""
    path, cfg = _setup(tmp_path)
    load_preference_data(cfg, _counting())
    fake = tmp_path / "d.jsonl.gz"
    fake.write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="not gzip data"):
        load_preference_data(dataclasses.replace(cfg, train_files=[str(fake)]), _counting())


def test_a_changed_file_invalidates(tmp_path):
    path, cfg = _setup(tmp_path)
    tok = _counting()
    first = load_preference_data(cfg, tok)
    stat = os.stat(path)
    # same size, same mtime, different content: caught (the memo also checks ctime)
    data = path.read_bytes().replace(b"Paris", b"Lyons")
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    calls = CountingTokenizer.calls
    second = load_preference_data(cfg, tok)
    assert not second.cache_hit and second.fingerprint != first.fingerprint
    assert CountingTokenizer.calls > calls
    assert second.train[0]["chosen_ids"] != first.train[0]["chosen_ids"]


def test_content_keyed_not_path_keyed(tmp_path):
    path, cfg = _setup(tmp_path)
    first = load_preference_data(cfg, char_tokenizer())
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(path, moved)
    cfg.train_files = [str(moved)]
    assert load_preference_data(cfg, char_tokenizer()).fingerprint == first.fingerprint


def test_tokenizer_and_settings_changes_invalidate(tmp_path):
    _, cfg = _setup(tmp_path)
    base = load_preference_data(cfg, char_tokenizer())
    seen = {base.fingerprint}
    variants = [
        (cfg, char_tokenizer([("t", "h")])),  # merges
        (cfg, char_tokenizer(bos=False)),  # post-processor
        (cfg, char_tokenizer(chat_template="{{ messages }}")),  # chat template
    ]
    for field, value in [
        ("max_length", 28),
        ("max_prompt_length", 8),
        ("prompt_truncation", "right"),
        ("add_eos", False),
        ("shape", "standard"),
    ]:
        changed = DataCfg(**{**cfg.__dict__, field: value})
        variants.append((changed, char_tokenizer()))
    for variant_cfg, tok in variants:
        data = load_preference_data(variant_cfg, tok)
        assert not data.cache_hit
        seen.add(data.fingerprint)
    assert len(seen) == len(variants) + 1
    # on_drop does not change the data: same entry
    assert load_preference_data(
        DataCfg(**{**cfg.__dict__, "on_drop": "error"}), char_tokenizer()
    ).cache_hit


def test_broken_entry_is_rebuilt(tmp_path):
    _, cfg = _setup(tmp_path)
    first = load_preference_data(cfg, char_tokenizer())
    os.remove(os.path.join(first.cache_path, "train.arrow"))
    again = load_preference_data(cfg, char_tokenizer())
    assert not again.cache_hit and again.train[:] == first.train[:]


def test_default_location_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "env_cache"))
    _, cfg = _setup(tmp_path)
    cfg.cache_dir = None
    data = load_preference_data(cfg, char_tokenizer())
    assert data.cache_path.startswith(str(tmp_path / "env_cache" / "data"))


def test_file_digest_memo(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    root = tmp_path / "memo"
    d1 = file_digest(path, root)
    assert file_digest(path, root) == d1 == file_digest(path)
    path.write_bytes(b"abd")
    assert file_digest(path, root) != d1


# ---------------------------------------------------------------------------------------------------
# A bad cache entry is found, logged and recomputed, never used


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_values(path):
    """A well-formed Arrow stream with the same rows, one token id changed (a plausible wrong cache)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as mm:
        table = pa.ipc.open_stream(mm).read_all()
    rows = table.to_pylist()
    rows[0]["chosen_ids"] = [7, *rows[0]["chosen_ids"][1:]]
    with pa.ipc.new_stream(str(path), table.schema) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=table.schema))


def _resign(entry, **changes):
    """Edit meta.json and give it a matching checksum, as a buggy writer would."""
    from preftune.data.cache import _meta_checksum

    meta = json.loads((entry / "meta.json").read_text())
    for key, value in changes.items():
        target = meta
        *path, last = key.split("/")
        for part in path:
            target = target[part]
        target[last] = value
    meta["checksum"] = _meta_checksum(meta)
    (entry / "meta.json").write_text(json.dumps(meta))


CORRUPTIONS = {
    "bytes flipped": ("train.arrow", _flip, "its checksum does not match"),
    "truncated": (
        "train.arrow",
        lambda p: p.write_bytes(p.read_bytes()[:-100]),
        r"bytes, expected \d+ \(truncated",
    ),
    "well-formed, wrong values": ("train.arrow", _rewrite_values, "its checksum does not match"),
    "wrong row count": (
        "train.arrow",
        lambda p: _resign(p.parent, **{"arrow/train.arrow/rows": 2}),
        "3 rows, expected 2",
    ),
    "meta.json edited": (
        "meta.json",
        lambda p: p.write_text(p.read_text().replace('"n_train": 3', '"n_train": 4')),
        "its checksum does not match its content",
    ),
    "meta.json torn": ("meta.json", lambda p: p.write_text('{"code": '), "unreadable"),
    "file missing": ("train.arrow", lambda p: p.unlink(), "missing or unreadable"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_bad_entry_is_logged_and_recomputed(tmp_path, caplog, case):
    name, damage, why = CORRUPTIONS[case]
    _, cfg = _setup(tmp_path)
    first = load_preference_data(cfg, char_tokenizer())
    entry, expected = Path(first.cache_path), first.train[:]
    del first  # its rows are memory-mapped from the file about to be damaged
    damage(entry / name)
    with caplog.at_level(logging.WARNING, logger="preftune.data"):
        again = load_preference_data(cfg, char_tokenizer())
    assert not again.cache_hit and again.train[:] == expected
    problems = [r.getMessage() for r in caplog.records if "recomputing" in r.getMessage()]
    assert len(problems) == 1 and "\n" not in problems[0]
    assert re.search(re.escape(str(entry / name)) + ": .*" + why, problems[0])
    third = load_preference_data(cfg, char_tokenizer())  # the replaced entry is good again
    assert third.cache_hit and third.train[:] == expected


def test_a_verified_entry_is_not_reread(tmp_path, monkeypatch):
    _, cfg = _setup(tmp_path)
    load_preference_data(cfg, char_tokenizer())
    load_preference_data(cfg, char_tokenizer())  # verified once: the checksum is memoised
    from preftune.data import cache

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache was hashed again")

    monkeypatch.setattr(cache.hashlib, "blake2b", no_reading)
    assert load_preference_data(cfg, char_tokenizer()).cache_hit
