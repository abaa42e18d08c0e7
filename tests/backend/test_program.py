"""The integer program's plain-data pieces: grids, value-preserving ops, clear errors."""

from __future__ import annotations

import pytest
import torch

from bitsweep.backend.program import Grid, apply_op
from bitsweep.errors import BitsweepError


def test_grid_amax_covers_both_ends() -> None:
    assert Grid(0.1, -73, 182).amax == 182 and Grid(0.1, -128, 127).amax == 128


def test_value_preserving_ops_keep_integers() -> None:
    x = torch.arange(-8.0, 8.0).reshape(1, 1, 4, 4)
    assert torch.equal(apply_op(("flatten", 1, -1), x), x.flatten(1))
    assert torch.equal(apply_op(("method", "reshape", (1, 16)), x), x.reshape(1, 16))
    pooled = apply_op(("maxpool", 2, 2, 0, 1, False), x)
    assert pooled.flatten().tolist() == [-3.0, -1.0, 5.0, 7.0]


def test_unknown_op_is_a_clear_error() -> None:
    with pytest.raises(BitsweepError, match="unknown integer op"):
        apply_op(("softmax",), torch.zeros(1))
