"""Pareto front of (measured size, validation accuracy) and the recommended configuration.

Selection uses validation accuracy only; test accuracy is reported beside the
choice but never used to make it, so the reported test number is an honest
estimate for the configuration that was picked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bitsweep.errors import BitsweepError

SIZE_KEY = "size_bytes"
ACC_KEY = "val_top1"


def _point(row: Mapping[str, Any], size_key: str, acc_key: str) -> tuple[float, float] | None:
    size, acc = row.get(size_key), row.get(acc_key)
    if size is None or acc is None:
        return None
    size, acc = float(size), float(acc)
    if math.isnan(size) or math.isnan(acc):
        return None
    return size, acc


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True when point ``a`` = (size, accuracy) is at least as small and as accurate as ``b``, and better in one.

    >>> dominates((1.0, 90.0), (2.0, 90.0)), dominates((1.0, 90.0), (1.0, 90.0))
    (True, False)
    """
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def pareto_front(
    rows: Sequence[Mapping[str, Any]], size_key: str = SIZE_KEY, acc_key: str = ACC_KEY
) -> list[Mapping[str, Any]]:
    """The rows no other row dominates (smaller or equal size with higher or equal accuracy), by size.

    Rows missing either figure are left out. Of rows with identical points the
    first is kept, so the front has no duplicates.

    >>> rows = [{"size_bytes": 4, "val_top1": 90}, {"size_bytes": 2, "val_top1": 80}, {"size_bytes": 3, "val_top1": 70}]
    >>> [r["size_bytes"] for r in pareto_front(rows)]
    [2, 4]
    """
    pts = [(p, r) for r in rows if (p := _point(r, size_key, acc_key)) is not None]
    # Sorted by size ascending, then accuracy descending: a point is on the front
    # exactly when it is more accurate than every smaller point before it.
    pts.sort(key=lambda pr: (pr[0][0], -pr[0][1]))
    front: list[Mapping[str, Any]] = []
    best = -math.inf
    for (_, acc), row in pts:
        if acc > best:
            front.append(row)
            best = acc
    return front


@dataclass(frozen=True)
class Recommendation:
    """The smallest configuration whose validation accuracy drop from FP32 is within ``max_drop`` points.

    Attributes:
        row: the chosen results row, or None when no quantized cell is within the budget.
        baseline_val_top1: FP32 validation top-1 the drop is measured from.
        max_drop: the allowed drop in accuracy points.
        drop: the chosen row's validation drop (points), None when nothing was chosen.
    """

    row: Mapping[str, Any] | None
    baseline_val_top1: float
    max_drop: float
    drop: float | None

    @property
    def found(self) -> bool:
        """True when a quantized configuration met the accuracy budget."""
        return self.row is not None

    def summary(self) -> str:
        """One line for the terminal and the report."""
        if self.row is None:
            return (
                f"no quantized configuration stays within {self.max_drop:g} point(s) of the FP32 validation "
                f"accuracy ({self.baseline_val_top1:.2f} %); keep FP32 or raise --max-drop"
            )
        r = self.row
        parts = [
            f"{r.get('label', r.get('cell_id'))}: val {float(r['val_top1']):.2f} % (drop {self.drop:.2f})",
        ]
        if r.get("test_top1") is not None:
            parts.append(f"test {float(r['test_top1']):.2f} %")
        if r.get("size_bytes") is not None:
            parts.append(f"{float(r['size_bytes']) / 1e6:.4f} MB")
        if r.get("model_ratio") is not None:
            parts.append(f"{float(r['model_ratio']):.2f}x smaller")
        return ", ".join(parts)


def recommend(
    rows: Sequence[Mapping[str, Any]],
    baseline_val_top1: float,
    max_drop: float = 1.0,
    size_key: str = SIZE_KEY,
    acc_key: str = ACC_KEY,
) -> Recommendation:
    """Pick the smallest quantized row within ``max_drop`` validation points of FP32.

    Ties in model size (cells differing only in activation bits pack to the
    same file) go to fewer activation bits, whose activation memory is
    smaller, and then to the more accurate cell. The FP32 baseline row
    itself is never recommended: the question is how far the model can be
    compressed, and "do not quantize" is what ``found=False`` says.

    Raises:
        BitsweepError: for a negative or non-finite ``max_drop``.
    """
    if not math.isfinite(max_drop) or max_drop < 0:
        raise BitsweepError(f"--max-drop must be a number of accuracy points >= 0, got {max_drop}")
    best: tuple[tuple[float, int, float], Mapping[str, Any]] | None = None
    for r in rows:
        if r.get("weight_bits") is None and r.get("activation_bits") is None:
            continue
        p = _point(r, size_key, acc_key)
        if p is None or baseline_val_top1 - p[1] > max_drop + 1e-9:
            continue
        act_bits = r.get("activation_bits")
        key = (p[0], 32 if act_bits is None else int(act_bits), -p[1])
        if best is None or key < best[0]:
            best = (key, r)
    if best is None:
        return Recommendation(row=None, baseline_val_top1=baseline_val_top1, max_drop=max_drop, drop=None)
    row = best[1]
    return Recommendation(
        row=row, baseline_val_top1=baseline_val_top1, max_drop=max_drop, drop=baseline_val_top1 - float(row[acc_key])
    )
