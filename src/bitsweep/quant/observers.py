"""Observers: from observed values to (scale, zero_point) for a given spec.

Activation statistics are kept apart from bit widths on purpose. An
:class:`ActivationStats` records what does not depend on the grid - running
min/max, a moving average of per-batch min/max, and a fixed-size random sample
of values - once, on the floating-point (BN-folded) model. :meth:`ActivationStats.qparams`
then derives scale and zero_point for any spec and any observer, so a sweep over
25 (weight, activation) bit widths calibrates once instead of 25 times.

Observers (the ``OBSERVERS`` registry, name -> :class:`Observer`):
    minmax          the full observed range; never clips.
    moving_average  a moving average (factor 0.1) of each batch's min and max, less sensitive to one outlier batch.
    percentile      the 0.01 and 99.99 percentiles of the sample (weights: of each channel).
    mse             the clipping range, searched over 64 candidates, whose fake-quant has the least squared error.

Weights have no calibration: :func:`weight_qparams` computes their qparams
directly (per channel by default, so depthwise filters each get their own scale).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

import torch

from bitsweep.quant.primitives import binary_scale, choose_qparams, fake_quantize_reference
from bitsweep.quant.registry import lookup
from bitsweep.quant.spec import QuantSpec

EMA_FACTOR = 0.1
PERCENTILE = 99.99
MSE_CANDIDATES = 64
SAMPLE_PER_BATCH = 16384
SAMPLE_LIMIT = 1 << 18
# The MSE search fake-quantizes its input once per candidate; an evenly strided
# 32k subset of the sample (still drawn from every calibration batch) picks
# the same clipping range to within a grid step and is 8x cheaper.
MSE_SAMPLE = 1 << 15


class ActivationStats:
    """Bit-width-independent statistics of one activation site.

    Attributes:
        min, max: the observed range over all calibration batches (float tensors, 0-d).
        ema_min, ema_max: moving averages of per-batch min and max.
        sample: up to ``SAMPLE_LIMIT`` values drawn uniformly from each batch (1-d float32).
        batches: number of batches seen.
    """

    def __init__(self, seed: int = 0) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.ema_min: torch.Tensor | None = None
        self.ema_max: torch.Tensor | None = None
        self.sample = torch.empty(0)
        self.batches = 0
        self._generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold one batch of activations into the statistics."""
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        lo, hi = torch.aminmax(flat)
        lo, hi = lo.cpu(), hi.cpu()
        if self.min is None or self.max is None or self.ema_min is None or self.ema_max is None:
            self.min, self.max, self.ema_min, self.ema_max = lo, hi, lo, hi
        else:
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
            self.ema_min = self.ema_min + EMA_FACTOR * (lo - self.ema_min)
            self.ema_max = self.ema_max + EMA_FACTOR * (hi - self.ema_max)
        if self.sample.numel() < SAMPLE_LIMIT:
            k = min(SAMPLE_PER_BATCH, flat.numel(), SAMPLE_LIMIT - self.sample.numel())
            idx = torch.randint(flat.numel(), (k,), generator=self._generator)
            self.sample = torch.cat([self.sample, flat.cpu()[idx]])
        self.batches += 1

    @property
    def negative(self) -> bool:
        """True when the site ever held a negative value (so it needs a signed grid)."""
        return self.min is not None and bool(self.min < 0)

    def effective_spec(self, spec: QuantSpec) -> QuantSpec:
        """``spec`` with ``signed`` turned on where the observed range is negative.

        ReLU outputs stay unsigned (all levels on the useful side); the network
        input and residual sums, which go negative, get a signed grid.
        """
        return dataclasses.replace(spec, signed=spec.signed or self.negative, narrow_range=False)

    def qparams(self, spec: QuantSpec, observer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero_point of this site for ``spec`` (use :meth:`effective_spec` first)."""
        rule = get_observer(observer)
        if self.min is None or self.max is None or self.ema_min is None or self.ema_max is None:
            raise ValueError("activation site was never observed; run calibrate() with at least one batch")
        return rule.activation_qparams(self, spec)


def _mse_qparams(
    rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, per_row: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Search clipping factors in (0, 1] per row of ``rows`` (R, K) for the least squared fake-quant error."""
    best_err = torch.full((rows.shape[0],), float("inf"))
    best_s, best_z = choose_qparams(lo, hi, spec)
    row_spec = dataclasses.replace(spec, granularity="per_channel", channel_axis=0) if per_row else spec
    for i in range(MSE_CANDIDATES):
        alpha = 1.0 - i / MSE_CANDIDATES * 0.95
        s, z = choose_qparams(lo * alpha, hi * alpha, spec)
        err = (fake_quantize_reference(rows, s, z, row_spec) - rows).pow(2).mean(dim=1)  # (R,)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


class Observer:
    """How one observer turns what was seen into qparams; subclasses override the two rules.

    Activations are judged from :class:`ActivationStats` (bit-width free);
    weights from their rows, one row per channel (``(C, K)``, or ``(1, K)`` per tensor).
    """

    name = "minmax"

    def activation_qparams(self, stats: ActivationStats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero_point of an observed activation site (min and max of every batch)."""
        assert stats.min is not None and stats.max is not None
        return choose_qparams(stats.min, stats.max, spec)

    def weight_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The range (lo, hi) of each row of ``rows`` (R, K) to map onto the grid."""
        return rows.amin(dim=1), rows.amax(dim=1)

    def weight_qparams(self, rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero_point per row of ``rows`` (R, K); shape (R,)."""
        lo, hi = self.weight_range(rows)
        return choose_qparams(lo, hi, spec)


class MinMaxObserver(Observer):
    """The full observed range; never clips."""

    name = "minmax"


class MovingAverageObserver(Observer):
    """A moving average (factor ``EMA_FACTOR``) of each batch's min and max; for a fixed weight, its min and max."""

    name = "moving_average"

    def activation_qparams(self, stats: ActivationStats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        assert stats.ema_min is not None and stats.ema_max is not None
        return choose_qparams(stats.ema_min, stats.ema_max, spec)


class PercentileObserver(Observer):
    """The ``100 - PERCENTILE`` and ``PERCENTILE`` percentiles of the sample (weights: of each channel)."""

    name = "percentile"

    def activation_qparams(self, stats: ActivationStats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.quantile(stats.sample, 1 - PERCENTILE / 100)
        hi = torch.quantile(stats.sample, PERCENTILE / 100)
        return choose_qparams(lo, hi, spec)

    def weight_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.quantile(rows, 1 - PERCENTILE / 100, dim=1), torch.quantile(rows, PERCENTILE / 100, dim=1)


class MSEObserver(Observer):
    """The clipping range, searched over ``MSE_CANDIDATES`` shrink factors, with the least squared error."""

    name = "mse"

    def activation_qparams(self, stats: ActivationStats, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        assert stats.min is not None and stats.max is not None
        sample = stats.sample
        if sample.numel() > MSE_SAMPLE:
            sample = sample[:: sample.numel() // MSE_SAMPLE]
        return _mse_qparams(sample.reshape(1, -1), stats.min.reshape(1), stats.max.reshape(1), spec, per_row=False)

    def weight_qparams(self, rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.weight_range(rows)
        return _mse_qparams(rows, lo, hi, spec, per_row=True)


# The registry: observer name -> rule. Read-only, so no caller can change another's observers.
OBSERVERS: Mapping[str, Observer] = MappingProxyType(
    {o.name: o for o in (MinMaxObserver(), MovingAverageObserver(), PercentileObserver(), MSEObserver())}
)


def get_observer(name: str) -> Observer:
    """The observer registered as ``name``; ValueError listing the choices for any other name.

    >>> get_observer("mse").name
    'mse'
    """
    return lookup(OBSERVERS, name, "observer")


def check_observer(name: str) -> str:
    """Return ``name`` if it is a registered observer, else raise ValueError listing the choices."""
    get_observer(name)
    return name


@torch.no_grad()
def weight_qparams(
    weight: torch.Tensor, spec: QuantSpec, observer: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero_point of a weight tensor: shape (C,) per channel along ``spec.channel_axis``, else 0-d.

    Binary weights always use the mean-|w| scale (:func:`binary_scale`);
    ``moving_average`` means the same as ``minmax`` for a fixed tensor.
    """
    rule = get_observer(observer)
    w = weight.detach().float().cpu()
    if spec.binary:
        s = binary_scale(w, spec)
        return s, torch.zeros_like(s, dtype=torch.int32)
    if spec.per_channel:
        rows = w.movedim(spec.channel_axis, 0).reshape(w.shape[spec.channel_axis], -1)  # (C, K)
    else:
        rows = w.reshape(1, -1)  # (1, K)
    s, z = rule.weight_qparams(rows, spec)
    if not spec.per_channel:
        s, z = s.reshape(()), z.reshape(())
    return s, z
