"""The ``drhouse`` command line: one entry point, one subcommand per job.

Each subcommand lives in the module that does the job; that module provides
``configure(parser)`` and ``run(args) -> int``. This file only wires them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("engine.launcher", "start Redis if needed, a worker and the configured frontends"),
    "worker": ("engine.launcher", "run one inference worker"),
    "chat": ("engine.launcher", "terminal chat (needs a running worker, or use 'up')"),
    "telegram": ("bots.telegram_bot", "run the Telegram frontend"),
    "discord": ("bots.discord_bot", "run the Discord frontend"),
    "compare": ("engine.launcher", "base model and adapters answer one message side by side"),
    "health": ("engine.launcher", "exit 0 when a worker reported recently (container checks)"),
    "data": ("persona.data", "prepare the House dialogue data set"),
    "train": ("persona.train", "train the House LoRA adapter"),
    "selector": ("persona.selector_train", "train or measure the response selector"),
    "judge": ("persona.judge", "train the fit judge (evaluation only)"),
    "eval": ("persona.evaluate", "evaluate persona quality of base, adapters and baselines"),
    "blind": ("persona.blind_check", "a reader does the persona classifier's job blind"),
    "bench": ("engine.bench", "benchmarks: serving, llama.cpp peer, micro-batching, queue"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drhouse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.configure(sub_parser, name)
        sub_parser.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
