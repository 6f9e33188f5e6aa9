"""preftune.runfolder: the lock (a real second process, stale and foreign locks), the resume fingerprint and its
safe-change table, fresh starts into non-empty folders, and cleanup after an early failure."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from preftune import runfolder as rf
from preftune.config import Config, config_to_dict
from preftune.runfolder import (
    Change,
    RunFolder,
    RunFolderError,
    RunLock,
    check_resume,
    compare_fingerprints,
    prepare_fresh,
    read_fingerprint,
    run_fingerprint,
    write_fingerprint,
)

SRC = str(Path(rf.__file__).parents[1])

_HOLDER = textwrap.dedent(
    """
    import sys
    from preftune.runfolder import RunLock

    with RunLock(sys.argv[1]):
        print("LOCKED", flush=True)
        sys.stdin.readline()  # hold the lock until the test says so
    print("RELEASED", flush=True)
    """
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir: Path, **info) -> Path:
    path = run_dir / rf.LOCK_FILE
    path.write_text(json.dumps({"host": socket.gethostname(), "started": "then", **info}))
    return path


# ---------------------------------------------------------------------------------------------------
# The lock


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(RunFolderError) as err:
            RunLock(tmp_path).acquire()
        message = str(err.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
        assert "\n" not in message
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "RELEASED"
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / rf.LOCK_FILE).exists()  # released on exit
    with RunLock(tmp_path) as lock:  # and free for the next run
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.path.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead)
    with caplog.at_level(logging.WARNING, logger="preftune.runfolder"), RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"pid {dead}" in caplog.text and "no longer runs" in caplog.text
    assert not (tmp_path / rf._TAKEOVER_FILE).exists()


def test_a_reused_pid_is_stale_and_a_foreign_host_is_respected(tmp_path):
    if rf._process_start(os.getpid()) is None:
        pytest.skip("no /proc: process start times are not available")
    # Our own pid but another start time: the pid was reused by this process, the holder is gone.
    _write_lock(tmp_path, pid=os.getpid(), process_start="1")
    with RunLock(tmp_path):
        pass
    _write_lock(tmp_path, pid=_dead_pid(), host="elsewhere-node-7")
    with pytest.raises(RunFolderError, match=r"host 'elsewhere-node-7'.*another host"):
        RunLock(tmp_path).acquire()


def test_an_unreadable_lock_is_waited_for_then_taken_over_when_old(tmp_path):
    lock = tmp_path / rf.LOCK_FILE
    lock.write_text("")  # a process killed between creating the file and writing it
    old = lock.stat().st_mtime - 60
    os.utime(lock, (old, old))
    with RunLock(tmp_path):
        pass
    # Fresh and empty: its creator is writing it right now. Wait for the content, then respect it.
    lock.write_text("")
    live = {"pid": os.getpid(), "process_start": rf._process_start(os.getpid())}
    writer = threading.Timer(0.3, lambda: _write_lock(tmp_path, **live))
    writer.start()
    try:
        with pytest.raises(RunFolderError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    finally:
        writer.cancel()


# ---------------------------------------------------------------------------------------------------
# The fingerprint


def _fp(cfg: Config, **facts):
    base = {"model": "a" * 40, "data": "d" * 40, "world_size": 1}
    return run_fingerprint(cfg, {**base, **facts})


def test_fingerprint_flattens_the_config_and_facts():
    cfg = Config()
    cfg.loss.params = {"label_smoothing": 0.1}
    fp = _fp(cfg)
    assert fp["settings"]["optim.lr"] == cfg.optim.lr
    assert fp["settings"]["model.lora.r"] == cfg.model.lora.r
    assert fp["settings"]["loss.params.label_smoothing"] == 0.1
    assert fp["settings"]["optim.betas"] == [0.9, 0.999]
    assert fp["facts"]["world_size"] == 1
    assert run_fingerprint(config_to_dict(cfg), fp["facts"]) == fp  # dataclass or nested dict alike
    assert json.loads(json.dumps(fp)) == fp


def test_compare_marks_safe_and_unsafe_changes():
    a, b = Config(), Config()
    b.log.log_every, b.train.save_every = 1, 50  # safe
    b.train.max_steps = 10  # None -> 10: not "upward" (None means no limit)
    b.optim.lr = 1e-6
    b.loss.params = {"label_smoothing": 0.1}
    changes = {c.key: c for c in compare_fingerprints(_fp(a), _fp(b, data="e" * 40))}
    assert set(changes) == {
        "log.log_every",
        "train.save_every",
        "train.max_steps",
        "optim.lr",
        "loss.params.label_smoothing",
        "facts.data",
    }
    assert changes["log.log_every"].safe and changes["train.save_every"].safe
    assert not changes["train.max_steps"].safe and not changes["optim.lr"].safe
    assert not changes["facts.data"].safe
    assert str(changes["loss.params.label_smoothing"]) == (
        "loss.params.label_smoothing: (not recorded) -> 0.1"
    )
    assert str(changes["facts.data"]) == 'facts.data: "dddddddddddd..." -> "eeeeeeeeeeee..."'


@pytest.mark.parametrize(("old", "new", "safe"), [(100, 200, True), (200, 100, False)])
def test_max_steps_may_only_grow(old, new, safe):
    a, b = Config(), Config()
    a.train.max_steps, b.train.max_steps = old, new
    assert compare_fingerprints(_fp(a), _fp(b)) == [Change("train.max_steps", old, new, safe)]


def test_every_safe_key_is_a_real_setting():
    settings = run_fingerprint(Config())["settings"]
    assert not [k for k in rf.SAFE_CHANGES if k not in settings]


def test_check_resume_refuses_names_each_change_and_force_returns_them(tmp_path):
    a = Config()
    write_fingerprint(tmp_path, _fp(a))
    assert check_resume(tmp_path, _fp(a), force=False) == []
    b = Config()
    b.optim.lr, b.loss.name, b.log.log_every = 2e-6, ["ipo"], 1
    current = _fp(b, world_size=2)
    with pytest.raises(RunFolderError) as err:
        check_resume(tmp_path, current, force=False)
    message = str(err.value)
    assert "optim.lr: 5e-07 -> 2e-06" in message
    assert 'loss.name: ["sigmoid"] -> ["ipo"]' in message
    assert "facts.world_size: 1 -> 2" in message
    assert "log.log_every" not in message  # safe changes do not block
    assert "train.output_dir" in message and "train.resume=force" in message
    assert "\n" not in message
    forced = check_resume(tmp_path, current, force=True)
    assert {c.key for c in forced} == {"optim.lr", "loss.name", "log.log_every", "facts.world_size"}
    assert [c.to_dict() for c in forced if c.key == "log.log_every"] == [
        {"key": "log.log_every", "old": 10, "new": 1, "safe": True}
    ]


def test_late_facts_are_compared_in_the_late_check_only(tmp_path):
    """The layout and reference key are known only after the models load: the first, cheap check skips
    them (they are not measured yet), the late check compares only them."""
    write_fingerprint(tmp_path, _fp(Config(), layout="shared_prompt", reference=None))
    b = Config()
    b.optim.lr = 1e-3
    early = _fp(b)  # no layout yet
    with pytest.raises(RunFolderError) as err:
        check_resume(tmp_path, early, force=False)
    assert "optim.lr" in str(err.value) and "facts.layout" not in str(err.value)
    late = _fp(Config(), layout="padded", reference=None)
    with pytest.raises(RunFolderError, match=r'facts\.layout: "shared_prompt" -> "padded"') as err:
        check_resume(tmp_path, late, force=False, late=True)
    assert "optim.lr" not in str(err.value)
    same = _fp(Config(), layout="shared_prompt", reference=None)
    assert check_resume(tmp_path, same, force=False, late=True) == []


def test_model_facts_change_with_the_files_not_with_a_copy_of_the_path(tmp_path):
    from types import SimpleNamespace

    from preftune.runfolder import model_facts

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "README.md").write_text("not a weight file")
    source = SimpleNamespace(name_or_path=str(folder), revision=None, gguf_file=None, local=True)
    facts = model_facts(source)
    assert set(facts) == {"config_sha256", "files"} and list(facts["files"]) == [
        "model.safetensors"
    ]
    assert model_facts(source) == facts
    os.utime(folder / "model.safetensors", (1, 1))  # weights replaced in place, same size
    assert model_facts(source) != facts
    facts = model_facts(source)
    (folder / "config.json").write_text('{"hidden_size": 16}')
    assert model_facts(source)["config_sha256"] != facts["config_sha256"]
    hub = SimpleNamespace(
        name_or_path="nosuch-org/nosuch-m", revision=None, gguf_file=None, local=False
    )
    assert model_facts(hub) == {"hub": "nosuch-org/nosuch-m"}  # not cached: the loader will say so


def test_fingerprint_file_is_atomic_and_checked(tmp_path, caplog):
    assert read_fingerprint(tmp_path) is None
    with caplog.at_level(logging.WARNING, logger="preftune.fingerprint"):
        assert check_resume(tmp_path, _fp(Config()), force=False) == []  # an older run: no record
    assert "no fingerprint.json" in caplog.text
    path = write_fingerprint(tmp_path, _fp(Config()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fingerprint.json"]  # no temp file left
    path.write_text('{"settings": ')  # torn
    with pytest.raises(RunFolderError, match=r"fingerprint\.json: unreadable"):
        check_resume(tmp_path, _fp(Config()), force=False)
    assert check_resume(tmp_path, _fp(Config()), force=True) == []


# ---------------------------------------------------------------------------------------------------
# Fresh starts


def _old_run(run_dir: Path, *, checkpoint: bool = True, fingerprint: dict | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("old: run\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 9}\n')
    if checkpoint:
        (run_dir / "checkpoints" / "step-00000009").mkdir(parents=True)
        (run_dir / "checkpoints" / "step-00000009" / "COMPLETE").write_text("9\n")
    if fingerprint is not None:
        write_fingerprint(run_dir, fingerprint)


def test_fresh_start_refuses_another_runs_folder_unless_overwrite(tmp_path):
    run = tmp_path / "run"
    assert prepare_fresh(run, overwrite=False) == []  # does not exist yet
    run.mkdir()
    (run / rf.LOCK_FILE).write_text("{}")
    assert prepare_fresh(run, overwrite=False) == []  # only our lock
    _old_run(run)
    with pytest.raises(RunFolderError) as err:
        prepare_fresh(run, overwrite=False)
    assert "checkpoints/" in str(err.value) and "train.overwrite=true" in str(err.value)
    assert (run / "checkpoints" / "step-00000009").is_dir()  # nothing touched
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (run / "tensorboard").symlink_to(outside)  # a link into another folder is unlinked, not emptied
    removed = prepare_fresh(run, overwrite=True)
    assert set(removed) == {"checkpoints/", "config.yaml", "metrics.jsonl", "tensorboard/"}
    assert sorted(p.name for p in run.iterdir()) == [rf.LOCK_FILE]
    assert (outside / "keep.txt").read_text() == "mine"


def test_a_folder_with_foreign_files_is_never_cleared(tmp_path):
    (tmp_path / "config.yaml").write_text("x")
    (tmp_path / "notes.txt").write_text("my notes")
    with pytest.raises(RunFolderError, match=r"holds files a run does not write \(notes\.txt\)"):
        prepare_fresh(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "config.yaml").exists()


def test_the_same_run_restarted_before_its_first_checkpoint_is_cleared(tmp_path):
    cfg = Config()
    _old_run(tmp_path, checkpoint=False, fingerprint=_fp(cfg))
    other = Config()
    other.optim.lr = 1.0
    with pytest.raises(RunFolderError, match="already holds a run"):
        prepare_fresh(tmp_path, overwrite=False, fingerprint=_fp(other))
    assert "metrics.jsonl" in prepare_fresh(tmp_path, overwrite=False, fingerprint=_fp(cfg))
    # With a checkpoint, the run is resumed instead: a fresh start is refused.
    _old_run(tmp_path, checkpoint=True, fingerprint=_fp(cfg))
    with pytest.raises(RunFolderError, match="already holds a run"):
        prepare_fresh(tmp_path, overwrite=False, fingerprint=_fp(cfg))


def test_output_dir_that_is_a_file_or_not_writable(tmp_path, monkeypatch):
    file = tmp_path / "out"
    file.write_text("x")
    with pytest.raises(RunFolderError, match=r"train.output_dir .*out is a file"):
        prepare_fresh(file, overwrite=True)
    with pytest.raises(RunFolderError, match=r"out is a file"):
        RunFolder(file).__enter__()
    with pytest.raises(RunFolderError, match=r"cannot be used: Not a directory"):
        RunFolder(file / "run").__enter__()  # a parent is a file
    run = tmp_path / "ro"
    run.mkdir()
    real_open = os.open

    def read_only(path, flags, *args):  # as root, chmod does not stop writes: simulate EACCES
        if str(path).startswith(str(run)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(rf.os, "open", read_only)
    with pytest.raises(RunFolderError, match=r"ro cannot be used: Permission denied"):
        RunFolder(run).__enter__()


# ---------------------------------------------------------------------------------------------------
# The folder's life


def test_a_failure_before_the_first_step_leaves_no_folder(tmp_path):
    run = tmp_path / "runs" / "a"
    with pytest.raises(RuntimeError, match="model folder is broken"), RunFolder(run):
        (run / "config.yaml").write_text("x")
        write_fingerprint(run, {"settings": {}})
        raise RuntimeError("model folder is broken")
    assert not run.exists() and not (tmp_path / "runs").exists()  # the parent it made too

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KeyboardInterrupt), RunFolder(empty):
        (empty / "config.yaml").write_text("x")
        raise KeyboardInterrupt
    assert empty.is_dir() and not list(empty.iterdir())  # as it was


def test_a_cleared_folder_is_emptied_again_when_the_new_run_fails_early(tmp_path):
    run = tmp_path / "run"
    _old_run(run)
    with pytest.raises(RuntimeError), RunFolder(run) as folder:
        assert folder.start_fresh(overwrite=True)  # the old run is cleared...
        (run / "config.yaml").write_text("new: run\n")
        raise RuntimeError("the model does not load")
    assert run.is_dir() and not list(run.iterdir())  # ...and the new one leaves nothing behind


def test_a_kept_or_resumed_folder_stays_and_the_lock_is_released(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError), RunFolder(run) as folder:
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
        folder.keep()
        raise RuntimeError("step 2 failed")
    assert (run / "metrics.jsonl").exists() and not (run / rf.LOCK_FILE).exists()
    # A resume that fails early: the old run's files stay.
    with pytest.raises(RuntimeError), RunFolder(run):
        raise RuntimeError("resume failed")
    assert (run / "metrics.jsonl").exists() and not (run / rf.LOCK_FILE).exists()
    with RunFolder(run):
        assert (run / rf.LOCK_FILE).exists()
    assert (run / "metrics.jsonl").exists() and not (run / rf.LOCK_FILE).exists()
