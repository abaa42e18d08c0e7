"""The integer-exact simulation: equal to the reference, compiled once per model, honest about fallbacks."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bitsweep.backend.intref import round_shift, run_integer
from bitsweep.backend.lowering import lower
from bitsweep.backend.simulate import (
    INT16_PAIR_LIMIT,
    CompiledRunner,
    Simulator,
    _requant,
    _requant_consts,
    evaluation_model,
    int8_conv1x1,
    int8_pair_limit,
    run,
    simulate,
    split_weights,
)
from bitsweep.quant import QuantConfig, ptq

QuantFactory = Callable[..., tuple[nn.Module, QuantConfig]]


@pytest.mark.parametrize("int8", [False, pytest.param(True, marks=pytest.mark.skipif(
    int8_pair_limit() is None, reason="this CPU has no int8 convolution kernels"))])  # fmt: skip
@pytest.mark.parametrize("bits", [(4, 8), (8, 8), (2, 4)])
def test_simulation_equals_the_reference_on_either_kernel(quantized: QuantFactory, int8: bool,
                                                          bits: tuple[int, int]) -> None:  # fmt: skip
    model, _ = quantized(*bits)
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sim = Simulator(lower(model, x), int8=int8)
    kinds = {step[0] for step in sim.plan}
    assert ("qconv" in kinds) == int8 and ("conv" in kinds) != int8
    assert torch.equal(sim(x), run_integer(model, x))
    assert torch.equal(sim(x.contiguous(memory_format=torch.channels_last)), sim(x))


@pytest.mark.parametrize("limit", [math.inf, INT16_PAIR_LIMIT])
def test_split_weights_sum_to_the_weights_and_keep_the_pair_limit(limit: float) -> None:
    w = torch.randint(-128, 128, (64, 8, 3, 3), generator=torch.Generator().manual_seed(0))
    w[0, 0, 0, 0], w[1, 0, 0, 0] = -128, 127
    for x_max in (1, 15, 127, 128, 255):
        parts = split_weights(w, x_max, limit)
        assert torch.equal(sum(parts), w)
        assert all(2 * x_max * int(p.abs().max()) <= limit for p in parts)
        assert len(parts) == (1 if 2 * x_max * 128 <= limit else 2)


@pytest.mark.skipif(int8_pair_limit() != INT16_PAIR_LIMIT, reason="the int16 pair limit of AVX2-only CPUs")
def test_avx2_int8_kernels_are_exact_within_the_pair_limit_only() -> None:
    """Why the limit exists, shown on the CPU itself: 255 x 127 pairs saturate, 255 x 64 pairs do not."""
    x = torch.full((1, 32, 4, 4), 255.0)
    for w_max, exact in ((127, False), (64, True)):
        w = torch.full((8, 32, 1, 1), w_max, dtype=torch.int64)
        out = int8_conv1x1(x, w)
        assert bool((out == 255 * w_max * 32).all()) == exact
        parts = split_weights(w, 255, INT16_PAIR_LIMIT)
        assert torch.equal(sum(int8_conv1x1(x, p) for p in parts), torch.full_like(out, 255 * w_max * 32))


@pytest.mark.slow  # a pytest subprocess
@pytest.mark.skipif(int8_pair_limit() != math.inf, reason="int8 kernels that sum in int32 (VNNI/AMX) only: "
                    "elsewhere the AVX2 tests run in the main session")  # fmt: skip
def test_the_avx2_int8_path_is_exact_on_this_cpu_too() -> None:
    """The AVX2-only path (int16 pairs, weights split) is checked on every x86 machine, not only on AVX2-only ones.

    oneDNN runs its AVX2 kernels when ``ONEDNN_MAX_CPU_ISA=AVX2``; ``int8_pair_limit`` must notice (it measures)
    and the simulation must still equal the integer reference. The AVX2-only tests run in a child pytest.
    """
    root = Path(__file__).resolve().parents[2]
    wanted = ["tests/backend/test_simulate.py::test_avx2_int8_kernels_are_exact_within_the_pair_limit_only",
              "tests/backend/test_lowering.py::test_plan_is_the_same_for_every_bit_width"]  # fmt: skip
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *wanted,
         "tests/backend/test_simulate.py", "-k", "equals_the_reference_on_either_kernel or avx2_int8 or plan_is_the"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for test in wanted:
        assert f"PASSED {test}" in r.stdout, r.stdout[-3000:]
    w8a8_split = "test_simulation_equals_the_reference_on_either_kernel[bits1-True]"  # W8A8: weights in two parts
    assert f"PASSED tests/backend/test_simulate.py::{w8a8_split}" in r.stdout, r.stdout[-3000:]


def test_activation_bits_change_the_simulation(quantized: QuantFactory) -> None:
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a8, a2 = (simulate(quantized(8, a)[0], x)(x) for a in (8, 2))
    assert not torch.equal(a8, a2)


@pytest.mark.slow  # torch.compile
def test_compiled_runner_pads_and_compiles_once(quantized: QuantFactory) -> None:
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    runner = CompiledRunner(batch_size=8)
    for bits in (4, 2):  # (W8A8 has a plan of its own on AVX2-only CPUs)
        sim = simulate(quantized(bits, bits)[0], x)
        assert torch.equal(runner(sim, x), sim(x))  # 5 images padded to the compiled batch of 8
    assert len(runner._compiled) == 1


def test_compiled_runner_drops_a_program_that_disagrees(
    quantized: QuantFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compiled program that returns other logits than the eager one (a stale compile cache did) is dropped."""
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sim = simulate(quantized(4, 4)[0], x)
    runner = CompiledRunner(batch_size=8)
    monkeypatch.setattr(runner, "_fn", lambda plan: lambda tensors, images: run(plan, tensors, images) + 1.0)
    with pytest.warns(UserWarning, match="disagreed with the eager one"):
        assert torch.equal(runner(sim, x), sim(x))
    assert runner.eager and torch.equal(runner(sim, x), sim(x))  # eager from then on, no second warning


