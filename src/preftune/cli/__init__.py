"""Command line: ``preftune train | demo | data | eval | generate | plot``.

This module assembles the parser and owns errors and exit codes; the subcommands live beside it:
:mod:`~preftune.cli.train` (train, plan, demo), :mod:`~preftune.cli.inspection` (data),
:mod:`~preftune.cli.evaluate` (eval), :mod:`~preftune.cli.tools` (generate, plot) and
:mod:`~preftune.cli.onpolicy` (sample, judge, pairs, loop, geneval). Every heavy import (torch, transformers, the trainer) happens
inside the subcommand that needs it, so that ``preftune --help`` answers at once.

Exit codes: 0 success; 2 usage, config or data error (one line ``preftune: error: ...`` on stderr, no
traceback); 1 a failure during training (message and the last checkpoint); 130 interrupted (SIGINT; 143 for
SIGTERM: both after a checkpoint, with the resume hint).
``PREFTUNE_DEBUG=1`` re-raises instead, with the traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys

from preftune.cli import evaluate, inspection, onpolicy, tools, train
from preftune.cli._common import PROG, Parser, UsageError, examples, help_formatter
from preftune.cli.train import parse_sweep
from preftune.config import ConfigError

__all__ = ["UsageError", "build_parser", "main", "parse_sweep"]

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        formatter_class=help_formatter,
        description="Preference tuning (DPO and its family) for Hugging Face causal LMs.",
        epilog=examples(
            """
            preftune demo                                  # offline demo, about 3 minutes on CPU
            preftune data configs/dpo.yaml                 # check and describe the data
            preftune train configs/dpo.yaml loss.beta=0.05 # train with an override
            preftune plot runs/dpo                         # curves of a run to a PNG
            """
        )
        + "\n\nexit codes: 0 ok, 1 training failed, 2 usage/config/data error, 130 interrupted"
        " (143: SIGTERM)."
        "\nPREFTUNE_DEBUG=1 shows tracebacks.",
    )
    from preftune import __version__

    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for group in (train, inspection, evaluate, tools, onpolicy):  # the order of `preftune --help`
        group.add_commands(sub)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # `train cfg.yaml --print-config a=1`: argparse leaves overrides after an option unparsed.
    if extras and hasattr(args, "overrides") and all(_OVERRIDE.match(x) for x in extras):
        args.overrides = [*args.overrides, *extras]
        extras = []
    if extras:
        where = f"{PROG} {args.command}" if args.command else PROG
        raise UsageError(f"unrecognized arguments: {' '.join(extras)} (see '{where} --help')")
    return args


# ---------------------------------------------------------------------------------------------------
# Entry point


# Modules whose errors are usage errors (exit 2): a bad model folder, a run folder that cannot be used as
# asked (locked, another run's, changed settings), checkpoints none of which can be resumed from. Looked up
# by module name: an error can only have been raised if its module was imported, and `--help` imports none.
_USAGE_ERRORS = (
    ("preftune.data", "DataError"),
    ("preftune.model", "ModelError"),
    ("preftune.fingerprint", "RunFolderError"),
    ("preftune.checkpoint_files", "CheckpointError"),
)


def _error_kind(exc: BaseException) -> str | None:
    """'usage' (exit 2), 'interrupted' (128 + signal), 'training' (exit 1) or None (a bug: let the
    traceback through)."""
    if isinstance(exc, (UsageError, ConfigError, FileNotFoundError)):
        return "usage"
    for module, name in _USAGE_ERRORS:
        mod = sys.modules.get(module)
        if mod is not None and isinstance(exc, getattr(mod, name, ())):
            return "usage"
    trainer = sys.modules.get("preftune.trainer")  # re-exports preftune.lifecycle's errors
    if trainer is not None and isinstance(exc, getattr(trainer, "TrainingInterrupted", ())):
        return "interrupted"
    if trainer is not None and isinstance(exc, getattr(trainer, "TrainingError", ())):
        return "training"
    checkpoint = sys.modules.get("preftune.checkpoint_files")
    if checkpoint is not None and checkpoint.is_disk_full(exc):  # outside a training step too
        return "training"
    return None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename}"
    if isinstance(exc, OSError) and exc.filename and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {exc.filename} ({exc.strerror})"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each line, not as it was when the handler was made: a caller that
    redirects stderr (``contextlib.redirect_stderr``, a notebook, a test's capture) gets preftune's lines, and
    one that closed its stream gets no logging error."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    """preftune's own INFO lines (the layout a run uses, caches hit, resumes) as ``preftune: ...`` on
    stderr; on rank 0 only under torchrun. Library users keep their own logging configuration."""
    logger = logging.getLogger("preftune")
    if logger.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("PREFTUNE_DEBUG", "") not in ("", "0")
    _setup_logging()
    try:
        try:
            args = _parse(argv)
        except SystemExit as e:  # --help / --version
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        kind = _error_kind(exc)
        if kind is None or debug:
            raise
        if kind == "usage":
            print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        if kind == "interrupted":  # after a checkpoint: 128 + the signal, as a shell reports it
            print(f"{PROG}: interrupted: {_one_line(exc)}", file=sys.stderr)
            _print_checkpoint(exc, hint=False)  # the message has the hint
            return 128 + int(getattr(exc, "signum", 2) or 2)
        print(f"{PROG}: training failed: {_one_line(exc)}", file=sys.stderr)
        _print_checkpoint(exc)
        return 1


def _print_checkpoint(exc: BaseException, *, hint: bool = True) -> None:
    ckpt = getattr(exc, "last_checkpoint", None)
    if ckpt is not None:
        more = " (resume with train.resume=auto)" if hint else ""
        print(f"last checkpoint: {ckpt}{more}", file=sys.stderr)
    else:
        print("no checkpoint was saved", file=sys.stderr)
