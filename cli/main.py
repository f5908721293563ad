"""The ``drhouse`` command line: one entry point, one subcommand per job.

Each subcommand lives in the module that does the job; that module provides
``configure(parser)`` and ``run(args) -> int``, and may provide ``parent_parsers()``, whose
options the subcommand's parser takes over (``train``: TRL's parser). ``run`` also finds the
subcommand's own command-line words in ``args.argv`` (``train`` reads them again with TRL's
YAML handling). This file only wires them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("cli.launcher", "start Redis if needed, a worker and the configured frontends"),
    "worker": ("cli.launcher", "run one inference worker"),
    "chat": ("cli.launcher", "terminal chat (needs a running worker, or use 'up')"),
    "telegram": ("bots.platforms", "run the Telegram frontend"),
    "discord": ("bots.platforms", "run the Discord frontend"),
    "compare": ("cli.launcher", "base model and adapters answer one message side by side"),
    "health": ("cli.launcher", "exit 0 when a worker reported recently (container checks)"),
    "data": ("persona.data", "prepare the House dialogue data set"),
    "train": ("offline.train", "train the House LoRA adapter"),
    "selector": ("offline.selector_train", "train or measure the response selector"),
    "judge": ("offline.judge", "the fit judge (evaluation only): train it, measure it"),
    "eval": ("offline.evaluate", "evaluate persona quality of base, adapters and baselines"),
    "blind": ("offline.blind_check", "a reader does the persona classifier's job blind"),
    "gpu-check": ("offline.gpu_check", "the GPU paths in one short run: 4-bit and bf16 "
                                        "generation, batch invariance, QLoRA steps"),
    "bench": ("cli.bench", "benchmarks: serving, llama.cpp peer, micro-batching, queue, "
                           "training precision"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed; only ``command``'s module is imported (all of
    them when None), so a frontend image that holds no engine still runs ``drhouse telegram``."""
    parser = argparse.ArgumentParser(prog="drhouse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if command is None or name == command:
            module = importlib.import_module(module_name)
            parents = module.parent_parsers() if hasattr(module, "parent_parsers") else []
            sub_parser = sub.add_parser(name, help=help_text, description=help_text,
                                        parents=parents)
            module.configure(sub_parser, name)
            sub_parser.set_defaults(module=module)
        else:
            sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1:]
    try:
        return int(args.module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
