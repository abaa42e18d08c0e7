from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitsweep.errors import BitsweepError
from bitsweep.sweep.grid import AXES, ID_BASE_AXES, Cell, baseline_cell, compile_group, expand_grid, spread_compiles

# Written by `bitsweep sweep` at commit 78a637c, before the method axis existed (5 cells of a tiny model).
V1_RESULTS = Path(__file__).parent / "data" / "v1_results.jsonl"


def test_expand_full_grid_has_baseline_first_and_every_combination() -> None:
    cells = expand_grid({"weight_bits": [1, 2, 4, 8, 16], "activation_bits": [1, 2, 4, 8, 16]})
    assert cells[0] == baseline_cell() and cells[0].is_baseline
    pairs = {(c.weight_bits, c.activation_bits) for c in cells[1:]}
    assert pairs == {(w, a) for w in (1, 2, 4, 8, 16) for a in (1, 2, 4, 8, 16)}
    assert len(cells) == 26
    assert len({c.cell_id for c in cells}) == 26


def test_extra_axes_multiply_and_duplicates_collapse() -> None:
    cells = expand_grid(
        {
            "weight_bits": [4, 4, 8],
            "activation_bits": [8],
            "granularity": ["per_channel", "per_tensor"],
            "observer": ["minmax", "mse"],
        },
        include_baseline=False,
    )
    assert len(cells) == 2 * 2 * 2
    assert {c.granularity for c in cells} == {"per_channel", "per_tensor"}


def test_cell_id_is_stable_and_depends_on_every_axis() -> None:
    base = Cell(4, 8)
    assert base.cell_id == Cell(4, 8, "per_channel", "minmax", True).cell_id
    assert len(base.cell_id) == 12 and int(base.cell_id, 16) >= 0
    variants = [Cell(4, 4), Cell(8, 8), Cell(4, 8, granularity="per_tensor"), Cell(4, 8, observer="mse"),
                Cell(4, 8, symmetric=False), Cell(4, 8, method="adaround")]  # fmt: skip
    assert len({base.cell_id, *(v.cell_id for v in variants)}) == 7
    # the id is a content hash, fixed across processes and releases (resume depends on it)
    assert Cell(4, 8).cell_id == Cell.from_dict(Cell(4, 8).to_dict()).cell_id


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


def test_ids_are_pinned_so_results_files_resume_across_releases() -> None:
    # literal values: any change to how ids are computed must fail here, not in a user's resumed sweep
    assert Cell(4, 8).cell_id == "aaa650f0ed0c"
    assert baseline_cell().cell_id == "b90da22e87b4"


def test_an_axis_at_its_default_stays_out_of_the_id() -> None:
    assert Cell(4, 8, method="rtn").cell_id == Cell(4, 8).cell_id
    assert "method" not in Cell(4, 8).id_fields() and Cell(4, 8, method="gptq").id_fields()["method"] == "gptq"
    assert set(ID_BASE_AXES) <= set(AXES) and "method" in AXES
    # the row still records every axis, default or not
    assert Cell(4, 8).to_dict()["method"] == "rtn"
    assert Cell(4, 8, method="gptq").label == "W4A8 per_channel minmax gptq"
    assert Cell(4, 8).label == "W4A8 per_channel minmax"
    with pytest.raises(ValueError, match="method"):
        Cell(4, 8, method="")


def test_rows_written_before_the_method_axis_keep_their_ids() -> None:
    header, *rows = (json.loads(line) for line in V1_RESULTS.read_text().splitlines())
    assert len(rows) == 5 and all("method" not in r for r in rows)
    for row in rows:
        cell = Cell.from_dict(row)
        assert cell.method == "rtn"  # what these rows were computed with
        assert cell.cell_id == row["cell_id"]
    # the same grid expanded today, with the new axis at its default, is exactly the finished cells
    cells = expand_grid({**header["grid"], "method": ["rtn"]})
    assert [c.cell_id for c in cells] == [r["cell_id"] for r in rows]


def test_spread_compiles_only_reorders_and_leads_with_one_cell_per_compiled_graph() -> None:
    cells = expand_grid({"weight_bits": [1, 2, 4, 8, 16], "activation_bits": [1, 2, 4, 8, 16]})
    spread = spread_compiles(cells)
    assert sorted(c.cell_id for c in spread) == sorted(c.cell_id for c in cells)
    assert [compile_group(c) for c in spread[:4]] == ["float", "narrow", "wide", "w8a8"]
    assert spread_compiles(spread) == spread  # stable


def test_observer_pair_is_an_axis_value() -> None:
    """``mse/minmax`` sweeps like any observer: its own cell, its own label, and the config splits it."""
    from bitsweep.sweep.evaluate import quant_config_for

    cells = expand_grid({"weight_bits": [2], "activation_bits": [4], "observer": ["mse", "mse/minmax"]},
                        include_baseline=False)  # fmt: skip
    assert len({c.cell_id for c in cells}) == 2
    pair = next(c for c in cells if c.observer == "mse/minmax")
    assert pair.label == "W2A4 per_channel mse/minmax"
    config = quant_config_for(pair)
    assert (config.weight_observer, config.activation_observer) == ("mse", "minmax")
