"""``QuantOutput``: a wrapped module (activation, pooling, residual add) whose output an integer deployment holds.

Kept apart from :mod:`bitsweep.quant.modules` (the quantizers and quantized weight layers): it only
composes an :class:`~bitsweep.quant.modules.ActivationQuantizer` with any module, and decides when a
clamp-like activation is redundant under its quantizer's clamp (:meth:`QuantOutput.try_fuse`).
"""

from __future__ import annotations

import torch
from torch import nn

from bitsweep.quant.graph import clamp_bounds  # the one clamp detector (by behaviour)
from bitsweep.quant.modules import ActivationQuantizer
from bitsweep.quant.primitives import fake_quantize_fast


class QuantOutput(nn.Module):
    """Wraps a module whose output (and optionally inputs) an integer deployment holds."""

    def __init__(
        self,
        module: nn.Module,
        output_quantizer: ActivationQuantizer | None,
        input_quantizers: list[ActivationQuantizer | None] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.output_quantizer = output_quantizer
        self.input_quantizers = (
            nn.ModuleList([q if q is not None else nn.Identity() for q in input_quantizers])
            if input_quantizers
            else None
        )
        self.fused = False  # set by try_fuse(): skip a clamp-like activation the quantizer's clamp subsumes

    @torch.no_grad()
    def try_fuse(self) -> bool:
        """Skip the wrapped activation at inference when that is exact, and say whether it is.

        A clamp-like activation (``f(x) == clamp(x, a, b)``: ReLU, ReLU6, Hardtanh;
        found by probing, not by class) is redundant when every value it clips
        already lands on the quantizer's lowest/highest level:
        ``round(a / scale) <= qmin - zp`` and ``round(b / scale) >= qmax - zp``.
        Then ``fake_quant(f(x)) == fake_quant(x)`` bit for bit, and one
        elementwise pass per activation is saved.
        """
        q = self.output_quantizer
        self.fused = False
        if q is None or self.input_quantizers is not None or q.mode != "quantize" or q.site != "activation":
            return False
        bounds = clamp_bounds(self.module)
        if bounds is not None:
            inv, _, lo, hi = q._fast
            a, b = (torch.round(torch.tensor(v, dtype=torch.float32) * inv).item() for v in bounds)
            self.fused = a <= lo and b >= hi
        return self.fused

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        q = self.output_quantizer
        if (
            self.fused
            and q is not None
            and q.mode == "quantize"
            and len(args) == 1
            and not (args[0].requires_grad and torch.is_grad_enabled())
            and args[0].dtype == torch.float32
        ):
            return fake_quantize_fast(args[0], *q._fast)  # never in place: the input may have other readers
        if self.input_quantizers is not None:
            qs = list(self.input_quantizers)
            args = tuple(qs[i](a) if i < len(qs) else a for i, a in enumerate(args))
        out: torch.Tensor = self.module(*args)
        return self.output_quantizer(out) if self.output_quantizer is not None else out

    def to_float(self) -> nn.Module:
        """The wrapped float module."""
        return self.module


__all__ = ["QuantOutput"]
