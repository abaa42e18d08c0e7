"""bind_bias_grids: each weight layer's bias rounds on the grid the integer program adds it on."""

from __future__ import annotations

import torch
from torch import nn

from bitsweep.backend.intref import run_integer
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.bias_grid import bind_bias_grids
from bitsweep.quant.modules import QuantConv2d, QuantLinear
from bitsweep.quant.primitives import fake_quantize_bias


class _Block(nn.Module):
    """Stem conv, a residual add, pooling and a head: the input, an add and a pool each set a layer's grid."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU6())
        self.mid = nn.Conv2d(6, 6, 1)
        self.after_add = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.after_add(x + self.mid(x))
        return self.head(x.mean((2, 3)))


def _converted(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = _Block().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.uniform_(-0.5, 0.5)  # biases far from any grid, so rounding shows
    x = torch.randn(16, 1, 8, 8)
    return ptq(model, QuantConfig.from_bits(4, 4), [x]).model, x


def test_each_layer_binds_to_the_quantizer_that_last_put_its_input_on_a_grid() -> None:
    model, _ = _converted()
    assert bind_bias_grids(model) == 4
    grids = {name: m.bias_grid[0] for name, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    quantizers = dict(model.named_modules())
    assert grids["stem.0"] is quantizers["stem.0"].input_quantizer  # the network input
    assert grids["mid"] is quantizers["stem.1"].output_quantizer  # the ReLU6 output
    assert grids["after_add"].site == "add" and grids["head"].site == "pool"
    assert grids["head"] is not grids["after_add"]


def test_bound_biases_make_fake_quant_compute_what_the_integer_program_does() -> None:
    model, x = _converted()
    with torch.no_grad():
        unbound = (model(x) - run_integer(model, x)).abs().max().item()
        bind_bias_grids(model)
        bound = (model(x) - run_integer(model, x)).abs().max().item()
    assert bound < 1e-5 < 1e-2 < unbound  # float32 sums against integers, against up to half a bias step per layer


def test_unbinding_restores_the_float_bias() -> None:
    model, x = _converted()
    with torch.no_grad():
        before = model(x)
        bind_bias_grids(model)
        for m in model.modules():
            if isinstance(m, (QuantConv2d, QuantLinear)):
                m.bind_bias_grid(None)
        assert torch.equal(model(x), before)


def test_bias_rounding_is_exact_forward_and_straight_through_backward() -> None:
    step = torch.tensor([0.3, 0.07, 1e-3], dtype=torch.float64)
    bias = torch.tensor([0.44, -0.1049, 2.0], requires_grad=True)
    out = fake_quantize_bias(bias, step)
    expected = (torch.round(bias.detach().double() / step) * step).float()
    assert torch.equal(out.detach(), expected)  # bit for bit: no float32 residue from the STE trick
    out.mul(torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(bias.grad, torch.tensor([1.0, 2.0, 3.0]))
