"""prepare_qat / convert_qat: what is trained, what comes out, and that it is integer-exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitsweep.backend.intref import compare, run_integer
from bitsweep.errors import BitsweepError
from bitsweep.qat import QATConfig, convert_qat, prepare_qat
from bitsweep.quant import QuantConfig, ptq
from bitsweep.quant.modules import ActivationQuantizer, QuantConv2d, QuantLinear
from bitsweep.quant.primitives import quantize


class Residual(nn.Module):
    """Conv-BN-ReLU6, a residual block and a classifier: folds, adds and clamps, small enough for many steps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.block(x)
        return self.head(x.mean((2, 3)))


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is which quadrant is brightest: learnable, and not by chance."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 1.0
    return x, y


_TRAINED: dict[str, dict[str, torch.Tensor]] = {}


def _sgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.02, momentum: float = 0.9
) -> None:
    """``steps`` full-batch SGD steps of cross-entropy on (x, y)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _float_model() -> nn.Module:
    """The float model trained on :func:`_data` (QAT fine-tunes a trained model; trained once per session)."""
    torch.manual_seed(0)
    model = Residual()
    if "state" not in _TRAINED:
        x, y = _data(256, seed=9)
        model.train()
        _sgd(model, x, y, 80)
        _TRAINED["state"] = copy.deepcopy(model.state_dict())
    model.load_state_dict(_TRAINED["state"])
    return model.eval()


@pytest.mark.parametrize("method", ["lsq", "ste"])
def test_qat_lowers_the_training_loss(method: str) -> None:
    x, y = _data()
    model = _float_model()
    prepared = prepare_qat(model, QuantConfig.from_bits(2, 4, observer="mse"), [x], QATConfig(method=method))
    assert (len(prepared.scales) > 0) == (method == "lsq")

    def loss_now() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(prepared.model(x), y))

    before = loss_now()
    # The loss is the integer program's (biases rounded on their accumulator grids too): a step function of
    # every parameter. With momentum 0.9 its last value jumped anywhere from 0.42x to 1.21x of the start
    # between one and two threads and AVX-512 or AVX2 kernels; momentum 0.5 for 150 steps ended at
    # 0.64-0.68x in all eight of those runs.
    _sgd(prepared.model, x, y, 150, lr=0.01, momentum=0.5)
    assert loss_now() < 0.75 * before


def test_lsq_trains_every_scale_and_ste_none() -> None:
    x, y = _data()
    lsq = prepare_qat(_float_model(), QuantConfig.from_bits(4, 4), [x], QATConfig(method="lsq"))
    F.cross_entropy(lsq.model(x), y).backward()
    quantizers = [m for m in lsq.model.modules() if isinstance(m, ActivationQuantizer) and m.mode == "quantize"]
    layers = [m for m in lsq.model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(lsq.scales) == len(quantizers) + len(layers)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in lsq.scales)
    assert all(m.weight_quantizer.scale.shape == (m.weight.shape[0],) for m in layers)  # per channel
    ste = prepare_qat(_float_model(), QuantConfig.from_bits(4, 4), [x], QATConfig(method="ste"))
    assert ste.scales == [] and all(
        m.weight_mode == "qat" for m in ste.model.modules() if isinstance(m, (QuantConv2d, QuantLinear))
    )


def test_batchnorm_is_folded_and_trained_as_the_integer_program_runs_it() -> None:
    x, _ = _data()
    prepared = prepare_qat(_float_model(), QuantConfig.from_bits(4, 8), [x])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.model.modules())


def test_converted_qat_model_agrees_with_the_integer_reference_on_every_image() -> None:
    x, y = _data()
    model = _float_model()
    prepared = prepare_qat(model, QuantConfig.from_bits(2, 4), [x])
    _sgd(prepared.model, x, y, 10)
    converted = convert_qat(prepared.model)
    assert not any(
        isinstance(p, nn.Parameter)
        for m in converted.modules()
        if isinstance(m, ActivationQuantizer)
        for p in m.parameters()
    )
    test_x, test_y = _data(96, seed=5)
    result = compare(converted, [(test_x[:48], test_y[:48]), (test_x[48:], test_y[48:])])
    assert result.images == 96 and result.float32_exact
    assert result.max_logit_diff == 0.0
    for m in converted.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            q = m.int_weight()
            assert q.min() >= m.weight_quantizer.spec.qmin and q.max() <= m.weight_quantizer.spec.qmax


def test_float16_convert_rounds_learned_scales_and_trained_biases_and_stays_integer_exact() -> None:
    x, y = _data()
    prepared = prepare_qat(_float_model(), QuantConfig.from_bits(4, 8, scale_dtype="float16"), [x])
    _sgd(prepared.model, x, y, 5)
    converted = convert_qat(prepared.model, "float16")
    for m in converted.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            wq = m.weight_quantizer
            for t in (wq.scale, m.bias) if m.bias is not None else (wq.scale,):
                assert torch.equal(t.detach().half().float(), t.detach())
            assert torch.equal(wq.q, quantize(m.weight, wq.scale, wq.zero_point, wq.spec))  # chosen with the fp16 scale
    assert compare(converted, [x]).max_logit_diff == 0.0


def test_binary_weights_train_as_sign_times_a_learned_scale() -> None:
    x, y = _data()
    prepared = prepare_qat(_float_model(), QuantConfig.from_bits(1, 8), [x])
    before = [s.detach().clone() for s in prepared.scales]
    _sgd(prepared.model, x, y, 5, lr=0.05, momentum=0.0)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, prepared.scales, strict=True))
    converted = convert_qat(prepared.model)
    for m in converted.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            assert set(m.int_weight().unique().tolist()) <= {-1, 1}
    assert compare(converted, [x]).max_logit_diff == 0.0


def test_a_step_size_pushed_below_zero_stays_a_valid_grid() -> None:
    x, _ = _data()
    prepared = prepare_qat(_float_model(), QuantConfig.from_bits(4, 8), [x])
    with torch.no_grad():
        for s in prepared.scales:
            s.fill_(-1.0)
    converted = convert_qat(prepared.model)  # no "scale must be positive" from deep inside
    assert all(
        float(m.weight_quantizer.scale.min()) > 0
        for m in converted.modules()
        if isinstance(m, (QuantConv2d, QuantLinear))
    )


def test_learned_rounding_is_where_qat_starts() -> None:
    """AdaRound picked other integers than nearest rounding; QAT's first forward must compute those."""
    x, _ = _data()
    reference = ptq(
        _float_model(),
        QuantConfig.from_bits(2, 8, method="adaround"),
        [x],
        options={"iterations": 30, "progress": False},
    ).model
    prepared = prepare_qat(
        _float_model(),
        QuantConfig.from_bits(2, 8),
        [x],
        QATConfig(init="adaround"),
        options={"iterations": 30, "progress": False},
    )
    start = convert_qat(copy.deepcopy(prepared.model))
    for (name, a), (_, b) in zip(reference.named_modules(), start.named_modules(), strict=True):
        if isinstance(a, (QuantConv2d, QuantLinear)):
            assert torch.equal(a.int_weight(), b.int_weight()), name


