from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsweep.errors import BitsweepError
from bitsweep.sweep.pareto import dominates, pareto_front, recommend

points = st.lists(
    st.tuples(st.integers(1, 50), st.floats(0, 100, allow_nan=False).map(lambda x: round(x, 1))),
    min_size=0,
    max_size=30,
)


def _rows(pts):
    return [
        {"cell_id": str(i), "weight_bits": 4, "activation_bits": 8, "size_bytes": s, "val_top1": a}
        for i, (s, a) in enumerate(pts)
    ]


@settings(max_examples=200, deadline=None)
@given(points)
def test_front_points_are_not_dominated_and_everything_else_is(pts) -> None:
    rows = _rows(pts)
    front = pareto_front(rows)
    fpts = [(r["size_bytes"], r["val_top1"]) for r in front]
    all_pts = [(r["size_bytes"], r["val_top1"]) for r in rows]
    for p in fpts:
        assert not any(dominates(q, p) for q in all_pts)
    for r in rows:
        p = (r["size_bytes"], r["val_top1"])
        if r not in front:
            assert any(dominates(q, p) for q in fpts) or p in fpts
    # sorted by size, accuracy strictly increasing along the front, no duplicates
    assert [p[0] for p in fpts] == sorted(p[0] for p in fpts)
    assert all(b[1] > a[1] and b[0] > a[0] for a, b in zip(fpts, fpts[1:], strict=False))


@settings(max_examples=200, deadline=None)
@given(points, st.floats(50, 100), st.floats(0, 10))
def test_recommendation_is_smallest_within_budget(pts, baseline, max_drop) -> None:
    rows = _rows(pts)
    rec = recommend(rows, baseline, max_drop)
    ok = [r for r in rows if baseline - r["val_top1"] <= max_drop + 1e-9]
    if not ok:
        assert not rec.found and "raise --max-drop" in rec.summary()
        return
    assert rec.found
    assert rec.row["size_bytes"] == min(r["size_bytes"] for r in ok)
    assert rec.drop <= max_drop + 1e-9
    # among the smallest rows within budget, the most accurate one (all rows here have the same activation bits)
    smallest = [r for r in ok if r["size_bytes"] == rec.row["size_bytes"]]
    assert rec.row["val_top1"] == max(r["val_top1"] for r in smallest)
    # so it is on the Pareto front
    front_pts = {(r["size_bytes"], r["val_top1"]) for r in pareto_front(rows)}
    assert (rec.row["size_bytes"], rec.row["val_top1"]) in front_pts


def test_equal_sizes_prefer_fewer_activation_bits() -> None:
    rows = [
        {"label": "W4A16", "weight_bits": 4, "activation_bits": 16, "size_bytes": 10, "val_top1": 98.9},
        {"label": "W4A8", "weight_bits": 4, "activation_bits": 8, "size_bytes": 10, "val_top1": 98.5},
        {"label": "W4A4", "weight_bits": 4, "activation_bits": 4, "size_bytes": 10, "val_top1": 90.0},
    ]
    assert recommend(rows, 99.0, 1.0).row["label"] == "W4A8"


def test_recommend_skips_baseline_and_rows_without_figures() -> None:
    rows = [
        {"label": "FP32", "weight_bits": None, "activation_bits": None, "size_bytes": 1, "val_top1": 99.0},
        {
            "label": "W4A8",
            "weight_bits": 4,
            "activation_bits": 8,
            "size_bytes": 10,
            "val_top1": 98.5,
            "test_top1": 98.1,
        },
        {"label": "W2A8", "weight_bits": 2, "activation_bits": 8, "size_bytes": 5, "val_top1": 90.0},
        {"label": "broken", "weight_bits": 1, "activation_bits": 8, "size_bytes": None, "val_top1": 99.0},
    ]
    rec = recommend(rows, 99.0, 1.0)
    assert rec.row["label"] == "W4A8"
    assert rec.drop == pytest.approx(0.5)
    assert "test 98.10 %" in rec.summary()
    assert recommend(rows, 99.0, 9.0).row["label"] == "W2A8"


def test_negative_max_drop_is_a_user_error() -> None:
    with pytest.raises(BitsweepError, match="max-drop"):
        recommend([], 90.0, -1.0)
