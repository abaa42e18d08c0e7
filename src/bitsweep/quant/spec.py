"""QuantSpec: what one quantizer does, as plain frozen data.

A spec says how many bits, whether the integer grid is signed, whether zero
sits in the middle of it (symmetric, zero_point = 0) and whether one scale
covers the whole tensor or each output channel gets its own. Everything else
(observers, modules, the sweep) reads these fields; nothing hides a bit width
in a class name, so 3 or 7 bits need no special code.

Binary (1-bit signed symmetric) is the one special grid: its two levels are
{-1, +1} times the scale (zero is not a level), because a signed 1-bit
two's-complement grid {-1, 0} would throw away the sign of every weight.
"""

from __future__ import annotations

from dataclasses import dataclass

GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_channel")
MIN_BITS, MAX_BITS = 1, 16


def check_bits(bits: object, what: str = "bits") -> int:
    """Return ``bits`` if it is a whole number in 1..16, else raise ValueError saying so.

    >>> check_bits(4)
    4
    >>> check_bits(2.5)
    Traceback (most recent call last):
    ...
    ValueError: bits must be a whole number from 1 to 16, got 2.5
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be a whole number from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Attributes:
        bits: integer width, 1..16.
        signed: integer grid centred on zero (``-2**(bits-1)..2**(bits-1)-1``) rather than ``0..2**bits-1``.
        symmetric: zero_point fixed at 0; the scale comes from max |x|.
        narrow_range: drop the most negative level so a signed grid is symmetric (-127..127 for 8 bits).
        granularity: ``per_tensor`` (one scale) or ``per_channel`` (one scale per slice along ``channel_axis``).
        channel_axis: the axis that gets its own scale; 0 is the output channel of Conv2d and Linear weights.

    >>> QuantSpec(4).qmin, QuantSpec(4).qmax
    (-8, 7)
    >>> QuantSpec(8, signed=False, symmetric=False).qmax
    255
    >>> QuantSpec(1).binary, QuantSpec(1).qmin, QuantSpec(1).qmax
    (True, -1, 1)
    >>> QuantSpec(0)
    Traceback (most recent call last):
    ...
    ValueError: bits must be a whole number from 1 to 16, got 0
    """

    bits: int
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: str = "per_tensor"
    channel_axis: int = 0

    def __post_init__(self) -> None:
        check_bits(self.bits)
        for name in ("signed", "symmetric", "narrow_range"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if isinstance(self.channel_axis, bool) or not isinstance(self.channel_axis, int):
            raise ValueError(f"channel_axis must be a whole number, got {self.channel_axis!r}")
        if self.narrow_range and not self.signed:
            raise ValueError("narrow_range applies to signed grids only; set signed=True or narrow_range=False")

    @property
    def binary(self) -> bool:
        """True for the 1-bit signed symmetric grid {-1, +1} (sign times scale)."""
        return self.bits == 1 and self.signed and self.symmetric

    @property
    def per_channel(self) -> bool:
        """True when each slice along ``channel_axis`` has its own scale."""
        return self.granularity == "per_channel"

    @property
    def qmin(self) -> int:
        """Smallest integer level."""
        return qrange(self.bits, self.signed, self.narrow_range, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        """Largest integer level."""
        return qrange(self.bits, self.signed, self.narrow_range, self.symmetric)[1]

    @property
    def levels(self) -> int:
        """Number of distinct representable values (2 for binary)."""
        return 2 if self.binary else self.qmax - self.qmin + 1


def qrange(bits: int, signed: bool = True, narrow_range: bool = False, symmetric: bool = True) -> tuple[int, int]:
    """Integer range (qmin, qmax) of a ``bits``-wide grid.

    Binary (1-bit, signed, symmetric) returns (-1, 1) although 0 is not a level:
    its integers are the signs -1 and +1.

    >>> qrange(8), qrange(8, narrow_range=True), qrange(8, signed=False)
    ((-128, 127), (-127, 127), (0, 255))
    >>> qrange(2, narrow_range=True)
    (-1, 1)
    >>> qrange(1), qrange(1, signed=False), qrange(1, symmetric=False)
    ((-1, 1), (0, 1), (-1, 0))
    """
    check_bits(bits)
    if not signed:
        return 0, 2**bits - 1
    if bits == 1:
        return (-1, 1) if symmetric else (-1, 0)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (qmin + 1 if narrow_range else qmin), qmax
