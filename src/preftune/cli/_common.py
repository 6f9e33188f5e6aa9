"""What the subcommand modules share: the usage-error type, parser pieces and input checks.

Nothing here imports torch or transformers at module level (``preftune --help`` must answer at once).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

PROG = "preftune"


class UsageError(Exception):
    """A bad command line or input path: reported as one line with exit code 2."""


class Parser(argparse.ArgumentParser):
    """Raises UsageError instead of printing usage and exiting, so that main() owns the message format."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def help_formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip("\n"), "  ")


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    func: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str,
    example_lines: str,
) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter, an ``examples:`` epilog, and ``func`` to run."""
    p = sub.add_parser(
        name,
        help=help,
        formatter_class=help_formatter,
        description=description,
        epilog=examples(example_lines),
    )
    p.set_defaults(func=func)
    return p


@contextlib.contextmanager
def usage_errors(*kinds: type[BaseException], context: str = "") -> Iterator[None]:
    """Re-raise ``kinds`` from the block as UsageError (exit 2), prefixed with ``context: `` if given."""
    try:
        yield
    except kinds as e:
        raise UsageError(f"{context}: {e}" if context else str(e)) from e


def existing_path(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} not found: {p}")
    return p


def existing_file(path: str | os.PathLike, what: str) -> Path:
    p = existing_path(path, what)
    if not p.is_file():
        raise UsageError(f"{what} is not a file: {p}")
    return p


def model_source(path: str, setting: str):
    """A model folder, .gguf file or Hub id as a :class:`preftune.model.ModelSource` (exit 2 if none)."""
    from preftune.model import resolve_source

    return resolve_source(path, setting=setting)


def quiet_transformers() -> None:
    """No "Loading weights" progress bar around a few lines of output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
