"""Command line entry point (placeholder until the CLI lands)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("preftune: CLI not implemented yet", file=sys.stderr)
    return 2
