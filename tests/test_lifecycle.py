"""preftune.lifecycle: what happens around the loop — a device that does not exist refused before anything
loads, the stop flag (a signal finishes the step; a second Ctrl-C stops at once; handlers restored), a full
disk named in one line. Start, resume and the final folder run end to end in tests/test_trainer.py."""

from __future__ import annotations

import errno
import os
import signal

import pytest
import torch

from preftune.config import ConfigError
from preftune.lifecycle import StopFlag, check_device, no_space_message


def test_a_device_that_is_not_here_is_a_config_error():
    assert check_device(torch.device("cpu")) == torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"cuda:{count} is not available here"):
        check_device(torch.device("cuda", count))


def test_stop_flag_finishes_the_step_then_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = StopFlag()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (the main) thread at once
        assert stop.requested and (stop.signame, stop.signum) == ("SIGTERM", signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):  # an impatient second Ctrl-C: stop now
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_no_space_message_names_the_file():
    inner = OSError(
        errno.ENOSPC, "No space left on device", "/runs/a/checkpoint-3/model.safetensors"
    )
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as outer:
        text = no_space_message(outer, "/runs/a")
    assert text.startswith("no space left on /runs/a/checkpoint-3/model.safetensors: save failed")
