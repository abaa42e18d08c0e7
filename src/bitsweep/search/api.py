"""``search``: per-layer weight bits (and optionally per-site activation bits) for the smallest packed file
within a drop budget, or the reverse.

One call runs the whole exact-size core: find the names ``ptq`` uses, calibrate once
to learn which activation sites are signed (the only thing besides bits that changes
the header), tabulate every option's exact bytes, measure (or reuse) per-layer
sensitivity, solve the integer program, and check the chosen plan's size with the
exact predictor. When the small non-additive remainder of the size (padding to 8
bytes, digit counts) pushes the plan over ``max_bytes``, the byte budget is tightened
by the overshoot and the problem solved again, so the promise is kept exactly.

With several candidate activation bit widths, every activation site is one more
group (its options cost only header bytes, see :func:`byte_table`; its drops are
measured one site at a time), and an optional peak activation-memory budget removes
the options whose largest tensor does not fit (:mod:`bitsweep.search.activation_memory`).

A byte budget no plan can meet is refused before sensitivity is measured (minutes on
a real model), naming the smallest reachable size. Validating the plan's accuracy
(integer-exact) and re-solving on a miss is :mod:`bitsweep.search.validate`'s job;
this module predicts.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
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
from bitsweep.search.activation_memory import activation_numels, allowed_bits, peak
from bitsweep.search.cost import ByteTable, PackedLayout, byte_table, layout_of, packed_size
from bitsweep.search.hessian import HessianConfig, HessianSensitivity, measure_hessian
from bitsweep.search.layer_bits import LayerBits, layer_names
from bitsweep.search.sensitivity import Sensitivity, measure_activation_sensitivity, measure_sensitivity
from bitsweep.search.solver import Choice, Group, Option, Problem, min_bytes, min_drop

MAX_TIGHTENING = 16  # re-solves for the non-additive remainder (each removes at least one byte)
ACTIVATION_GROUP = "activation:"  # prefix of activation sites' group names (a site can share a weight layer's name)


@dataclass(frozen=True)
class SearchResult:
    """The chosen plan with its exact predicted file size and its predicted (summed) drop."""

    plan: LayerBits
    config: QuantConfig
    predicted_bytes: int
    predicted_drop: float
    sensitivity: Sensitivity | HessianSensitivity
    resolves: int = 0  # extra solves the byte budget needed
    notes: tuple[str, ...] = field(default_factory=tuple)
    peak_activation_bytes: int = 0  # the plan's largest activation tensor, one image (activation_memory)
    peak_activation_site: str = ""  # the site that holds it


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


def _group(name: str, drops: Mapping[int, float], costs: Mapping[int, tuple[int, tuple[str, ...]]]) -> Group:
    """One group: an option per bit width in ``costs`` (bytes, shared labels), drops made robust and nudged."""
    robust = robust_drops({b: drops[b] for b in costs})
    steps = {b: i for i, b in enumerate(sorted(costs, reverse=True))}
    return Group(name, tuple(Option(str(b), c, robust[b] + TIE_BREAK * steps[b], s) for b, (c, s) in costs.items()))


def build_problem(
    table: ByteTable,
    drops: Mapping[str, Mapping[int, float]],
    activation_drops: Mapping[str, Mapping[int, float]] | None = None,
    allowed: Mapping[str, Sequence[int]] | None = None,
) -> Problem:
    """The solver's problem: one group per weight layer (and per activation site when searched), one option
    per bit width, specs paid once.

    Activation groups are named ``ACTIVATION_GROUP + site``; ``allowed`` (site -> bits) keeps only those
    options (the activation-memory budget), every candidate when None.

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
        groups.append(_group(name, drops[name], {b: (c, (table.weight_labels[b],)) for b, c in options.items()}))
    act_drops = activation_drops or {}
    for site, options in table.activations.items():
        bits = [b for b in options if allowed is None or b in allowed[site]]
        missing = [b for b in bits if b not in act_drops.get(site, {})]
        if missing:
            raise BitsweepError(f"no sensitivity measured for activation site '{site}' at {missing[0]} bits; "
                                "measure the activation sites (measure_activation_sensitivity)")  # fmt: skip
        costs = {b: (options[b], table.site_labels[site][b]) for b in bits}
        groups.append(_group(ACTIVATION_GROUP + site, act_drops[site], costs))
    used = {s for g in groups for o in g.options for s in o.shared}
    fixed = table.constant + sum(table.specs[s] for s in table.activation_labels)
    return Problem(tuple(groups), {s: table.specs[s] for s in sorted(used)}, fixed)


def planned_drop(
    drops: Mapping[str, Mapping[int, float]],
    weight_bits: Mapping[str, int],
    activation_drops: Mapping[str, Mapping[int, float]] | None = None,
    activation_bits: Mapping[str, int] | None = None,
) -> float:
    """The predicted drop of a plan: the sum of its layers' (and searched sites') :func:`robust_drops`
    (without the tie-break nudge)."""
    weights = sum(robust_drops(drops[n])[b] for n, b in weight_bits.items())
    acts = activation_drops or {}
    return weights + sum(robust_drops(acts[s])[b] for s, b in (activation_bits or {}).items())


