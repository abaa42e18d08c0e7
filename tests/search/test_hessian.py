"""Hutchinson traces against closed-form and autograd Hessians; seeding, ranking, caching, search with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsweep.cli import main
from bitsweep.errors import BitsweepError
from bitsweep.search.api import search
from bitsweep.search.hessian import (
    HessianConfig,
    HessianSensitivity,
    hessian_sensitivity,
    hessian_traces,
    load_cached_traces,
    measure_hessian,
    rank_agreement,
)
from bitsweep.search.solver import Group, Option, Problem, min_drop
from bitsweep.search.validate import search_validated


def _data(features: int, n: int = 24, classes: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of unequal size, so the image weighting of per-batch products is exercised."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)
    return [(x[:16], y[:16]), (x[16:], y[16:])]


def test_linear_softmax_trace_matches_the_closed_form() -> None:
    # For logits W x (+ b), the Hessian of the mean cross-entropy in W is mean_x (diag(p) - p p^T) (x) x x^T,
    # whose trace is mean_x sum_c p_c (1 - p_c) ||x||^2.
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    batches = _data(6)
    traces = hessian_traces(model, batches, HessianConfig(samples=200, images=24), progress=False)
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        p = model(x).softmax(1)
    exact = float(((p * (1 - p)).sum(1) * x.square().sum(1)).mean())
    (t,) = traces.traces
    assert t.layer == "" and t.numel == 24 and traces.images == 24 and traces.samples == 200
    assert abs(t.trace - exact) <= 4 * t.stderr and t.stderr < 0.05 * exact
    assert t.mean_trace == pytest.approx(t.trace / 24)


def test_conv_net_traces_match_autograd_hessian() -> None:
    # ReLU, as in the real models: each layer's own Hessian block is then positive semi-definite (the network
    # is piecewise linear in one layer's weights), where Hutchinson's estimate is well behaved. One v covers
    # both layers, so the cross-layer terms add noise, which the standard error reports.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 5, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    traces = hessian_traces(model, [(x, y)], HessianConfig(samples=200, images=12), progress=False)
    assert [t.layer for t in traces.traces] == ["0", "3"]
    for t in traces.traces:
        weight = model.get_submodule(t.layer).weight.detach()

        def loss(w: torch.Tensor, name: str = t.layer) -> torch.Tensor:
            out = torch.func.functional_call(model, {f"{name}.weight": w}, (x,))
            return nn.functional.cross_entropy(out, y)

        n = weight.numel()
        exact = float(torch.autograd.functional.hessian(loss, weight).reshape(n, n).trace())
        assert abs(t.trace - exact) <= 4 * t.stderr and t.stderr < 0.3 * exact


def test_a_seed_repeats_and_another_differs() -> None:
    torch.manual_seed(0)
    model, batches = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)), _data(6)
    cfg = HessianConfig(samples=4, images=20)
    first = hessian_traces(model, batches, cfg, progress=False)
    assert first == hessian_traces(model, batches, cfg, progress=False)
    assert first.images == 20  # the second batch is cut to reach exactly 20 images
    other = hessian_traces(model, batches, HessianConfig(samples=4, images=20, seed=1), progress=False)
    assert [t.trace for t in other.traces] != [t.trace for t in first.traces]


class _TwoBranches(nn.Module):
    """Two equal linear maps; ``b`` reads its inputs scaled by 3, so its curvature is about 9x ``a``'s."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, :6]) + self.b(3 * x[:, 6:])


def test_more_curvature_ranks_higher_and_keeps_more_bits() -> None:
    torch.manual_seed(0)
    model = _TwoBranches()
    result = measure_hessian(model, _data(12), (2, 4, 8), HessianConfig(samples=64, images=24), progress=False)
    traces = {t.layer: t for t in result.traces.traces}
    assert traces["b"].mean_trace > 4 * traces["a"].mean_trace > 0
    drops = result.drops()
    for bits in (2, 4, 8):  # equal weights, equal rounding noise: the curvature decides
        noise = {e.layer: e.perturbation for e in result.estimates if e.bits == bits}
        assert noise["a"] == noise["b"] > 0
        assert drops["b"][bits] > drops["a"][bits] > 0
    assert drops["a"][2] > drops["a"][4] > drops["a"][8]
    # one layer may keep 8 bits: the more curved one does
    groups = tuple(Group(n, tuple(Option(str(b), 3 * b, drops[n][b]) for b in (2, 8))) for n in ("a", "b"))
    assert min_drop(Problem(groups), 3 * 2 + 3 * 8).picks == {"a": "2", "b": "8"}


