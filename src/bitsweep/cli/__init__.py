"""The ``bitsweep`` command: a thin shell that parses arguments and calls the library.

Each command lives in its own module exposing ``register(subparsers)``, which
adds its parser and sets ``func`` to a ``run(args) -> int`` function. User
errors (:class:`~bitsweep.errors.BitsweepError`) are printed as one line on
stderr with exit status 2; Ctrl-C exits with 130 after the command's own
cleanup (checkpoints and results are written atomically, so nothing is left
half-written).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from bitsweep import __version__
from bitsweep.errors import BitsweepError

# Command modules in the order ``bitsweep --help`` lists them.
COMMANDS: tuple[str, ...] = ("quickstart", "train", "eval", "quantize", "export", "sweep", "report")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available command registered."""
    parser = argparse.ArgumentParser(
        prog="bitsweep",
        description="Train small image classifiers, quantize them to any bit width, "
        "and measure exactly what was gained and what was lost.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'bitsweep COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"bitsweep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"bitsweep.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bitsweep.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bitsweep`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except BitsweepError as e:
        print(f"bitsweep {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bitsweep {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
