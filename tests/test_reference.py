"""preftune.reference: the precomputed reference cache is verified on load (key, row counts, checksum of its
values); a corrupt, truncated or mismatched file is logged and recomputed, never used and never a crash."""

from __future__ import annotations

import logging

import pytest
import torch
from _tiny import make_tiny_llama, tiny_train_config, toy_pairs, write_jsonl

from preftune.reference import PrecomputedReference

KEY = "k" * 32


def _saved(tmp_path) -> tuple[PrecomputedReference, object]:
    tables = {"train": torch.randn(5, 2), "eval": torch.randn(2, 2)}
    ref = PrecomputedReference(tables, KEY)
    return ref, ref.save(tmp_path)


def test_round_trip_with_the_expected_rows(tmp_path):
    ref, _ = _saved(tmp_path)
    loaded = PrecomputedReference.load(tmp_path, KEY, rows={"train": 5, "eval": 2})
    assert loaded is not None and loaded.key == KEY
    for split in ("train", "eval"):
        assert torch.equal(loaded.tables[split], ref.tables[split])
    # A split without pairs has no table.
    assert PrecomputedReference.load(tmp_path, KEY, rows={"train": 5, "eval": 2, "x": 0})
    assert PrecomputedReference.load(tmp_path, "missing" * 4) is None


def _corrupt_values(path):
    payload = torch.load(path, weights_only=True)
    payload["tables"]["train"][3, 1] += (
        1.0  # well-formed, plausible, wrong: only the checksum knows
    )
    torch.save(payload, path)


def _other_key(path):
    payload = torch.load(path, weights_only=True)
    payload["key"] = "x" * 32
    torch.save(payload, path)


def _old_format(path):
    payload = torch.load(path, weights_only=True)
    torch.save({"tables": payload["tables"]}, path)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
        (lambda p: p.write_bytes(b"not a torch file"), "unreadable"),
        (_corrupt_values, "checksum does not match"),
        (_other_key, "written for key"),
        (_old_format, "written for key None"),
    ],
    ids=["truncated", "garbage", "wrong_values", "other_key", "old_format"],
)
def test_a_damaged_cache_is_logged_and_ignored(tmp_path, caplog, damage, why):
    _, path = _saved(tmp_path)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="preftune"):
        assert PrecomputedReference.load(tmp_path, KEY) is None
    (record,) = [r for r in caplog.records if "reference log-probs cache" in r.getMessage()]
    assert str(path) in record.getMessage() and why in record.getMessage()
    assert "recomputing" in record.getMessage()


def test_a_cache_of_other_row_counts_is_not_used(tmp_path, caplog):
    _saved(tmp_path)
    with caplog.at_level(logging.WARNING, logger="preftune"):
        assert PrecomputedReference.load(tmp_path, KEY, rows={"train": 6, "eval": 2}) is None
    assert "expected" in caplog.text


def test_training_recomputes_a_corrupt_cache(tmp_path, monkeypatch):
    import preftune.build as build
    from preftune.trainer import train

    make_tiny_llama(tmp_path / "model", layers=1, hidden=16)
    data = write_jsonl(tmp_path / "d.jsonl", toy_pairs(8))
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = build.precompute_logps
    monkeypatch.setattr(build, "precompute_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    over = {"reference__strategy": "precomputed", "train__max_steps": 1, "train__batch_size": 4}
    train(tiny_train_config(tmp_path / "model", data, tmp_path / "r1", **over))
    (cached,) = (tmp_path / "cache" / "reference").glob("*.pt")
    _corrupt_values(cached)
    result = train(tiny_train_config(tmp_path / "model", data, tmp_path / "r2", **over))
    assert len(calls) == 2, "a cache with wrong values must be recomputed, not used"
    assert PrecomputedReference.load(tmp_path / "cache", cached.stem) is not None  # rewritten
    assert result.steps == 1
