"""Picklable fake evaluator factories: deterministic metrics from the cell, so tests can check every figure."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitsweep.errors import BitsweepError
from bitsweep.sweep.grid import Cell


def fake_metrics(cell: Cell) -> dict[str, Any]:
    """Accuracy grows with bits and saturates; size is proportional to weight bits (FP32 = 32 bits)."""
    w = 32 if cell.weight_bits is None else cell.weight_bits
    a = 32 if cell.activation_bits is None else cell.activation_bits
    val = 90.0 - 40.0 / (2 ** (w - 1)) - 20.0 / (2 ** (a - 1))
    if cell.granularity == "per_tensor":
        val -= 0.5
    return {
        "val_top1": round(val, 4),
        "test_top1": round(val - 0.3, 4),
        "size_bytes": 1000 * w + 7,
        "fp32_bytes": 32007,
        "model_ratio": 32007 / (1000 * w + 7),
    }


@dataclass(frozen=True)
class FakeFactory:
    """Returns the fake cell function; optionally sleeps per cell, logs each call, or breaks on one cell."""

    sleep: float = 0.0
    log_dir: str | None = None  # one file per evaluated cell id (shows which cells ran, across processes)
    interrupt_after: int | None = None  # raise KeyboardInterrupt when this many cells have finished
    fail_label: str | None = None  # raise BitsweepError on this cell

    def __call__(self):
        calls = [0]  # per-evaluator counter; no module-level state

        def fn(cell: Cell) -> dict[str, Any]:
            if self.interrupt_after is not None and calls[0] >= self.interrupt_after:
                raise KeyboardInterrupt
            if self.fail_label is not None and cell.label == self.fail_label:
                raise BitsweepError(f"cannot quantize {cell.label}")
            if self.sleep:
                time.sleep(self.sleep)
            if self.log_dir is not None:
                Path(self.log_dir, f"{cell.cell_id}.{os.getpid()}").write_text(cell.label)
            calls[0] += 1
            return fake_metrics(cell)

        return fn


def logged_ids(log_dir: str | Path) -> list[str]:
    """Cell ids the factory's functions evaluated (one per log file)."""
    return sorted(p.name.split(".")[0] for p in Path(log_dir).iterdir())
