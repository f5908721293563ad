"""Not built yet: issue #5 fills this subcommand."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.set_defaults(action=name)


def run(args: argparse.Namespace) -> int:
    print(f"drhouse {args.action}: not built yet (issue #5).", file=sys.stderr)
    return 2
