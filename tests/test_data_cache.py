"""preftune.data.cache: hits do not tokenize; any change of data, tokenizer or settings invalidates."""

import os
import shutil

from _data_helpers import STANDARD, CountingTokenizer, DataCfg, char_tokenizer, write_jsonl

from preftune.data import load_preference_data
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
