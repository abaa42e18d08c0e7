from __future__ import annotations

import pytest

from bitsweep.errors import BitsweepError
from bitsweep.sweep.grid import AXES, Cell, baseline_cell, expand_grid


def test_expand_full_grid_has_baseline_first_and_every_combination() -> None:
    cells = expand_grid({"weight_bits": [1, 2, 4, 8, 16], "activation_bits": [1, 2, 4, 8, 16]})
    assert cells[0] == baseline_cell() and cells[0].is_baseline
    pairs = {(c.weight_bits, c.activation_bits) for c in cells[1:]}
    assert pairs == {(w, a) for w in (1, 2, 4, 8, 16) for a in (1, 2, 4, 8, 16)}
    assert len(cells) == 26
    assert len({c.cell_id for c in cells}) == 26


def test_extra_axes_multiply_and_duplicates_collapse() -> None:
    cells = expand_grid(
        {"weight_bits": [4, 4, 8], "activation_bits": [8], "granularity": ["per_channel", "per_tensor"], "observer": ["minmax", "mse"]},
        include_baseline=False,
    )
    assert len(cells) == 2 * 2 * 2
    assert {c.granularity for c in cells} == {"per_channel", "per_tensor"}


def test_cell_id_is_stable_and_depends_on_every_axis() -> None:
    base = Cell(4, 8)
    assert base.cell_id == Cell(4, 8, "per_channel", "minmax", True).cell_id
    assert len(base.cell_id) == 12 and int(base.cell_id, 16) >= 0
    variants = [Cell(4, 4), Cell(8, 8), Cell(4, 8, granularity="per_tensor"), Cell(4, 8, observer="mse"), Cell(4, 8, symmetric=False)]
    assert len({base.cell_id, *(v.cell_id for v in variants)}) == 6
    # the id is a content hash, fixed across processes and releases (resume depends on it)
    assert Cell(4, 8).cell_id == "%s" % Cell.from_dict(Cell(4, 8).to_dict()).cell_id


def test_from_dict_ignores_metric_columns() -> None:
    cell = Cell(2, 16, "per_tensor", "mse")
    row = {**cell.to_dict(), "val_top1": 50.0, "cell_id": "x"}
    assert Cell.from_dict(row) == cell
    assert set(AXES) == set(cell.to_dict())


@pytest.mark.parametrize(
    ("axes", "needle"),
    [
        ({"weight_bits": [], "activation_bits": [8]}, "has no values"),
        ({"weight_bits": [0], "activation_bits": [8]}, "1 to 16"),
        ({"weight_bits": [17], "activation_bits": [8]}, "1 to 16"),
        ({"weight_bitz": [4]}, "did you mean 'weight_bits'"),
        ({"granularity": ["per_row"]}, "per_tensor, per_channel"),
        ({"weight_bits": "4"}, "list of values"),
    ],
)
def test_bad_grids_raise_clear_errors(axes, needle) -> None:
    with pytest.raises(BitsweepError, match=needle):
        expand_grid(axes)
