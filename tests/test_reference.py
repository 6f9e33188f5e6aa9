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


# ----------------------------------------------------------------------------- TR-DPO (reference.sync)


@pytest.fixture(scope="module")
def sync_setup(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("sync")
    return tiny_dir, write_jsonl(root / "pairs.jsonl", toy_pairs(32, seed=3))


def _sync_cfg(model, data, out, **over):
    return tiny_train_config(
        model, data, out, reference__strategy="copy", train__batch_size=4, **over
    )


def test_soft_sync_mixes_the_policy_into_the_reference(sync_setup, tmp_path):
    """TR-DPO's soft update after step 2 (every=2): θ_ref = α·θ₂ + (1 − α)·θ₀, saved in the checkpoint."""
    from safetensors.torch import load_file

    from preftune.checkpoint_files import load_weights_file
    from preftune.config import ReferenceSyncConfig
    from preftune.trainer import train

    model, data = sync_setup
    sync = ReferenceSyncConfig(mode="soft", alpha=0.25, every=2)
    result = train(
        _sync_cfg(model, data, tmp_path / "run", train__max_steps=2, reference__sync=sync)
    )
    theta0 = load_file(model / "model.safetensors")
    theta2 = load_file(result.final_model_dir / "model.safetensors")
    ref = load_weights_file(result.last_checkpoint / "reference.safetensors")
    for name, w0 in theta0.items():
        expected = 0.25 * theta2[name] + 0.75 * w0
        torch.testing.assert_close(ref[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(ref[n], w0) for n, w0 in theta0.items())


def test_hard_sync_resumes_bitwise(sync_setup, tmp_path):
    """A resume restores the synced reference from the checkpoint (not θ₀): the same final weights as
    an uninterrupted run. Without the saved reference the run after step 3 would differ."""
    import shutil

    from safetensors.torch import load_file

    from preftune.config import ReferenceSyncConfig
    from preftune.trainer import train

    model, data = sync_setup
    sync = ReferenceSyncConfig(mode="hard", every=2)
    over = {"train__max_steps": 6, "train__save_every": 3, "reference__sync": sync}
    full = train(_sync_cfg(model, data, tmp_path / "full", **over))
    # An interruption after step 3: only the step-3 checkpoint survives.
    cut = tmp_path / "cut"
    shutil.copytree(full.output_dir, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    resumed = train(_sync_cfg(model, data, cut, **over))
    wa = load_file(full.final_model_dir / "model.safetensors")
    wb = load_file(resumed.final_model_dir / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_sync_needs_the_copy_strategy():
    from preftune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"reference\.strategy=copy"):
        load_config(None, ["reference.sync.mode=soft", "reference.strategy=precomputed"])