def plan_of(choice: Choice, activation_bits: Sequence[int]) -> LayerBits:
    """The plan of a solver choice: every weight layer, and the sites below the highest activation bits
    (the default; listing a site costs header bytes, see :func:`~bitsweep.search.cost.site_costs`)."""
    weights = {n: int(b) for n, b in choice.picks.items() if not n.startswith(ACTIVATION_GROUP)}
    acts = {n[len(ACTIVATION_GROUP) :]: int(b) for n, b in choice.picks.items() if n.startswith(ACTIVATION_GROUP)}
    default = max(activation_bits)
    return LayerBits.explicit(weights, default, {s: b for s, b in acts.items() if b != default})


def smallest_size(
    layout: PackedLayout,
    table: ByteTable,
    base: QuantConfig,
    activation_bits: int | Sequence[int] = 8,
    allowed: Mapping[str, Sequence[int]] | None = None,
) -> int:
    """The exact bytes of the smallest plan the candidates allow (the floor any byte budget must clear).

    Solved over the table with no drop budget (so only bytes count), then sized exactly: it needs no
    sensitivity, so an impossible byte budget is refused before minutes of measuring.
    """
    zero = {name: dict.fromkeys(options, 0.0) for name, options in table.weights.items()}
    act_zero = {site: dict.fromkeys(options, 0.0) for site, options in table.activations.items()}
    choice = min_bytes(build_problem(table, zero, act_zero, allowed), math.inf)
    a_bits = (activation_bits,) if isinstance(activation_bits, int) else tuple(activation_bits)
    return packed_size(layout, plan_of(choice, a_bits).to_quant_config(base)).file_bytes


ESTIMATES = ("measured", "hessian")
HESSIAN_SPAN = 1e4  # the Hessian estimates' summed worst case as the solver sees it; see hessian_for_solver


def check_estimate(
    estimate: str, sensitivity: Sensitivity | HessianSensitivity | None, drop_budget: bool, activations: bool
) -> None:
    """Refuse the combinations the Hessian estimate does not support, before any work.

    It predicts a loss increase, not validation points, so it cannot meet a drop budget; and it covers
    weights only, while searched activation bits are ranked by measured top-1 drops (a different unit).

    Raises:
        BitsweepError: an unknown estimate, or the Hessian with a drop budget or searched activation bits.
    """
    if estimate not in ESTIMATES:
        raise BitsweepError(f"sensitivity estimate must be 'measured' or 'hessian', got {estimate!r}")
    if not (estimate == "hessian" or isinstance(sensitivity, HessianSensitivity)):
        return
    if drop_budget:
        raise BitsweepError("the Hessian sensitivity estimates a loss increase, not accuracy points, so it ranks "
                            "layers under a size budget only: give a size budget, or use the measured sensitivity "
                            "with a drop budget")  # fmt: skip
    if activations:
        raise BitsweepError("the Hessian sensitivity covers weight layers only; search activation bits with the "
                            "measured sensitivity, or give one activation bit width")  # fmt: skip


def hessian_for_solver(drops: Mapping[str, Mapping[int, float]]) -> dict[str, dict[int, float]]:
    """Hessian loss estimates rescaled so their summed worst case is ``HESSIAN_SPAN``, for ranking only.

    A layer's estimate spans orders of magnitude (the rounding noise falls about 4x per bit, traces
    differ 1000x between layers), and raw values near 1e-6 nats would drown under ``TIE_BREAK`` and
    HiGHS's 1e-6 absolute gap. A positive factor does not change which plan is smallest in summed
    estimate, so the byte-budget plan is the same; reported drops stay in loss units.
    """
    worst = sum(max(0.0, *d.values()) for d in drops.values())
    factor = HESSIAN_SPAN / worst if worst > 0 else 1.0
    return {n: {b: v * factor for b, v in d.items()} for n, d in drops.items()}


