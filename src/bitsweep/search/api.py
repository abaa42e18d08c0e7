"""``search``: per-layer weight bits for the smallest packed file within a drop budget, or the reverse.

One call runs the whole exact-size core: find the names ``ptq`` uses, calibrate once
to learn which activation sites are signed (the only thing besides bits that changes
the header), tabulate every option's exact bytes, measure (or reuse) per-layer
sensitivity, solve the integer program, and check the chosen plan's size with the
exact predictor. When the small non-additive remainder of the size (padding to 8
bytes, digit counts) pushes the plan over ``max_bytes``, the byte budget is tightened
by the overshoot and the problem solved again, so the promise is kept exactly.

A byte budget no plan can meet is refused before sensitivity is measured (minutes on
a real model), naming the smallest reachable size. Validating the plan's accuracy
(integer-exact) and re-solving on a miss is :mod:`bitsweep.search.validate`'s job;
this module predicts.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bitsweep.artifacts.packed import PackedMeta
from bitsweep.artifacts.record import ModelRecord
from bitsweep.errors import BitsweepError
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.api import CalibrationStats
from bitsweep.search.cost import ByteTable, PackedLayout, byte_table, layout_of, packed_size
from bitsweep.search.layer_bits import LayerBits, layer_names
from bitsweep.search.sensitivity import Sensitivity, measure_sensitivity
from bitsweep.search.solver import Choice, Group, Option, Problem, min_bytes, min_drop

MAX_TIGHTENING = 16  # re-solves for the non-additive remainder (each removes at least one byte)


@dataclass(frozen=True)
class SearchResult:
    """The chosen plan with its exact predicted file size and its predicted (summed) drop."""

    plan: LayerBits
    config: QuantConfig
    predicted_bytes: int
    predicted_drop: float
    sensitivity: Sensitivity
    resolves: int = 0  # extra solves the byte budget needed
    notes: tuple[str, ...] = field(default_factory=tuple)


def robust_drops(drops: Mapping[int, float]) -> dict[int, float]:
    """One layer's measured drops (bits -> drop) made safe to add up: never negative, never less at fewer bits.

    A drop measured on a few hundred or thousand images is noise-limited: a layer can "improve" at
    2 bits, or measure 0 at 2 bits and 0.1 at 8. Taken literally, the solver would prefer 2 bits even
    under a generous size budget, and noise in one layer would pay for damage in another. Fewer bits
    never help in expectation, so a layer's drop at ``b`` bits is the largest measured drop at ``b`` or
    more bits, and at least 0.

    >>> robust_drops({8: 0.1, 4: -0.2, 2: 0.5})
    {8: 0.1, 4: 0.1, 2: 0.5}
    """
    out: dict[int, float] = {}
    running = 0.0
    for b in sorted(drops, reverse=True):
        running = max(running, drops[b])
        out[b] = running
    return {b: out[b] for b in drops}


TIE_BREAK = 1e-4  # points added per candidate step below the highest; see build_problem


def build_problem(table: ByteTable, drops: Mapping[str, Mapping[int, float]]) -> Problem:
    """The solver's problem: one group per weight layer, one option per bit width, specs paid once.

    Drops go through :func:`robust_drops`. Equal drops are then nudged apart by ``TIE_BREAK`` per step
    below the highest candidate, so among equally accurate measurements the solver keeps more bits
    (a generous size budget returns the all-highest plan). The nudge is far above HiGHS's 1e-6
    absolute gap, so the solver sees it, and small against a budget: at most 0.03 points for 53 layers
    all at the lowest of 6 candidates. Reported predicted drops (:func:`planned_drop`) leave it out.
    """
    groups = []
    for name, options in table.weights.items():
        if name not in drops:
            raise BitsweepError(f"no sensitivity measured for layer '{name}'; measure every weight layer")
        missing = [b for b in options if b not in drops[name]]
        if missing:
            raise BitsweepError(f"no sensitivity measured for layer '{name}' at {missing[0]} bits")
        robust = robust_drops({b: drops[name][b] for b in options})
        steps = {b: i for i, b in enumerate(sorted(options, reverse=True))}
        groups.append(
            Group(name, tuple(Option(str(b), c, robust[b] + TIE_BREAK * steps[b], (table.weight_labels[b],))
                              for b, c in options.items()))
        )  # fmt: skip
    shared = {table.weight_labels[b]: table.specs[table.weight_labels[b]] for b in table.weight_labels}
    fixed = table.constant + sum(table.specs[s] for s in table.activation_labels)
    return Problem(tuple(groups), shared, fixed)


def planned_drop(drops: Mapping[str, Mapping[int, float]], weight_bits: Mapping[str, int]) -> float:
    """The predicted drop of a plan: the sum of its layers' :func:`robust_drops` (without the tie-break nudge)."""
    return sum(robust_drops(drops[n])[b] for n, b in weight_bits.items())


