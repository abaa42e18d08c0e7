"""Property tests: pack/unpack round-trips exactly for every width, length and extreme."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsweep.errors import BitsweepError
from bitsweep.quant.bitpack import int_range, pack, packed_nbytes, unpack


@st.composite
def _packable(draw: st.DrawFn) -> tuple[list[int], int, bool]:
    bits = draw(st.integers(1, 16))
    signed = draw(st.booleans())
    lo, hi = int_range(bits, signed)
    values = draw(st.lists(st.integers(lo, hi), min_size=0, max_size=67))
    return values, bits, signed


@settings(max_examples=300, deadline=None)
@given(_packable())
def test_round_trip_any_width(case: tuple[list[int], int, bool]) -> None:
    values, bits, signed = case
    data = pack(np.array(values, dtype=np.int64), bits, signed)
    assert data.dtype == np.uint8
    assert data.size == packed_nbytes(len(values), bits) == (len(values) * bits + 7) // 8
    assert unpack(data, bits, signed, len(values)).tolist() == values


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("signed", [True, False])
def test_extremes_and_odd_length(bits: int, signed: bool) -> None:
    lo, hi = int_range(bits, signed)
    values = np.array([lo, hi, lo, hi, 0, hi, lo], dtype=np.int64)  # odd length 7
    out = unpack(pack(values, bits, signed), bits, signed, values.size)
    np.testing.assert_array_equal(out, values)


def test_known_layouts() -> None:
    # Four 2-bit values in one byte, the first in the lowest bits.
    assert pack(np.array([3, 0, 0, 0]), 2, False).tolist() == [0b00000011]
    assert pack(np.array([0, 0, 0, 3]), 2, False).tolist() == [0b11000000]
    # 3-bit values straddle bytes: 8 values -> exactly 3 bytes, all ones for 7s.
    assert pack(np.full(8, 7), 3, False).tolist() == [255, 255, 255]
    # -1 in 3-bit two's complement is 0b111; one value leaves the high bits zero.
    assert pack(np.array([-1]), 3, True).tolist() == [0b00000111]
    # 16-bit values are little-endian byte pairs.
    assert pack(np.array([0x1234]), 16, False).tolist() == [0x34, 0x12]


def test_accepts_torch_tensors_of_any_shape() -> None:
    t = torch.randint(-8, 8, (4, 3, 3, 3), dtype=torch.int8)
    out = unpack(pack(t, 4, True), 4, True, t.numel())
    assert torch.equal(torch.from_numpy(out).reshape(t.shape).to(torch.int8), t)


def test_rejects_out_of_range_and_bad_width() -> None:
    with pytest.raises(BitsweepError, match="do not fit 3-bit signed"):
        pack(np.array([4]), 3, True)
    with pytest.raises(BitsweepError, match="do not fit 2-bit unsigned"):
        pack(np.array([-1]), 2, False)
    with pytest.raises(BitsweepError, match="1 to 16"):
        pack(np.array([0]), 17, False)
    with pytest.raises(BitsweepError, match="integer values"):
        pack(np.array([0.5]), 4, False)


def test_unpack_rejects_wrong_length() -> None:
    data = pack(np.arange(10), 4, False)
    with pytest.raises(BitsweepError, match="holds 4 bytes"):
        unpack(data[:-1], 4, False, 10)
