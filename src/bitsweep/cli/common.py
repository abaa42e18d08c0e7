"""Argument helpers shared by the command modules: list parsing, threads, output checks."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bitsweep.errors import BitsweepError
from bitsweep.quant.methods import PTQ_METHODS, RECONSTRUCTION_IMAGES
from bitsweep.quant.scale_dtype import SCALE_DTYPES
from bitsweep.quant.spec import MAX_BITS, MIN_BITS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default once and keeps the description's line breaks.

    A help string that explains its default in words ("default: beside the
    input") is left alone, and so are options whose default is no value (None,
    False, an empty list); list defaults are shown as typed (``1,2,4``).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, [], argparse.SUPPRESS):
            return help_text
        if isinstance(action.default, (list, tuple)):
            return f"{help_text} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


def add_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Add a sub-command parser with the house formatter (defaults shown in --help)."""
    return subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def int_list(text: str) -> list[int]:
    """Parse ``"1,2,4"`` into ``[1, 2, 4]``; empty items and repeated values are refused.

    >>> int_list("4,8")
    [4, 8]
    >>> int_list("4,,8")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: empty item in '4,,8'; write comma-separated whole numbers like 1,2,4
    """
    items = [v.strip() for v in text.split(",")]
    if any(not v for v in items):
        raise argparse.ArgumentTypeError(f"empty item in '{text}'; write comma-separated whole numbers like 1,2,4")
    try:
        values = [int(v) for v in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers like 1,2,4,8, got '{text}'") from None
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        twice = ", ".join(map(str, repeated))
        raise argparse.ArgumentTypeError(f"{twice} given twice in '{text}'; list each value once")
    return values


def bit_list(text: str) -> list[int]:
    """:func:`int_list` of bit widths, each from 1 to 16.

    >>> bit_list("4,32")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: bit width 32 in '4,32' is out of range; bit widths are 1 to 16
    """
    values = int_list(text)
    for v in values:
        if not MIN_BITS <= v <= MAX_BITS:
            raise argparse.ArgumentTypeError(
                f"bit width {v} in '{text}' is out of range; bit widths are {MIN_BITS} to {MAX_BITS}"
            )
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


OBSERVERS_HELP = (
    "range observer: minmax, moving_average, percentile or mse for weights and activations, or "
    "WEIGHTS/ACTIVATIONS such as mse/minmax (MSE weight scales, min-max activation ranges)"
)


def add_observer_option(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """``--observer``: one observer, or ``WEIGHTS/ACTIVATIONS`` (a comma-separated sweep axis when ``several``)."""
    if several:
        parser.add_argument("--observer", type=str_list, default=["minmax"],
                            help=f"{OBSERVERS_HELP}; comma-separated to sweep several (default: minmax)")  # fmt: skip
    else:
        parser.add_argument("--observer", default="minmax", help=f"{OBSERVERS_HELP} (default: minmax)")


def add_threads_option(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--threads``: torch threads; the CLI's ``main`` resolves and applies it before the command runs.

    Args:
        parser: The command's parser.
        note: Added to the help text (what the command does with the count).
    """
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help=f"torch CPU threads{note} (default: the cores not kept busy by other processes per the load average, "
        "at least 1)",
    )  # fmt: skip


def add_scale_dtype_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--scale-dtype``: how weight scales and biases are rounded and stored (``QuantConfig.scale_dtype``).

    Args:
        parser: The command's parser.
        default: The command's default; None means float32 unless a ``--layer-bits`` file names one
            (an option given on the command line wins over the file).
    """
    when = f"default: {default}" if default else "default: the --layer-bits file's, else float32"
    parser.add_argument(
        "--scale-dtype", choices=SCALE_DTYPES, default=default,
        help="weight scales and biases rounded to, and stored in the packed file as, this dtype; float16 "
        f"halves their bytes and is exact (the model computes with the rounded values) ({when})",
    )  # fmt: skip


def check_writable(folder: str | Path, option: str) -> Path:
    """Fail now, before any work, unless files can be created in ``folder`` (made later if missing).

    The check writes and removes one empty file in the nearest folder that
    exists, so it sees what a real write would see (read-only mounts, a file
    where a folder should be, root's permissions), and creates nothing else.

    Args:
        folder: Where the command will write (created by the command if missing).
        option: The option that chose it, named in the message (``--output``).

    Returns:
        ``folder`` as a Path.
    """
    path = Path(folder)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise BitsweepError(f"cannot write to {path} ({option}): {existing} is a file, not a folder; "
                            "choose another path")  # fmt: skip
    try:
        fd, probe = tempfile.mkstemp(prefix=".bitsweep-write-check-", dir=existing)
    except OSError as e:
        raise BitsweepError(
            f"cannot write to {path} ({option}): {e.strerror or e} in {existing}; choose a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path


def add_method_options(parser: argparse.ArgumentParser, *, several: bool = False, prefix: str = "method") -> None:
    """``--method`` (or ``--methods`` for a sweep axis), ``--method-images`` and ``--method-iterations``.

    With another ``prefix`` (``qat`` uses ``init``) only ``--PREFIX-images`` and ``--PREFIX-iterations``
    are added: the caller names the method itself.
    """
    names = ", ".join(PTQ_METHODS) + " or a chain such as cle+qdrop"
    if prefix == "method":
        if several:
            parser.add_argument(
                "--methods", type=str_list, default=["rtn"],
                help=f"post-training methods to sweep: {names} (default: rtn)",
            )  # fmt: skip
        else:
            parser.add_argument("--method", default="rtn", help=f"post-training method: {names} (default: rtn)")
    parser.add_argument(
        f"--{prefix}-images", dest="method_images", type=int, metavar="N", default=RECONSTRUCTION_IMAGES,
        help="calibration images the learned methods fit on",
    )  # fmt: skip
    parser.add_argument(
        f"--{prefix}-iterations", dest="method_iterations", type=int, metavar="N", default=None,
        help="optimisation steps per layer/block of adaround, brecq and qdrop (default: the method's)",
    )  # fmt: skip


def method_options(args: argparse.Namespace, prefix: str = "method") -> dict[str, int | bool]:
    """The ``options`` for :func:`bitsweep.quant.ptq` from :func:`add_method_options`'s arguments."""
    require_positive(f"--{prefix}-images", args.method_images)
    options: dict[str, int | bool] = {"images": args.method_images}
    if args.method_iterations is not None:
        options["iterations"] = require_positive(f"--{prefix}-iterations", args.method_iterations)
    return options