def search(
    model: nn.Module,
    calibration: Iterable[Any],
    validation: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_bytes: int | None = None,
    max_drop: float | None = None,
    weight_bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    activation_bits: int | Sequence[int] = 8,
    *,
    record: ModelRecord,
    base: QuantConfig | None = None,
    extra: Mapping[str, Any] | None = None,
    sensitivity: Sensitivity | HessianSensitivity | None = None,
    metric: str | None = None,
    estimate: str = "measured",
    hessian: HessianConfig | None = None,
    calibration_batches: int | None = None,
    stats: CalibrationStats | None = None,
    max_activation_bytes: int | None = None,
    progress: bool = True,
) -> SearchResult:
    """Choose per-layer weight bits: fewest bytes within ``max_drop``, or least drop within ``max_bytes``.

    With several ``activation_bits``, the bits of every activation site are chosen too.

    Args:
        model: the float model (not changed).
        calibration: batches for the one reference calibration (signedness of activation sites).
        validation: (images, labels) batches for sensitivity (ignored when ``sensitivity`` is given).
        max_bytes: packed file budget in bytes (exactly one of ``max_bytes`` and ``max_drop``).
        max_drop: budget of summed per-layer drops (top-1 points, or loss with ``metric="loss"``).
        weight_bits: candidate weight bit widths.
        activation_bits: bits of every activation site, or several candidates to choose from per site.
        record: the model record the packed file will carry (its JSON is part of the header).
        base: observers, granularity, method (default ``QuantConfig()``).
        extra: the ``extra`` the packed file will carry (default none); it is part of the header too.
        sensitivity: a cached measurement (or Hessian estimate) to reuse.
        metric: ``top1`` or ``loss`` (default: ``top1`` for a measurement, ``loss`` for a Hessian estimate).
        estimate: what to compute when ``sensitivity`` is None: ``measured`` drops or the ``hessian``
            estimate (:mod:`bitsweep.search.hessian`; size budgets only, weights only).
        hessian: samples, images and seed of the Hessian estimate (default ``HessianConfig()``).
        calibration_batches: calibrate on at most this many batches.
        stats: statistics of an earlier calibration of ``model`` (they are bit-width free), to skip
            calibrating again when a caller solves several times.
        max_activation_bytes: peak activation memory: no activation tensor of one image may take more
            bytes (see :mod:`bitsweep.search.activation_memory`); None: no limit.
        progress: show progress bars.

    Raises:
        BitsweepError: both or neither budget, or a budget no plan meets (naming the reachable limit).
    """
    if (max_bytes is None) == (max_drop is None):
        raise BitsweepError("give exactly one budget: a size (max_bytes) or an accuracy drop (max_drop)")
    base = base or QuantConfig()
    a_bits = tuple(sorted({activation_bits} if isinstance(activation_bits, int) else set(activation_bits)))
    searched = len(a_bits) > 1
    check_estimate(estimate, sensitivity, max_drop is not None, searched)
    if searched and sensitivity is None:  # read twice below: once for the reference, once per activation trial
        calibration = list(itertools.islice(calibration, calibration_batches))
    names = layer_names(model, base)
    reference = ptq(copy.deepcopy(model), LayerBits(8, max(a_bits)).to_quant_config(base), calibration,
                    num_batches=calibration_batches, stats=stats)  # fmt: skip
    layout = layout_of(reference.model, PackedMeta(record, reference.config, dict(extra or {})))
    numels = activation_numels(reference.model, record)
    allowed = allowed_bits(numels, a_bits, max_activation_bytes)
    table = byte_table(layout, base, weight_bits, a_bits)
    if max_bytes is not None:
        floor = smallest_size(layout, table, base, a_bits, allowed)
        if floor > max_bytes:
            raise BitsweepError(f"no plan fits in {max_bytes:,} bytes; the smallest reachable size is {floor:,} "
                                "bytes: raise the size budget or add lower bit widths")  # fmt: skip
    if sensitivity is None and estimate == "hessian":
        sensitivity = measure_hessian(model, validation, tuple(sorted(set(weight_bits))), hessian, base=base,
                                      layers=names.weights, progress=progress)  # fmt: skip
    if sensitivity is None:
        validation = list(validation)
        sensitivity = measure_sensitivity(model, validation, tuple(sorted(set(weight_bits))), base=base,
                                          layers=names.weights, progress=progress)  # fmt: skip
        if searched:
            acts = measure_activation_sensitivity(model, validation, calibration, a_bits, base=base,
                                                  sites=names.activations, progress=progress)  # fmt: skip
            sensitivity = dataclasses.replace(sensitivity, activation_trials=acts)
    if isinstance(sensitivity, HessianSensitivity):
        drops = sensitivity.drops(metric or "loss")
        act_drops: dict[str, dict[int, float]] = {}
        problem = build_problem(table, hessian_for_solver(drops), act_drops, allowed)
    else:
        drops = sensitivity.drops(metric or "top1")
        act_drops = sensitivity.activation_drops(metric or "top1")
        problem = build_problem(table, drops, act_drops, allowed)

    def exact(choice: Choice) -> tuple[LayerBits, QuantConfig, int]:
        plan = plan_of(choice, a_bits)
        config = plan.to_quant_config(base)
        return plan, config, packed_size(layout, config).file_bytes

    def result(plan: LayerBits, config: QuantConfig, size: int, attempt: int = 0) -> SearchResult:
        note = () if not attempt else (f"byte budget tightened {attempt} time(s) for header padding/digits",)
        per_site = {s: plan.activation_bits_of(s) for s in numels}
        peak_bytes, peak_site = peak(numels, per_site)
        drop = planned_drop(drops, plan.weights, act_drops, per_site if searched else None)
        return SearchResult(plan, config, size, drop, sensitivity, attempt, note, peak_bytes, peak_site)

    if max_drop is not None:
        return result(*exact(min_bytes(problem, max_drop)))
    assert max_bytes is not None
    budget = max_bytes
    for attempt in range(MAX_TIGHTENING):
        choice = min_drop(problem, budget)
        plan, config, size = exact(choice)
        if size <= max_bytes:
            return result(plan, config, size, attempt)
        budget -= size - max_bytes
    raise BitsweepError(f"no plan found within {max_bytes:,} bytes after {MAX_TIGHTENING} tightenings; "
                        "raise the size budget a little")  # fmt: skip