def smallest_size(layout: PackedLayout, table: ByteTable, base: QuantConfig, activation_bits: int = 8) -> int:
    """The exact bytes of the smallest plan the candidates allow (the floor any byte budget must clear).

    Solved over the table with no drop budget (so only bytes count), then sized exactly: it needs no
    sensitivity, so an impossible byte budget is refused before minutes of measuring.
    """
    zero = {name: dict.fromkeys(options, 0.0) for name, options in table.weights.items()}
    choice = min_bytes(build_problem(table, zero), math.inf)
    plan = LayerBits.explicit({n: int(b) for n, b in choice.picks.items()}, activation_bits)
    return packed_size(layout, plan.to_quant_config(base)).file_bytes


def search(
    model: nn.Module,
    calibration: Iterable[Any],
    validation: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_bytes: int | None = None,
    max_drop: float | None = None,
    weight_bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    activation_bits: int = 8,
    *,
    record: ModelRecord,
    base: QuantConfig | None = None,
    extra: Mapping[str, Any] | None = None,
    sensitivity: Sensitivity | None = None,
    metric: str = "top1",
    calibration_batches: int | None = None,
    stats: CalibrationStats | None = None,
    progress: bool = True,
) -> SearchResult:
    """Choose per-layer weight bits: fewest bytes within ``max_drop``, or least drop within ``max_bytes``.

    Args:
        model: the float model (not changed).
        calibration: batches for the one reference calibration (signedness of activation sites).
        validation: (images, labels) batches for sensitivity (ignored when ``sensitivity`` is given).
        max_bytes: packed file budget in bytes (exactly one of ``max_bytes`` and ``max_drop``).
        max_drop: budget of summed per-layer drops (top-1 points, or loss with ``metric="loss"``).
        weight_bits: candidate weight bit widths.
        activation_bits: bits of every activation site.
        record: the model record the packed file will carry (its JSON is part of the header).
        base: observers, granularity, method (default ``QuantConfig()``).
        extra: the ``extra`` the packed file will carry (default none); it is part of the header too.
        sensitivity: a cached measurement to reuse.
        metric: ``top1`` or ``loss``.
        calibration_batches: calibrate on at most this many batches.
        stats: statistics of an earlier calibration of ``model`` (they are bit-width free), to skip
            calibrating again when a caller solves several times.
        progress: show progress bars.

    Raises:
        BitsweepError: both or neither budget, or a budget no plan meets (naming the reachable limit).
    """
    if (max_bytes is None) == (max_drop is None):
        raise BitsweepError("give exactly one budget: a size (max_bytes) or an accuracy drop (max_drop)")
    base = base or QuantConfig()
    names = layer_names(model, base)
    reference = ptq(copy.deepcopy(model), LayerBits(8, activation_bits).to_quant_config(base), calibration,
                    num_batches=calibration_batches, stats=stats)  # fmt: skip
    layout = layout_of(reference.model, PackedMeta(record, reference.config, dict(extra or {})))
    table = byte_table(layout, base, weight_bits, activation_bits)
    if max_bytes is not None:
        floor = smallest_size(layout, table, base, activation_bits)
        if floor > max_bytes:
            raise BitsweepError(f"no plan fits in {max_bytes:,} bytes; the smallest reachable size is {floor:,} "
                                "bytes: raise the size budget or add lower bit widths")  # fmt: skip
    if sensitivity is None:
        sensitivity = measure_sensitivity(model, validation, tuple(sorted(set(weight_bits))), base=base,
                                          layers=names.weights, progress=progress)  # fmt: skip
    drops = sensitivity.drops(metric)
    problem = build_problem(table, drops)

    def exact(choice: Choice) -> tuple[LayerBits, QuantConfig, int]:
        plan = LayerBits.explicit({n: int(b) for n, b in choice.picks.items()}, activation_bits)
        config = plan.to_quant_config(base)
        return plan, config, packed_size(layout, config).file_bytes

    if max_drop is not None:
        choice = min_bytes(problem, max_drop)
        plan, config, size = exact(choice)
        return SearchResult(plan, config, size, planned_drop(drops, plan.weights), sensitivity)
    assert max_bytes is not None
    budget = max_bytes
    for attempt in range(MAX_TIGHTENING):
        choice = min_drop(problem, budget)
        plan, config, size = exact(choice)
        if size <= max_bytes:
            note = () if not attempt else (f"byte budget tightened {attempt} time(s) for header padding/digits",)
            return SearchResult(plan, config, size, planned_drop(drops, plan.weights), sensitivity, attempt,
                                note)  # fmt: skip
        budget -= size - max_bytes
    raise BitsweepError(f"no plan found within {max_bytes:,} bytes after {MAX_TIGHTENING} tightenings; "
                        "raise the size budget a little")  # fmt: skip
