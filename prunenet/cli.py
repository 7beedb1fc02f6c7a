"""`prunenet` command line: a thin layer over the library, one module per subcommand."""

from __future__ import annotations

import argparse
import sys

from prunenet.commands import eval as eval_command
from prunenet.commands import prune, train
from prunenet.errors import PruneNetError

COMMANDS = [prune, train, eval_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunenet",
        description=(
            "Calibration-free structured pruning of LLM feed-forward layers. "
            "Scores every FFN neuron from the model itself (no dataset), removes the "
            "lowest-scoring rows and writes a model that plain transformers loads."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except PruneNetError as error:
        print(f"prunenet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
