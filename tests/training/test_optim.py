"""Optimizer groups and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from bitsweep.config import TrainConfig
from bitsweep.models import create_model
from bitsweep.training import WarmupCosineLR, build_optimizer, build_schedule, parameter_groups


def test_weight_decay_skips_batchnorm_and_biases() -> None:
    model = create_model("resnet20", num_classes=10, width=0.25)
    decay, no_decay = parameter_groups(model, 5e-4)
    bn_and_bias = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    bn_and_bias |= {id(m.bias) for m in model.modules() if getattr(m, "bias", None) is not None}
    assert {id(p) for p in no_decay["params"]} == bn_and_bias
    conv_linear = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert {id(p) for p in decay["params"]} == conv_linear
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0


def test_optimizer_is_nesterov_sgd() -> None:
    opt = build_optimizer(torch.nn.Linear(3, 2), TrainConfig(lr=0.1, momentum=0.9, nesterov=True))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9 and opt.defaults["lr"] == 0.1


def _lrs(sched: WarmupCosineLR, opt: torch.optim.Optimizer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_warms_up_linearly_then_decays_to_zero() -> None:
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.2)
    sched = build_schedule(opt, TrainConfig(epochs=5, lr=0.2, warmup_epochs=1), steps_per_epoch=4)
    lrs = _lrs(sched, opt, 20)
    assert lrs[:4] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert lrs[4] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[12] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # after the last step


def test_schedule_state_dict_resumes_the_same_curve() -> None:
    def make() -> tuple[torch.optim.Optimizer, WarmupCosineLR]:
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        return opt, WarmupCosineLR(opt, warmup_steps=3, total_steps=12)

    opt, sched = make()
    full = _lrs(sched, opt, 12)
    opt_a, sched_a = make()
    first = _lrs(sched_a, opt_a, 5)
    opt_b, sched_b = make()
    opt_b.load_state_dict(opt_a.state_dict())
    sched_b.load_state_dict(sched_a.state_dict())
    assert first + _lrs(sched_b, opt_b, 7) == full


def test_schedule_rejects_bad_lengths() -> None:
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineLR(opt, warmup_steps=5, total_steps=3)
