"""Not built yet: issue #4 fills this subcommand."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.set_defaults(action=name)


def run(args: argparse.Namespace) -> int:
    print(f"drhouse {args.action}: not built yet (issue #4).", file=sys.stderr)
    return 2
