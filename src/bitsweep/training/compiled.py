"""Compiling the training forward, with a way back to eager mode when compiling is impossible.

``torch.compile`` fuses the many small elementwise steps of fake quantization (scale, round, clamp,
rescale, and their straight-through backward) into a few kernels: a W4A4 MobileNet-v2 x0.5 QAT
step of 128 Fashion-MNIST images took 1.45 s eager and 0.67 s compiled (2.2x) on a 2-core AMD EPYC
(`benchmarks/qat_compile.py`). The price is a one-off compile of one to two minutes, and a C++
compiler on CPU machines. Compilation happens lazily on the first call, so that is where a missing
compiler shows up; nothing has been computed yet at that point, so falling back to the eager
model loses nothing.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from bitsweep.runtime import compile_options


class CompiledOrEager:
    """Calls ``torch.compile(model)``; if the first call fails to compile, warns once and calls ``model``.

    Not an ``nn.Module`` on purpose: it must not add a level to ``state_dict`` keys, and ``train()``
    / ``eval()`` go to the model itself (the compiled graph follows the model's training flag).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._compiled: Any = torch.compile(model, dynamic=False, options=compile_options())
        self._called = False

    def train(self, mode: bool = True) -> CompiledOrEager:
        self.model.train(mode)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            return self.model(*args, **kwargs)
        if self._called:
            return self._compiled(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure; a real model error repeats eagerly below
            warnings.warn(
                f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "training runs in eager mode (same results, slower). Install a C++ compiler (e.g. "
                "'apt-get install g++') to train compiled, or pass --compile off to skip the attempt.",
                stacklevel=2,
            )
            self._compiled = None
            return self.model(*args, **kwargs)
        self._called = True
        return out
