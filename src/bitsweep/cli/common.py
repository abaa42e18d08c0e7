"""Argument helpers shared by the command modules."""

from __future__ import annotations

import argparse

from bitsweep.errors import BitsweepError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default and keeps the description's line breaks."""


def add_command(
    subparsers: argparse._SubParsersAction, name: str, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """Add a sub-command parser with the house formatter (defaults shown in --help)."""
    return subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def int_list(text: str) -> list[int]:
    """Parse ``"1,2,4"`` into ``[1, 2, 4]`` with a clear error for anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers like 1,2,4,8, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def str_list(text: str) -> list[str]:
    """Parse ``"a,b"`` into ``["a", "b"]``."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def require_positive(name: str, value: int) -> int:
    """Raise a user error unless ``value`` is a positive whole number."""
    if value <= 0:
        raise BitsweepError(f"{name} must be a positive whole number, got {value}")
    return value