def test_a_model_with_nothing_to_quantize_is_refused() -> None:
    with pytest.raises(BitsweepError, match="no Conv2d or Linear layer"):
        prepare_qat(nn.Sequential(nn.ReLU()).eval(), QuantConfig.from_bits(4, 4), [torch.randn(2, 3)])


@pytest.mark.parametrize(("weight_bits", "activation_bits", "method"), [(2, 4, "lsq"), (4, 8, "ste"), (1, 8, "lsq")])
def test_training_forward_computes_what_the_integer_program_will(
    weight_bits: int, activation_bits: int, method: str
) -> None:
    """The accuracy QAT validates each epoch must be the integer program's, biases included.

    Trained float biases that the integer program then rounds onto each accumulator grid cost a W4A4
    MobileNet-v2 2.2 points between its last validation and its integer-exact result.
    """
    x, y = _data()
    prepared = prepare_qat(
        _float_model(), QuantConfig.from_bits(weight_bits, activation_bits), [x], QATConfig(method=method)
    )
    _sgd(prepared.model, x, y, 10)
    test_x, _ = _data(96, seed=5)
    model = prepared.model.eval()
    with torch.no_grad():
        trained = model(test_x)  # the training state (trainable scales, float weights), as validation runs it
        integer = run_integer(convert_qat(copy.deepcopy(model)), test_x)
    assert (trained - integer).abs().max() < 1e-5  # float32 sums only (measured: under 1e-6)


def test_a_graph_the_lowering_cannot_walk_trains_float_biases_and_says_so() -> None:
    class SizedView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.conv(x)).view(x.size(0), -1))  # a shape computation

    with pytest.warns(UserWarning, match="QAT trains float biases .*size"):
        prepared = prepare_qat(SizedView().eval(), QuantConfig.from_bits(4, 4), [torch.randn(8, 1, 8, 8)])
    assert all(m.bias_grid == () for m in prepared.model.modules() if isinstance(m, (QuantConv2d, QuantLinear)))


@pytest.mark.slow
@pytest.mark.parametrize(("weight_bits", "activation_bits", "method"), [(2, 4, "lsq"), (4, 8, "ste"), (1, 8, "lsq")])
def test_the_training_forward_compiles_as_one_graph_and_agrees_with_eager(
    weight_bits: int, activation_bits: int, method: str
) -> None:
    """``bitsweep qat --compile`` relies on fake quantization tracing without graph breaks.

    A ``.item()`` on the zero point once split every quantizer into its own graph, which then
    recompiled per layer (grad scales differ) and made the compiled step slower than eager.
    """
    x, y = _data()
    prepared = prepare_qat(
        _float_model(), QuantConfig.from_bits(weight_bits, activation_bits), [x], QATConfig(method=method)
    )
    model = prepared.model
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # raises on any graph break
    out = compiled(x)
    F.cross_entropy(out, y).backward()
    fused = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    eager = model(x)
    F.cross_entropy(eager, y).backward()
    plain = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    # Fused kernels round float32 sums differently, which can move a value across a rounding boundary
    # (as the float convolutions of eager fake-quant can against the integer program); no more than that.
    assert (out - eager).abs().max() < 1e-3
    assert F.cosine_similarity(fused, plain, dim=0) > 0.99
