"""`prunenet` command line: a thin layer over the library, one module per subcommand."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from prunenet.commands import eval as eval_command
from prunenet.commands import pareto, prune, recover, train
from prunenet.errors import PruneNetError, Terminated

COMMANDS = [prune, train, eval_command, recover, pareto]


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
    # The command line as typed, for the records a command writes (prunenet_request.json).
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # Signal handlers can only be set from the main thread (callers may run main elsewhere).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.run(args) or 0
    except PruneNetError as error:
        print(f"prunenet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        # Writers clean up on the way out (staging folders, locks); say so instead of a traceback.
        name = "SIGTERM" if isinstance(interrupt, Terminated) else "Ctrl-C"
        print(
            f"prunenet {args.command}: interrupted by {name}; nothing partial was left at the "
            "output path.",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
