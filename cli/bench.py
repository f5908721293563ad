"""``drhouse bench``: the serving benchmarks of :mod:`engine.bench`, and ``bench precision``,
the training one (:func:`offline.train.measure_precision`: fp32 vs bf16-autocast LoRA steps
on the same batches, interleaved rounds, the median round's tokens/s). It is registered here,
in the top layer, because ``engine/`` does not import ``offline/``.

    drhouse bench precision --steps 3 --train-args="--torch-threads 1 --max-train-samples 256"
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from engine import bench as serving


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    serving.configure(parser, name, more=("precision",))
    group = parser.add_argument_group("precision", "options of 'bench precision' (training)")
    group.add_argument("--steps", type=int, default=3,
                       help="forward+backward micro-batches per round and precision (default 3)")
    group.add_argument("--train-args", default="", metavar="'OPTIONS'",
                       help="drhouse train options for both set-ups, in one string, e.g. "
                            "--train-args=\"--torch-threads 1 --per-device-train-batch-size 16\" "
                            "(the YAML is offline/train_config.yaml unless they name --config)")


def run(args: argparse.Namespace) -> int:
    if args.which != "precision":
        return serving.run(args)
    from offline.train import check_data, measure_precision, parse_train_args

    try:
        train_args = parse_train_args(shlex.split(args.train_args))
        check_data(train_args[0])
    except ValueError as error:
        print(f"drhouse bench precision: {error}", file=sys.stderr)
        return 2
    results = measure_precision(train_args, args.steps, args.rounds)
    print(json.dumps(results, indent=2))
    print(f"bf16 autocast / fp32 = {results['bf16_speedup']:.2f}x "
          f"({results['bf16']['tokens_per_s']} vs {results['fp32']['tokens_per_s']} tokens/s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"precision": results}, indent=2))
        print(f"figures written to {args.json}")
    return 0
