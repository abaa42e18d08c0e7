"""Every registered model: output shapes on each supported input size, options, errors."""

from __future__ import annotations

import pytest
import torch

from bitsweep.errors import BitsweepError
from bitsweep.models import channels_last_hazard, create_model, list_models, to_channels_last
from bitsweep.models.mobilenetv2 import Add
from bitsweep.runtime import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded: small kernels are latency-bound, and OpenMP sync on a shared CPU is slow."""
    with torch_threads(1):
        yield


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_all_architectures() -> None:
    assert {"mobilenetv2", "vgg16", "resnet20"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 32])
def test_forward_shapes(name: str, channels: int, size: int) -> None:
    model = create_model(name, num_classes=7, in_channels=channels, width=0.25).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_train_step_reduces_loss_and_accepts_channels_last(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_channels=1, width=0.25, dropout=0.0)
    model = to_channels_last(model)
    x = torch.randn(12, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.arange(12) % 3
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]  # every model can fit 12 images


@pytest.mark.parametrize("name", list_models())
def test_width_scales_parameters(name: str) -> None:
    small = _params(create_model(name, num_classes=10, width=0.25))
    large = _params(create_model(name, num_classes=10, width=0.5))
    assert small < large


def test_mobilenetv2_parameter_count_is_published() -> None:
    assert _params(create_model("mobilenetv2", num_classes=100, width=1.0)) == 2_351_972
    assert _params(create_model("mobilenetv2", num_classes=10, width=1.0)) == 2_236_682


def test_resnet20_size_and_residual_adds() -> None:
    model = create_model("resnet20", num_classes=10)
    # 269,722 parameters with option A; option B adds two 1x1 projections with BN.
    assert _params(model) == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert sum(isinstance(m, Add) for m in model.modules()) == 9
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # + 1 linear = 20 weighted layers


def test_vgg16_has_thirteen_conv_bn_layers() -> None:
    model = create_model("vgg16", num_classes=10, width=0.25)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 13
    assert [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]


@pytest.mark.parametrize("name", list_models())
def test_dropout_option_is_used(name: str) -> None:
    model = create_model(name, num_classes=10, width=0.25, dropout=0.3)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.3}


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(BitsweepError, match="unknown model 'resnet21'.*did you mean 'resnet20'"):
        create_model("resnet21", num_classes=10)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize(
    ("options", "message"),
    [({"width": 0.0}, "width must be in"), ({"dropout": 1.0}, "dropout must be in"), ({"depth": 3}, "no option")],
)
def test_bad_options_raise_user_errors(name: str, options: dict, message: str) -> None:
    with pytest.raises(BitsweepError, match=message):
        create_model(name, num_classes=10, **options)


def test_to_channels_last_guards_only_the_strided_pointwise_convs_with_few_channels() -> None:
    # ResNet-20 at width 0.25: 4 -> 8 and 8 -> 16 stride-2 shortcuts; only the first has < 8 input channels.
    model = create_model("resnet20", num_classes=3, in_channels=1, width=0.25)
    hazards = [n for n, m in model.named_modules() if channels_last_hazard(m)]
    assert hazards == ["layers.3.shortcut.0"]
    assert not any(channels_last_hazard(m) for m in create_model("resnet20", num_classes=3).modules())
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    to_channels_last(to_channels_last(model))  # twice: hooks are added once
    guarded = model.get_submodule("layers.3.shortcut.0")
    assert len(guarded._forward_pre_hooks) == 1 and len(guarded._forward_hooks) == 1
    assert guarded.weight.stride() == (4, 1, 1, 1)  # NCHW strides, so oneDNN takes its padded NCHW kernel
    assert model.get_submodule("layers.3.conv1.0").weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_guarded_convolution_computes_the_same_and_returns_channels_last() -> None:
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(4, 8, kernel_size=1, stride=2, bias=False)
    guarded = to_channels_last(torch.nn.Conv2d(4, 8, kernel_size=1, stride=2, bias=False))
    guarded.load_state_dict(plain.state_dict())
    x = torch.randn(12, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    out = guarded(x.requires_grad_())
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, plain(x.contiguous()))
    out.sum().backward()
    ref = x.detach().contiguous().requires_grad_()  # the reference in NCHW: channels-last is the crash itself
    plain(ref).sum().backward()
    torch.testing.assert_close(guarded.weight.grad, plain.weight.grad)
    torch.testing.assert_close(x.grad, ref.grad)
