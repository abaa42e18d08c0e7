from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsweep.errors import BitsweepError
from bitsweep.search.solver import Group, Option, Problem, brute_force, min_bytes, min_drop

SHARED = ("w2", "w4", "w8")


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    """Up to 4 layers x 3 options; drops are multiples of 1/64 so sums are exact in floats."""
    groups = []
    for g in range(draw(st.integers(1, 4))):
        options = tuple(
            Option(
                f"o{i}",
                draw(st.integers(0, 60)),
                draw(st.integers(0, 64)) / 64,
                tuple(draw(st.sets(st.sampled_from(SHARED), max_size=1))),
            )  # fmt: skip
            for i in range(draw(st.integers(1, 3)))
        )
        groups.append(Group(f"g{g}", options))
    shared = {s: draw(st.integers(0, 30)) for s in SHARED}
    return Problem(tuple(groups), shared, draw(st.integers(0, 10)))


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 300))
def test_min_drop_equals_brute_force(problem: Problem, budget: int) -> None:
    reference = brute_force(problem, "drop", {"bytes": budget})
    if reference is None:
        with pytest.raises(BitsweepError, match="smallest reachable size"):
            min_drop(problem, budget)
        return
    choice = min_drop(problem, budget)
    assert (choice.drop, choice.bytes) == (reference.drop, reference.bytes)


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 256).map(lambda d: d / 64))
def test_min_bytes_equals_brute_force(problem: Problem, budget: float) -> None:
    reference = brute_force(problem, "bytes", {"drop": budget})
    if reference is None:
        with pytest.raises(BitsweepError, match="smallest reachable drop"):
            min_bytes(problem, budget)
        return
    choice = min_bytes(problem, budget)
    assert (choice.bytes, choice.drop) == (reference.bytes, reference.drop)


def _layers(n: int) -> Problem:
    """Fewer bits: fewer bytes, more drop; shared spec entries like the packed header's."""
    costs = {2: (25, 0.5), 4: (50, 0.1), 8: (100, 0.0)}
    groups = tuple(
        Group(f"l{i}", tuple(Option(str(b), c + i, d * (i + 1), (f"w{b}",)) for b, (c, d) in costs.items()))
        for i in range(n)
    )
    return Problem(groups, {"w2": 7, "w4": 7, "w8": 7}, 1000)


def test_generous_budget_returns_all_highest_precision() -> None:
    choice = min_drop(_layers(6), 10**9)
    assert set(choice.picks.values()) == {"8"} and choice.drop == 0.0


def test_impossible_budgets_name_the_reachable_limit() -> None:
    problem = _layers(3)
    smallest = 1000 + 25 + 26 + 27 + 7
    assert min_bytes(problem, 100.0).bytes == smallest
    with pytest.raises(BitsweepError, match=f"smallest reachable size is {smallest:,} bytes"):
        min_drop(problem, smallest - 1)
    assert min_drop(problem, smallest).bytes == smallest
    with pytest.raises(BitsweepError, match="smallest reachable drop is 0"):
        min_bytes(_layers(3), -1.0)


def test_shared_cost_changes_the_choice() -> None:
    """Two layers: mixing 2 and 4 bits pays two spec entries; the exact solver sees it."""
    a = Group("a", (Option("2", 10, 1.0, ("w2",)), Option("4", 20, 0.0, ("w4",))))
    b = Group("b", (Option("2", 10, 0.0, ("w2",)), Option("4", 12, 0.0, ("w4",))))
    problem = Problem((a, b), {"w2": 50, "w4": 50})
    assert dict(min_drop(problem, 200).picks) == {"a": "4", "b": "4"}
    assert dict(min_bytes(problem, 5.0).picks) == {"a": "2", "b": "2"}
