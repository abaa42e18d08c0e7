"""``CompiledOrEager``: the compiled training forward, and the way back to eager mode when compiling fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitsweep.training import compiled as compiled_mod
from bitsweep.training.compiled import CompiledOrEager


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU())


def test_a_compiler_failure_on_the_first_call_warns_once_and_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def broken_compile(model, **kwargs):  # what a machine without a C++ compiler does: fail at the first call
        def fn(*args):
            calls.append(1)
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

        return fn

    monkeypatch.setattr(compiled_mod.torch, "compile", broken_compile)
    model = _model()
    wrapped = CompiledOrEager(model)
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError: InvalidCxxCompiler.*eager mode"):
        out = wrapped(x)
    assert torch.equal(out, model(x))
    assert torch.equal(wrapped(x), model(x))  # no second attempt, no second warning
    assert len(calls) == 1


def test_an_error_after_a_successful_first_call_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"n": 0}

    def flaky_compile(model, **kwargs):
        def fn(*args):
            state["n"] += 1
            if state["n"] > 1:
                raise RuntimeError("a later failure")
            return model(*args)

        return fn

    monkeypatch.setattr(compiled_mod.torch, "compile", flaky_compile)
    wrapped = CompiledOrEager(_model())
    wrapped(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="a later failure"):
        wrapped(torch.randn(2, 4))


def test_train_and_eval_reach_the_model_and_the_state_dict_keeps_its_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled_mod.torch, "compile", lambda model, **kwargs: model)
    model = _model().eval()
    wrapped = CompiledOrEager(model)
    assert wrapped.train() is wrapped and model.training
    wrapped.train(False)
    assert not model.training
    assert not isinstance(wrapped, nn.Module)  # fit saves `model`; the wrapper adds no "_orig_mod." level


@pytest.mark.slow
def test_compiled_forward_and_backward_match_eager_on_a_small_model() -> None:
    model = _model()
    wrapped = CompiledOrEager(model)
    x = torch.randn(8, 4, requires_grad=True)
    out = wrapped(x)
    out.sum().backward()
    g = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    assert torch.allclose(out, model(x), atol=1e-6)
    assert torch.allclose(g, x.grad, atol=1e-6)
