from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import random
from pathlib import Path

import pytest

from bitsweep.artifacts import PackedMeta, save_packed
from bitsweep.errors import BitsweepError
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.inspect import activation_quantizers
from bitsweep.search.api import ACTIVATION_GROUP, build_problem, search
from bitsweep.search.cost import byte_table
from bitsweep.search.layer_bits import activation_key
from bitsweep.search.sensitivity import Sensitivity, Trial
from bitsweep.search.solver import Choice, Problem, brute_force, evaluate, min_bytes, min_drop


def _fake_sensitivity(tiny) -> Sensitivity:
    """Deterministic drops (a measured run is tested in test_sensitivity): fewer bits, bigger drop."""
    trials = tuple(
        Trial(n, b, 1.0, 90.0 - (8 - b) * (1 + i % 3) / 10) for i, n in enumerate(tiny.names.weights) for b in (2, 4, 8)
    )
    return Sensitivity(1.0, 90.0, 32, trials)


def test_search_under_a_byte_budget_predicts_the_file_exactly(tmp_path: Path, tiny) -> None:
    sens = _fake_sensitivity(tiny)
    generous = search(tiny.model, tiny.batches, [], max_bytes=10**9, weight_bits=(2, 4, 8), record=tiny.record,
                      sensitivity=sens, progress=False)  # fmt: skip
    assert set(generous.plan.weights.values()) == {8} and generous.predicted_drop == 0.0
    budget = (generous.predicted_bytes * 6) // 10
    result = search(tiny.model, tiny.batches, [], max_bytes=budget, weight_bits=(2, 4, 8), record=tiny.record,
                    sensitivity=sens, progress=False)  # fmt: skip
    assert result.predicted_bytes <= budget
    model = ptq(copy.deepcopy(tiny.model), result.config, stats=tiny.stats).model
    written = save_packed(model, tmp_path / "m.safetensors", PackedMeta(tiny.record, result.config))
    assert os.path.getsize(written.path) == result.predicted_bytes
    with pytest.raises(BitsweepError, match="smallest reachable size"):
        search(tiny.model, tiny.batches, [], max_bytes=1000, weight_bits=(2, 4, 8), record=tiny.record,
               sensitivity=sens, progress=False)  # fmt: skip


def test_search_under_a_drop_budget(tiny) -> None:
    result = search(tiny.model, tiny.batches, [], max_drop=2.0, weight_bits=(2, 4, 8), record=tiny.record,
                    sensitivity=_fake_sensitivity(tiny), progress=False)  # fmt: skip
    assert result.predicted_drop <= 2.0 and min(result.plan.weights.values()) < 8
    with pytest.raises(BitsweepError, match="exactly one budget"):
        search(tiny.model, tiny.batches, [], record=tiny.record, sensitivity=_fake_sensitivity(tiny))


