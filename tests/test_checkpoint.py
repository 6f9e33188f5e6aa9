"""Checkpoints: bitwise round trip (tied-embedding Llama, AdamW, LambdaLR, RNG), pruning, and atomicity.

The kill test runs a real subprocess that is SIGKILLed in the middle of a save (after the model file, and
again after the COMPLETE marker but before the rename) and checks that the previous checkpoint is still the
latest and that a later save cleans up and succeeds.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from preftune import checkpoint as ck
from preftune.checkpoint import (
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_state_dict,
    save_checkpoint,
)


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def _setup(seed: int):
    model = _tiny_llama(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def _train_step(model, opt, sched, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)  # data independent of the global RNG
    ids = torch.randint(0, 64, (2, 8), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _draws():
    return (random.random(), float(np.random.rand()), torch.rand(4))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_same_nested(a, b, path="state"):
    """Bitwise equality of nested optimizer/scheduler state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_nested(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_nested(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_round_trip_bitwise(tmp_path):
    model, opt, sched = _setup(seed=0)
    for s in range(2):
        _train_step(model, opt, sched, s)
    state = TrainState(
        step=2,
        epoch=0,
        batch_in_epoch=4,
        pairs_seen=8,
        tokens_seen=123,
        skipped_steps=1,
        reference_key="abc123",
        extra={"order_seed": 7},
    )
    path = save_checkpoint(
        tmp_path, state, model=model, optimizer=opt, scheduler=sched, keep_last=2
    )
    assert path == tmp_path / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE",
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "scheduler.pt",
        "state.json",
    ]
    saved_params = _params(model)
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    draws_after_save = _draws()  # moves the global RNG on
    _train_step(model, opt, sched, 2)
    params_step3 = _params(model)

    model2, opt2, sched2 = _setup(seed=1)  # different init, fresh optimizer and schedule
    loaded = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert loaded == state
    # tied embedding still tied, and every tensor bitwise equal
    assert model2.lm_head.weight is model2.model.embed_tokens.weight
    _assert_bitwise(_params(model2), saved_params)
    _assert_same_nested(opt2.state_dict(), saved_opt)
    assert sched2.state_dict() == saved_sched
    draws_after_load = _draws()
    assert draws_after_load[:2] == draws_after_save[:2]
    assert torch.equal(draws_after_load[2], draws_after_save[2])
    # continuing from the checkpoint gives bitwise the same next step
    _train_step(model2, opt2, sched2, 2)
    _assert_bitwise(_params(model2), params_step3)


def test_tied_weights_stored_once(tmp_path):
    from safetensors import safe_open

    model = _tiny_llama(0)
    path = save_checkpoint(
        tmp_path, TrainState(step=1), model=model, optimizer=None, scheduler=None, keep_last=1
    )
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert len(keys) == len(model.state_dict()) - 1
    sd = load_model_state_dict(path)
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]


def test_given_state_dicts_take_precedence(tmp_path):
    model, opt, _ = _setup(0)
    other = _tiny_llama(5)
    path = save_checkpoint(
        tmp_path,
        TrainState(step=3),
        model=None,
        optimizer=None,
        scheduler=None,
        keep_last=1,
        model_state_dict=other.state_dict(),
        optimizer_state_dict=opt.state_dict(),
    )
    _assert_bitwise(load_model_state_dict(path), _params(other))
    before = _params(model)
    load_checkpoint(path, model=model, optimizer=opt, scheduler=None, load_model_state=False)
    _assert_bitwise(_params(model), before)


def _save(run_dir, step, model, keep_last=2):
    return save_checkpoint(
        run_dir,
        TrainState(step=step),
        model=model,
        optimizer=None,
        scheduler=None,
        keep_last=keep_last,
    )


def test_keep_last_and_resave_same_step(tmp_path):
    model = torch.nn.Linear(3, 3)
    for step in range(1, 6):
        _save(tmp_path, step, model)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    _save(tmp_path, 5, model)  # e.g. the final save right after a periodic one
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(ValueError):
        _save(tmp_path, 6, model, keep_last=0)