def test_records_round_trip_and_the_cache_is_keyed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, batches = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)), _data(6)
    path, key = tmp_path / "hessian.json", {"checkpoint_sha256": "ab", "samples": 3}
    cfg = HessianConfig(samples=3, images=24)
    result = measure_hessian(model, batches, (2, 8), cfg, cache=(path, key), progress=False)
    assert HessianSensitivity.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    assert load_cached_traces(path, key) == result.traces
    assert load_cached_traces(path, {**key, "samples": 4}) is None and load_cached_traces(tmp_path / "no", key) is None
    # a cached record is reused: the estimate from it needs no validation image
    again = measure_hessian(model, [], (2, 4, 8), cfg, cache=(path, key), progress=False)
    assert again.traces == result.traces and len(again.estimates) == 2 * 3
    assert hessian_sensitivity(model, result.traces, (2, 8)) == result
    with pytest.raises(BitsweepError, match="estimates a loss increase, not 'top1'"):
        result.drops("top1")
    with pytest.raises(BitsweepError, match="validation set is empty"):
        hessian_traces(model, [], cfg, progress=False)
    with pytest.raises(BitsweepError, match="no Conv2d/Linear layer named 'x'"):
        hessian_traces(model, batches, cfg, layers=["x"], progress=False)
    with pytest.raises(BitsweepError, match="integer >= 2"):
        HessianConfig(samples=1)


def test_rank_agreement() -> None:
    a = {"x": {2: 3.0, 8: 0.1}, "y": {2: 2.0, 8: 0.2}, "z": {2: 1.0, 8: 0.3}}
    b = {"x": {2: 30.0, 8: 3.0}, "y": {2: 20.0, 8: 2.0}, "z": {2: 10.0, 8: 1.0}, "extra": {2: 5.0}}
    r = rank_agreement(a, b)
    assert r["2 bits"] == pytest.approx(1.0) and r["8 bits"] == pytest.approx(-1.0)
    assert rank_agreement({"x": {2: 1.0}, "y": {2: 1.0}}, b)["2 bits"] is None  # a constant side


def test_search_ranks_by_the_hessian_under_a_byte_budget(tiny) -> None:
    common = dict(weight_bits=(2, 4, 8), record=tiny.record, stats=tiny.stats, progress=False)
    generous = search(tiny.model, tiny.batches, tiny.batches, max_bytes=10**9, estimate="hessian",
                      hessian=HessianConfig(samples=2, images=16), **common)  # fmt: skip
    sens = generous.sensitivity
    assert isinstance(sens, HessianSensitivity) and sens.images == 16
    assert {t.layer for t in sens.traces.traces} == set(tiny.names.weights)
    assert set(generous.plan.weights.values()) == {8}
    budget = (generous.predicted_bytes * 6) // 10
    result = search(tiny.model, tiny.batches, [], max_bytes=budget, sensitivity=sens, **common)
    assert result.predicted_bytes <= budget and min(result.plan.weights.values()) < 8
    assert result.predicted_drop == pytest.approx(
        sum(max(0.0, *(sens.drops()[n][b] for b in (2, 4, 8) if b >= bits)) for n, bits in result.plan.weights.items())
    )  # reported in loss units (robust: never negative, never less at fewer bits), not the solver's rescaled ones
    with pytest.raises(BitsweepError, match="ranks layers under a size budget only"):
        search(tiny.model, tiny.batches, [], max_drop=1.0, sensitivity=sens, **common)


def test_unsupported_combinations_are_refused_before_work(tiny) -> None:
    split = (torch.cat([b[0] for b in tiny.batches]), torch.cat([b[1] for b in tiny.batches]))
    with pytest.raises(BitsweepError, match="ranks layers under a size budget only"):
        search_validated(tiny.model, tiny.batches, split, record=tiny.record, max_drop=1.0, estimate="hessian")
    with pytest.raises(BitsweepError, match="covers weight layers only"):
        search_validated(tiny.model, tiny.batches, split, record=tiny.record, max_ratio=4, activation_bits=(4, 8),
                         estimate="hessian")  # fmt: skip
    with pytest.raises(BitsweepError, match="must be 'measured' or 'hessian'"):
        search_validated(tiny.model, tiny.batches, split, record=tiny.record, max_ratio=4, estimate="fisher")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-drop", "1", "--sensitivity", "hessian"], "--sensitivity hessian estimates a loss increase, not "
         "accuracy points, so it cannot meet --max-drop"),
        (["--max-ratio", "4", "--sensitivity", "hessian", "--activation-bits", "4,8"], "covers weight layers only"),
        (["--max-ratio", "4", "--hessian-samples", "8"], "--hessian-samples applies to --sensitivity hessian only"),
        (["--max-ratio", "4", "--sensitivity", "hessian", "--hessian-samples", "1"], "must be at least 2"),
    ],
)  # fmt: skip
def test_cli_refuses_unsupported_combinations(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "search"
    status = main(["search", str(tmp_path / "missing.pt"), "--output-dir", str(out), "--quiet", *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert not out.exists()