def test_solver_equals_brute_force_with_weight_and_activation_groups(tiny) -> None:
    """A small instance cut from the real table: 3 weight layers and 3 activation sites, shared spec entries."""
    table = byte_table(tiny.layout, QuantConfig(), (2, 4, 8), (4, 8))
    layers, sites = tiny.names.weights[:3], tiny.names.activations[:3]
    small = dataclasses.replace(table, weights={n: table.weights[n] for n in layers},
                                activations={s: table.activations[s] for s in sites},
                                site_labels={s: table.site_labels[s] for s in sites})  # fmt: skip
    rng = random.Random(0)
    for _ in range(4):
        drops = {n: {b: rng.randint(0, 64) / 64 for b in (2, 4, 8)} for n in layers}
        act_drops = {s: {b: rng.randint(0, 64) / 64 for b in (4, 8)} for s in sites}
        problem = build_problem(small, drops, act_drops)
        assert sum(g.name.startswith(ACTIVATION_GROUP) for g in problem.groups) == 3
        sizes = sorted({c.bytes for c in _all_choices(problem)})
        for budget in sizes[:: max(1, len(sizes) // 6)]:
            reference = brute_force(problem, "drop", {"bytes": budget})
            assert reference is not None
            choice = min_drop(problem, budget)
            assert (choice.drop, choice.bytes) == (reference.drop, reference.bytes)
        for max_drop in (0.0, 0.5, 1.0, 2.0):
            reference = brute_force(problem, "bytes", {"drop": max_drop})
            if reference is not None:
                choice = min_bytes(problem, max_drop)
                assert (choice.bytes, choice.drop) == (reference.bytes, reference.drop)
    allowed = build_problem(small, drops, act_drops, {s: (4,) for s in sites})
    assert [[o.label for o in g.options] for g in allowed.groups[3:]] == [["4"]] * 3


def _all_choices(problem: Problem) -> list[Choice]:
    return [
        evaluate(problem, {g.name: o.label for g, o in zip(problem.groups, combo, strict=True)})
        for combo in itertools.product(*(g.options for g in problem.groups))
    ]


def _with_activations(tiny, sens: Sensitivity) -> Sensitivity:
    """Activation drops: 1 point at 4 bits for every site, 0 at 8."""
    acts = tuple(Trial(s, b, 1.0, 90.0 - (1.0 if b == 4 else 0.0)) for s in tiny.names.activations for b in (4, 8))
    return dataclasses.replace(sens, activation_trials=acts)


def test_activation_bits_under_a_peak_memory_budget(tmp_path: Path, tiny) -> None:
    sens = _with_activations(tiny, _fake_sensitivity(tiny))
    kwargs = dict(weight_bits=(2, 4, 8), activation_bits=(4, 8), record=tiny.record, sensitivity=sens, progress=False)
    free = search(tiny.model, tiny.batches, [], max_bytes=10**9, **kwargs)
    assert free.plan.activations == {} and free.plan.activation_bits == 8  # every site at the default: none listed
    assert free.peak_activation_bytes == 37632 and free.predicted_drop == 0.0  # 8 bits x the largest tensor
    limit = 20_000  # the 37,632-value tensors must go to 4 bits (18,816 bytes); the rest stay at 8
    result = search(tiny.model, tiny.batches, [], max_bytes=10**9, max_activation_bytes=limit, **kwargs)
    low = {s for s, b in result.plan.activations.items() if b == 4}
    assert low and result.peak_activation_bytes <= limit < free.peak_activation_bytes
    assert result.predicted_drop == pytest.approx(len(low))  # 1 point per 4-bit site
    model = ptq(copy.deepcopy(tiny.model), result.config, stats=tiny.stats).model
    written = save_packed(model, tmp_path / "m.safetensors", PackedMeta(tiny.record, result.config))
    assert os.path.getsize(written.path) == result.predicted_bytes
    quantizers = activation_quantizers(model)
    assert {activation_key(n) for n, q in quantizers if q.spec.bits == 4} == low
    message = r"smallest reachable peak is 18,816 bytes \('features\.2\.conv\.0\.2', 37,632 values at 4 bits\)"
    with pytest.raises(BitsweepError, match=message):
        search(tiny.model, tiny.batches, [], max_bytes=10**9, max_activation_bytes=18_815, **kwargs)
    with pytest.raises(BitsweepError, match="smallest reachable peak is 37,632 bytes"):  # one candidate: fixed
        search(tiny.model, tiny.batches, [], max_bytes=10**9, max_activation_bytes=limit,
               **{**kwargs, "activation_bits": 8})  # fmt: skip


def test_searched_activations_need_their_trials(tiny) -> None:
    with pytest.raises(BitsweepError, match="no sensitivity measured for activation site"):
        search(tiny.model, tiny.batches, [], max_bytes=10**9, weight_bits=(2, 4, 8), activation_bits=(4, 8),
               record=tiny.record, sensitivity=_fake_sensitivity(tiny), progress=False)  # fmt: skip
