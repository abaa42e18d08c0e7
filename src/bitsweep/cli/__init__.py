"""The ``bitsweep`` command: a thin shell that parses arguments and calls the library.

Each command lives in its own module exposing ``register(subparsers)``, which
adds its parser and sets ``func`` to a ``run(args) -> int`` function. User
errors (:class:`~bitsweep.errors.BitsweepError`) are printed as one line on
stderr with exit status 2; Ctrl-C exits with 130 after the command's own
cleanup (checkpoints and results are written atomically, so nothing is left
half-written). Mistyped arguments get one line too (with a pointer to
``--help``), also with exit status 2.

Threads: ``OMP_WAIT_POLICY=PASSIVE`` is set (unless the user set it) before
the first ``import torch``, because OpenMP reads it once when torch loads it;
idle threads then sleep instead of spinning. Measured on 2 cores with another
process spinning on one (quickstart recipe, 4 epochs): two threads trained at
18 img/s with ACTIVE (8-15 with libgomp's default) and 490 with PASSIVE; one
thread at about 690 either way. So every command with ``--threads`` also gets
:func:`bitsweep.runtime.choose_threads` (free cores, here 1) by default.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from bitsweep import __version__
from bitsweep.errors import BitsweepError

# Command modules in the order ``bitsweep --help`` lists them.
COMMANDS: tuple[str, ...] = ("quickstart", "train", "eval", "quantize", "qat", "export", "sweep", "search", "report")


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2 (sub-command parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see 'PROG --help')`` on stderr and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available command registered."""
    parser = ArgumentParser(
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
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before build_parser imports torch (module docstring)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed its one-line error (exit 2) or --help (exit 0)
        return e.code if isinstance(e.code, int) else 2
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        if hasattr(args, "threads"):
            import torch  # here, not at the top: OMP_WAIT_POLICY must be set before torch loads

            from bitsweep.runtime import choose_threads

            args.threads = choose_threads(args.threads)
            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except BitsweepError as e:
        print(f"bitsweep {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bitsweep {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
