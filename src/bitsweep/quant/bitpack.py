"""Bit packing: integers of any width 1..16 stored back to back in a byte string.

A 3-bit weight should cost 3 bits on disk, not 8 or 32. :func:`pack` writes
``count`` values of ``bits`` bits each into ``ceil(count * bits / 8)`` bytes
and :func:`unpack` reverses it exactly.

Layout (the file format depends on it, so it is fixed):

* Bit stream order is little-endian, least significant bit first: value ``i``
  occupies stream bits ``[i * bits, (i + 1) * bits)``, and stream bit ``k`` is
  bit ``k % 8`` (value ``1 << (k % 8)``) of byte ``k // 8``. So four 2-bit
  values share a byte (the first in the lowest two bits) and 3-bit values
  straddle byte boundaries.
* Signed values are stored in ``bits``-bit two's complement: the low ``bits``
  bits of the value; :func:`unpack` sign-extends them. Signed range is
  ``[-2**(bits-1), 2**(bits-1) - 1]``, unsigned ``[0, 2**bits - 1]``.
* Unused high bits of the last byte are zero.

>>> import numpy as np
>>> data = pack(np.array([1, 2, 3, 0]), bits=2, signed=False)
>>> data.tolist(), f"{data[0]:08b}"
([57], '00111001')
>>> unpack(pack(np.array([-4, 3, -1]), bits=3, signed=True), bits=3, signed=True, count=3).tolist()
[-4, 3, -1]
"""

from __future__ import annotations

import numpy as np
import torch

from bitsweep.errors import BitsweepError

MAX_BITS = 16


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """The (min, max) integer a ``bits``-bit field holds.

    >>> int_range(4, True), int_range(4, False), int_range(1, True)
    ((-8, 7), (0, 15), (-1, 0))
    """
    _check_bits(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that :func:`pack` uses for ``count`` values of ``bits`` bits (whole bytes, rounded up).

    >>> packed_nbytes(5, 3)
    2
    """
    _check_bits(bits)
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise BitsweepError(f"bit width must be a whole number from 1 to {MAX_BITS}, got {bits!r}")


def _as_int64(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        if values.is_floating_point():
            if not torch.equal(values, values.round()):
                raise BitsweepError("pack expects integer values; round/quantize the tensor first")
        values = values.detach().to("cpu", torch.int64).numpy()
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise BitsweepError("pack expects integer values; round/quantize the array first")
    elif arr.dtype.kind not in "iub":
        raise BitsweepError(f"pack expects an integer array, got dtype {arr.dtype}")
    return arr.astype(np.int64).reshape(-1)


def pack(values: np.ndarray | torch.Tensor, bits: int, signed: bool) -> np.ndarray:
    """Pack integers into a little-endian bit stream, ``bits`` bits per value.

    Args:
        values: integers of any shape (flattened in C order); must fit ``int_range(bits, signed)``.
        bits: field width, 1..16.
        signed: store two's complement (True) or plain unsigned (False).

    Returns:
        A uint8 array of ``packed_nbytes(values.size, bits)`` bytes.

    Raises:
        BitsweepError: for a width outside 1..16 or a value that does not fit,
            because silently wrapping would corrupt the model.
    """
    _check_bits(bits)
    flat = _as_int64(values)
    lo, hi = int_range(bits, signed)
    if flat.size and (flat.min() < lo or flat.max() > hi):
        raise BitsweepError(
            f"values in [{flat.min()}, {flat.max()}] do not fit {bits}-bit {'signed' if signed else 'unsigned'} "
            f"range [{lo}, {hi}]; quantize to this width before packing"
        )
    codes = (flat & ((1 << bits) - 1)).astype(np.uint32)  # two's complement low bits; no-op for unsigned
    # (N,) -> (N, bits): bit j of every value, least significant first.
    shifts = np.arange(bits, dtype=np.uint32)
    bit_matrix = ((codes[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def unpack(data: np.ndarray | bytes, bits: int, signed: bool, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: read ``count`` values of ``bits`` bits from ``data``.

    Args:
        data: the packed bytes (uint8 array or bytes).
        bits: field width used when packing.
        signed: whether the values were packed as two's complement.
        count: number of values to read.

    Returns:
        An int64 array of shape ``(count,)``.

    Raises:
        BitsweepError: when ``data`` is shorter or longer than ``count`` values need,
            which means the file is truncated or its metadata does not match.
    """
    _check_bits(bits)
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data)
    if buf.dtype != np.uint8:
        raise BitsweepError(f"packed data must be uint8 bytes, got dtype {buf.dtype}")
    need = packed_nbytes(count, bits)
    if buf.size != need:
        raise BitsweepError(f"packed data holds {buf.size} bytes but {count} values of {bits} bits need {need}")
    # (nbytes,) -> (count * bits,) -> (count, bits)
    bit_matrix = np.unpackbits(buf.reshape(-1), count=count * bits, bitorder="little").reshape(count, bits)
    weights = np.int64(1) << np.arange(bits, dtype=np.int64)
    codes: np.ndarray = bit_matrix.astype(np.int64) @ weights
    if signed:
        sign = np.int64(1) << (bits - 1)
        codes = (codes ^ sign) - sign  # sign-extend the bits-bit two's complement field
    return codes
