"""Choose one option per layer exactly: fewest bytes under a drop budget, or least drop under a byte budget.

The problem is a multiple-choice knapsack with once-only charges: each layer
(group) picks one option with a byte cost and a predicted accuracy drop, and an
option may need a shared item (a quantizer spec entry in the packed header) that
is paid once however many layers use it. It is solved as an integer linear
program with scipy's ``milp`` (HiGHS): binary ``x[g, o]`` (group g takes option o),
binary ``y[s]`` (shared item s is paid), ``sum_o x[g, o] = 1``, ``x[g, o] <= y[s]``.
Ties are broken lexicographically (a second solve with the first objective fixed):
among equally small plans the more accurate one, among equally accurate the smaller,
so a generous budget never returns an arbitrary plan.

:func:`brute_force` enumerates every choice; it is the reference the tests compare with.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp  # type: ignore[import-untyped]  # no stubs installed

from bitsweep.errors import BitsweepError

DROP_TOLERANCE = 1e-9  # drops are floats: a plan within this of the budget meets it


@dataclass(frozen=True)
class Option:
    """One way to quantize a layer: its bytes, its predicted drop, the shared items it needs."""

    label: str
    bytes: int
    drop: float
    shared: tuple[str, ...] = ()


@dataclass(frozen=True)
class Group:
    """A layer and its options (at least one)."""

    name: str
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        if not self.options:
            raise BitsweepError(f"layer '{self.name}' has no candidate option")


@dataclass(frozen=True)
class Problem:
    """Groups, the bytes of each shared item and the bytes no choice changes."""

    groups: tuple[Group, ...]
    shared_bytes: Mapping[str, int] = field(default_factory=dict)
    base_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shared_bytes", MappingProxyType(dict(self.shared_bytes)))
        missing = {s for g in self.groups for o in g.options for s in o.shared} - set(self.shared_bytes)
        if missing:
            raise BitsweepError(f"shared item(s) {', '.join(sorted(missing))} have no byte cost")


@dataclass(frozen=True)
class Choice:
    """The chosen option label per group, with the total bytes and total drop."""

    picks: Mapping[str, str]
    bytes: int
    drop: float


def evaluate(problem: Problem, picks: Mapping[str, str]) -> Choice:
    """Total bytes and drop of a choice (one label per group)."""
    shared: set[str] = set()
    total, drop = problem.base_bytes, 0.0
    for g in problem.groups:
        o = next(o for o in g.options if o.label == picks[g.name])
        total += o.bytes
        drop += o.drop
        shared.update(o.shared)
    return Choice(MappingProxyType(dict(picks)), total + sum(problem.shared_bytes[s] for s in shared), drop)


def _solve(problem: Problem, objective: str, budgets: Mapping[str, float]) -> Choice | None:
    """One lexicographic MILP solve; None when infeasible."""
    pairs = [(g, o) for g in problem.groups for o in g.options]
    items = sorted(problem.shared_bytes)
    n, m = len(pairs), len(items)
    byte_row = np.array([o.bytes for _, o in pairs] + [problem.shared_bytes[s] for s in items], dtype=float)
    drop_row = np.array([o.drop for _, o in pairs] + [0.0] * m)
    rows, lo, hi = [], [], []
    for g in problem.groups:  # one option per group
        rows.append([1.0 if pg is g else 0.0 for pg, _ in pairs] + [0.0] * m)
        lo.append(1.0)
        hi.append(1.0)
    for j, (_, o) in enumerate(pairs):  # an option pays for the shared items it needs
        for s in o.shared:
            row = [0.0] * (n + m)
            row[j], row[n + items.index(s)] = 1.0, -1.0
            rows.append(row)
            lo.append(-np.inf)
            hi.append(0.0)
    rows_by = {"bytes": byte_row, "drop": drop_row}
    for key, limit in budgets.items():
        rows.append(list(rows_by[key]))
        lo.append(-np.inf)
        hi.append(limit - problem.base_bytes if key == "bytes" else limit + DROP_TOLERANCE)
    res = milp(
        rows_by[objective],
        constraints=LinearConstraint(np.array(rows), lo, hi),
        integrality=np.ones(n + m),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},  # HiGHS stops at a 0.01 % gap by default; the search must be exact
    )
    if res.x is None:
        return None
    picks = {g.name: o.label for (g, o), x in zip(pairs, res.x[:n], strict=True) if x > 0.5}
    return evaluate(problem, picks)


def _lexicographic(problem: Problem, first: str, budgets: dict[str, float]) -> Choice | None:
    best = _solve(problem, first, budgets)
    if best is None:
        return None
    second = "drop" if first == "bytes" else "bytes"
    tied = dict(budgets)
    tied[first] = min(tied.get(first, math.inf), best.bytes if first == "bytes" else best.drop)
    return _solve(problem, second, tied) or best


def min_bytes(problem: Problem, max_drop: float) -> Choice:
    """The smallest choice whose total drop is at most ``max_drop``.

    Raises:
        BitsweepError: naming the smallest reachable drop, when no choice meets ``max_drop``.
    """
    choice = _lexicographic(problem, "bytes", {"drop": max_drop})
    if choice is None:
        least = sum(min(o.drop for o in g.options) for g in problem.groups)
        raise BitsweepError(f"no plan keeps the predicted drop within {max_drop:g}; the smallest reachable drop is "
                            f"{least:.4g}: raise the drop budget or add higher bit widths")  # fmt: skip
    return choice


def min_drop(problem: Problem, max_bytes: int) -> Choice:
    """The most accurate choice whose total bytes are at most ``max_bytes``.

    Raises:
        BitsweepError: naming the smallest reachable size, when no choice fits ``max_bytes``.
    """
    choice = _lexicographic(problem, "drop", {"bytes": max_bytes})
    if choice is None:
        smallest = _solve(problem, "bytes", {})
        size = "unknown" if smallest is None else f"{smallest.bytes:,} bytes"
        raise BitsweepError(f"no plan fits in {max_bytes:,} bytes; the smallest reachable size is {size}: "
                            f"raise the size budget or add lower bit widths")  # fmt: skip
    return choice


def brute_force(problem: Problem, objective: str, budgets: Mapping[str, float]) -> Choice | None:
    """Reference solver: try every choice (only for small problems); same ordering as the MILP."""
    best: Choice | None = None

    def key(c: Choice) -> tuple[float, float]:
        return (c.bytes, c.drop) if objective == "bytes" else (c.drop, c.bytes)

    for combo in itertools.product(*(g.options for g in problem.groups)):
        c = evaluate(problem, {g.name: o.label for g, o in zip(problem.groups, combo, strict=True)})
        if c.bytes > budgets.get("bytes", math.inf) or c.drop > budgets.get("drop", math.inf) + DROP_TOLERANCE:
            continue
        if best is None or key(c) < key(best):
            best = c
    return best