def test_incomplete_and_tmp_folders_are_never_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model = torch.nn.Linear(3, 3)
    _save(tmp_path, 5, model)
    root = tmp_path / "checkpoints"
    (root / "step-00000009").mkdir()  # no COMPLETE marker
    tmp = root / ".tmp-step-00000010-999999999"  # dead pid, complete content
    tmp.mkdir()
    (tmp / "COMPLETE").write_text("10\n")
    assert latest_checkpoint(tmp_path) == root / "step-00000005"
    with pytest.raises(FileNotFoundError):
        load_checkpoint(root / "step-00000009", model=model, optimizer=None, scheduler=None)
    _save(tmp_path, 6, model)
    assert not tmp.exists()  # stale tmp of a dead process cleaned by the next save
    assert latest_checkpoint(tmp_path) == root / "step-00000006"


def test_exception_mid_save_leaves_previous(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 3)
    _save(tmp_path, 1, model)
    real = ck._write_file

    def failing(path, writer):
        if path.name == "rng.pt":
            raise OSError("disk full")
        real(path, writer)

    monkeypatch.setattr(ck, "_write_file", failing)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, model)
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from preftune import checkpoint as ck

    run_dir, pause_after = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    kw = dict(model=model, optimizer=opt, scheduler=None, keep_last=3)
    ck.save_checkpoint(run_dir, ck.TrainState(step=1), **kw)
    real = ck._write_file

    def slow(path, writer):
        real(path, writer)
        if path.name == pause_after:
            print("PAUSED", flush=True)
            time.sleep(120)

    ck._write_file = slow
    ck.save_checkpoint(run_dir, ck.TrainState(step=2), **kw)
    print("FINISHED", flush=True)
    """
)


@pytest.mark.parametrize("pause_after", ["model.safetensors", "COMPLETE"])
def test_sigkill_during_save(tmp_path, pause_after):
    run_dir = tmp_path / "run"
    script = tmp_path / "save_and_die.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    src = str(Path(ck.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), pause_after],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "PAUSED", line
        tmp = run_dir / "checkpoints" / f".tmp-step-00000002-{proc.pid}"
        assert (tmp / pause_after).is_file()  # the kill lands mid-save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step-00000001"
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters())
    assert load_checkpoint(latest, model=model, optimizer=opt, scheduler=None).step == 1

    path = save_checkpoint(
        run_dir, TrainState(step=2), model=model, optimizer=opt, scheduler=None, keep_last=3
    )
    assert latest_checkpoint(run_dir) == path
    assert not tmp.exists()
    assert load_checkpoint(path, model=model, optimizer=opt, scheduler=None).step == 2


# ---------------------------------------------------------------------------------------------------
# Corrupt checkpoints are found, skipped and named; disk full keeps the last good one


def _two_checkpoints(run_dir):
    """Checkpoints at steps 1 and 2 of a real model, optimizer and schedule; the states at step 1."""
    model, opt, sched = _setup(seed=0)
    _train_step(model, opt, sched, 0)
    kw = dict(model=model, optimizer=opt, scheduler=sched, keep_last=5)
    save_checkpoint(run_dir, TrainState(step=1), **kw)
    at_step1 = (_params(model), copy.deepcopy(opt.state_dict()))
    _train_step(model, opt, sched, 1)
    save_checkpoint(run_dir, TrainState(step=2), **kw)
    return at_step1


def _corrupt(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one flipped byte in the middle: same size, still parses for some formats
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize(
    "name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"]
)
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, name, how):
    params1, opt1 = _two_checkpoints(tmp_path)
    bad = tmp_path / "checkpoints" / "step-00000002" / name
    _corrupt(bad, how)
    assert ck.verify_checkpoint(bad.parent).startswith(f"{bad}: ")
    model, opt, sched = _setup(seed=3)
    with pytest.raises(ck.CheckpointError, match=name):
        load_checkpoint(bad.parent, model=model, optimizer=opt, scheduler=sched)

    def load(path):
        return load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)

    with caplog.at_level("WARNING", logger="preftune.checkpoint"):
        path, state = ck.load_latest_valid(tmp_path, load)
    assert path.name == "step-00000001" and state.step == 1
    assert f"step-00000002 cannot be resumed from: {bad}" in caplog.text
    _assert_bitwise(_params(model), params1)
    _assert_same_nested(opt.state_dict(), opt1)
    assert ck.find_resumable(tmp_path).name == "step-00000001"


def test_no_loadable_checkpoint_is_an_error_naming_the_files(tmp_path):
    _two_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    _corrupt(root / "step-00000002" / "optimizer.pt", "truncate")
    (root / "step-00000001" / "rng.pt").unlink()
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_latest_valid(tmp_path, lambda p: None)
    message = str(err.value)
    assert "step-00000002/optimizer.pt" in message and "step-00000001/rng.pt: missing" in message
    assert "\n" not in message and isinstance(err.value, ValueError)  # exit 2 in the CLI
    assert ck.load_latest_valid(tmp_path / "elsewhere", lambda p: None) is None  # no checkpoint


def test_old_checkpoints_without_a_manifest_load_and_unreadable_files_are_named(tmp_path):
    model, opt, sched = _setup(seed=0)
    kw = dict(model=model, optimizer=opt, scheduler=sched, keep_last=1)
    path = save_checkpoint(tmp_path, TrainState(step=4), **kw)
    (path / "COMPLETE").write_text("4\n")  # what checkpoints looked like before manifests
    assert ck.verify_checkpoint(path) is None
    model2, opt2, sched2 = _setup(seed=1)
    assert load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2).step == 4
    _assert_bitwise(_params(model2), _params(model))
    _corrupt(path / "optimizer.pt", "truncate")
    with pytest.raises(ck.CheckpointError, match=r"optimizer\.pt: unreadable"):
        load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)


def test_a_state_that_does_not_fit_is_not_called_corrupt(tmp_path):
    _two_checkpoints(tmp_path)
    other = torch.nn.Linear(3, 3)  # another model: applying the state fails, the files are fine
    with pytest.raises(RuntimeError, match="state_dict") as err:
        ck.load_latest_valid(
            tmp_path, lambda p: load_checkpoint(p, model=other, optimizer=None, scheduler=None)
        )
    assert not isinstance(err.value, ck.CheckpointError)


def test_saving_after_a_fallback_removes_the_newer_checkpoints(tmp_path):
    model = torch.nn.Linear(3, 3)
    for step in (1, 2, 3):
        _save(tmp_path, step, model)
    _save(tmp_path, 2, model, keep_last=1)  # resumed from step 1 (3 was corrupt), saved step 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),  # a Python write
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
)
def test_disk_full_during_a_save(tmp_path, monkeypatch, failure):
    model = torch.nn.Linear(3, 3)
    good = _save(tmp_path, 1, model)
    good_files = {p.name: p.read_bytes() for p in good.iterdir()}
    real = ck._write_file

    def full(path, writer):
        if path.name == "optimizer.pt":
            path.write_bytes(b"partial")
            raise failure
        real(path, writer)

    monkeypatch.setattr(ck, "_write_file", full)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ck.DiskFullError) as err:
        kw = dict(model=model, optimizer=opt, scheduler=None, keep_last=1)
        save_checkpoint(tmp_path, TrainState(step=2), **kw)
    root = tmp_path / "checkpoints"
    assert str(err.value).startswith(f"no space left on {root}")
    assert "last good checkpoint: step-00000001" in str(err.value)
    assert [p.name for p in root.iterdir()] == ["step-00000001"]  # partial folder removed
    assert {p.name: p.read_bytes() for p in good.iterdir()} == good_files
    assert ck.verify_checkpoint(good) is None


def test_disk_full_is_recognised_through_torch_save(tmp_path, monkeypatch):
    """torch.save reports a failed write as "unexpected pos"; writing through a Python file keeps the
    OSError in the chain, which is what is_disk_full looks for."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Full(real_open(*a, **k)))
    with pytest.raises(Exception) as err:
        ck._torch_writer({"x": torch.ones(1000)})(tmp_path / "o.pt")
    monkeypatch.undo()
    assert ck.is_disk_full(err.value)
    assert not ck.is_disk_full(RuntimeError("unexpected pos 704 vs 598"))