def test_compiled_runner_checks_each_compiled_graph_once(quantized: QuantFactory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sims = [simulate(quantized(bits, bits)[0], x) for bits in (4, 2)]  # one plan: one compiled graph
    assert sims[0].plan == sims[1].plan
    runner = CompiledRunner(batch_size=8)
    monkeypatch.setattr(runner, "_fn", lambda plan: functools.partial(run, plan))  # stands in for torch.compile
    eager_calls = []
    for sim in sims:
        monkeypatch.setattr(
            sim, "forward", lambda images, sim=sim: eager_calls.append(sim) or Simulator.forward(sim, images)
        )
    for _ in range(3):
        for sim in sims:
            runner(sim, x)
    assert eager_calls == sims[:1] and not runner.eager  # one eager batch for the graph, then compiled only


def test_unsupported_models_fall_back_to_fake_quant_and_say_so() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.SiLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    model = ptq(model, QuantConfig.from_bits(8, 8), [torch.randn(4, 1, 8, 8)]).model
    evaluated, kind = evaluation_model(model, torch.zeros(1, 1, 8, 8))
    assert evaluated is model
    assert kind.startswith("fake-quant") and "SiLU" in kind


def test_evaluation_model_reports_exactness(quantized: QuantFactory) -> None:
    _, kind8 = evaluation_model(quantized(8, 8)[0], torch.zeros(1, 1, 8, 8))
    _, kind16 = evaluation_model(quantized(16, 16)[0], torch.zeros(1, 1, 8, 8))
    assert (kind8, kind16) == ("integer-exact", "integer")


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 51), st.integers(1, 62), st.data())
def test_float64_requantization_equals_the_int64_one(acc_bits: int, shift: int, data: st.DataObject) -> None:
    """The simulation's float64 requantization is the reference's int64 one whenever ``|acc| * m0 < 2**52``
    (what ``lowering.fixed_point`` guarantees)."""
    acc = data.draw(st.integers(-(2**acc_bits) + 1, 2**acc_bits - 1))
    for value, m in EDGE_CASES:  # ties and the 2**52 edge, every time
        _check_requant(value, m, shift)
    m0 = data.draw(st.integers(1, max(1, min(2**31 - 1, (2**52 - 1) // max(abs(acc), 1)))))
    _check_requant(acc, m0, shift)


EDGE_CASES = [(3, 1), (-3, 1), (1, 1), (-1, 1), (2**21 - 1, 2**31 - 1), (-(2**21) + 1, 2**31 - 1), (2**52 - 1, 1),
              (-(2**52) + 1, 1)]  # fmt: skip


def _check_requant(acc: int, m0: int, shift: int) -> None:
    acc_t, m0_t, shift_t = torch.tensor([acc]), torch.tensor([m0]), torch.tensor([shift])
    want = int(round_shift(acc_t * m0_t, shift_t)[0])
    ms, c, lo, hi = _requant_consts(m0_t, shift_t, False, None, -(2**62), 2**62, 1)
    assert int(torch.floor(acc_t.double() * ms + c)[0]) == want
    if abs(want) < 2**24:  # what the simulation returns (float32) is exact there
        assert int(_requant(acc_t.double(), ms, c, lo, hi)[0]) == want


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**40), 2**40), st.integers(-300, 300), st.integers(-300, 300))
def test_requantization_clamps_after_float32_rounding_as_before_it(acc: int, lo: int, span: int) -> None:
    """``_requant`` rounds to float32 before clamping; clamped results equal an exact int64 clamp, even far out."""
    hi = lo + abs(span)
    ms, c, lo_t, hi_t = _requant_consts(torch.tensor([1]), torch.tensor([1]), False, None, lo, hi, 1)
    want = min(max((acc + 1) >> 1, lo), hi)  # floor(acc / 2 + 1/2)
    assert int(_requant(torch.tensor([float(acc)], dtype=torch.float64), ms, c, lo_t, hi_t)[0]) == want
