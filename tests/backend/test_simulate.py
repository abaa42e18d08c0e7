"""The integer-exact simulation: equal to the reference, compiled once per model, honest about fallbacks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from bitsweep.backend.intref import run_integer
from bitsweep.backend.lowering import lower
from bitsweep.backend.simulate import CompiledRunner, Simulator, evaluation_model, int8_convolutions_exact, simulate
from bitsweep.quant import QuantConfig, ptq

QuantFactory = Callable[..., tuple[nn.Module, QuantConfig]]


@pytest.mark.parametrize("int8", [False, pytest.param(True, marks=pytest.mark.skipif(
    not int8_convolutions_exact(), reason="this CPU has no VNNI/AMX: int8 kernels are not used here"))])  # fmt: skip
def test_simulation_equals_the_reference_on_either_kernel(quantized: QuantFactory, int8: bool) -> None:
    model, _ = quantized(4, 8)
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sim = Simulator(lower(model, x), int8=int8)
    kinds = {step[0] for step in sim.plan}
    assert ("qconv" in kinds) == int8 and ("conv" in kinds) != int8
    assert torch.equal(sim(x), run_integer(model, x))
    assert torch.equal(sim(x.contiguous(memory_format=torch.channels_last)), sim(x))


def test_activation_bits_change_the_simulation(quantized: QuantFactory) -> None:
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a8, a2 = (simulate(quantized(8, a)[0], x)(x) for a in (8, 2))
    assert not torch.equal(a8, a2)


@pytest.mark.slow  # torch.compile
def test_compiled_runner_pads_and_compiles_once(quantized: QuantFactory) -> None:
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    runner = CompiledRunner(batch_size=8)
    for bits in (8, 4):
        sim = simulate(quantized(bits, bits)[0], x)
        assert torch.equal(runner(sim, x), sim(x))  # 5 images padded to the compiled batch of 8
    assert len(runner._compiled) == 1


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
