"""Hessian sensitivity (HAWQ-V2): each layer's loss curvature times its quantization noise, no trial per bit width.

The measured sensitivity (:mod:`bitsweep.search.sensitivity`) evaluates the validation images once per
(layer, bits). This estimate needs one Hessian trace per layer, whatever the candidate bits: with the
loss ``L`` (mean cross-entropy on the validation images) and a layer's weight ``W`` (``n`` numbers),
HAWQ-V2's sensitivity of ``W`` at ``b`` bits is

    Omega(W, b) = tr(H_W) / n * ||Q_b(W) - W||^2

where ``H_W`` is the Hessian block of ``W``. ``0.5 * Omega`` is the second-order Taylor estimate of the
loss increase when the rounding noise spreads evenly over the curvature (the gradient vanishes at a
trained minimum), so :meth:`HessianSensitivity.drops` gives it in the same units as the measured
``drops("loss")``. ``Q_b`` is the rounding ``ptq`` applies (:func:`~bitsweep.search.sensitivity.quantized_weight`).

The traces come from Hutchinson's estimator, ``tr(H) = E[v^T H v]`` over Rademacher vectors ``v``, with
Hessian-vector products by double backward: one ``v`` covers every layer at once (the block terms
``v_l^T (H v)_l`` are unbiased for each block, the cross terms average out). The model is the float one
with BatchNorm folded, as the measured trials and ``ptq`` see it, so layer names are the plan's. Each
sample's ``v`` is drawn from its own seeded generator, so a rerun gives the same traces and no sample's
vector has to be stored across batches.

The estimate predicts a loss increase, not validation points, so the search uses it only to rank plans
under a size budget (see docs/search.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from scipy.stats import spearmanr  # type: ignore[import-untyped]  # no stubs installed
from torch import nn
from tqdm import tqdm

from bitsweep.errors import BitsweepError
from bitsweep.quant import QuantConfig, fold_batchnorm
from bitsweep.search.keyed_cache import load_keyed, save_keyed
from bitsweep.search.sensitivity import quantized_weight

CACHE_FORMAT = "bitsweep-hessian-traces"


@dataclass(frozen=True)
class HessianConfig:
    """How the traces are estimated.

    Attributes:
        samples: Rademacher vectors per trace (the standard error falls as ``1 / sqrt(samples)``).
        images: the first this many validation images make the loss.
        seed: seeds every sample's vector, so the estimate is reproducible.
    """

    samples: int = 32
    images: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.samples, int) and self.samples >= 2):
            raise BitsweepError(f"Hessian samples must be an integer >= 2 (a standard error needs two), got "
                                f"{self.samples!r}")  # fmt: skip
        if not (isinstance(self.images, int) and self.images >= 1):
            raise BitsweepError(f"Hessian images must be a positive integer, got {self.images!r}")


@dataclass(frozen=True)
class LayerTrace:
    """One layer's Hutchinson estimate of ``tr(H)`` of its weight block, with its standard error."""

    layer: str
    trace: float
    stderr: float
    numel: int

    @property
    def mean_trace(self) -> float:
        """``tr(H) / n``: the average curvature per weight, HAWQ-V2's normalization across layer sizes."""
        return self.trace / self.numel


@dataclass(frozen=True)
class HessianTraces:
    """Every layer's trace, and what they were estimated on (``loss``: mean cross-entropy of the float model)."""

    traces: tuple[LayerTrace, ...]
    samples: int
    images: int
    seed: int
    loss: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HessianTraces:
        """Inverse of :meth:`to_dict`."""
        try:
            traces = tuple(LayerTrace(**t) for t in data["traces"])
            return cls(traces, int(data["samples"]), int(data["images"]), int(data["seed"]), float(data["loss"]))
        except (KeyError, TypeError, ValueError) as e:
            raise BitsweepError(f"not a Hessian trace record ({e}); delete the cache file to estimate again") from None


@dataclass(frozen=True)
class Estimate:
    """One layer at one bit width: ``perturbation = ||Q_b(W) - W||^2`` and ``omega = tr(H)/n * perturbation``."""

    layer: str
    bits: int
    perturbation: float
    omega: float


@dataclass(frozen=True)
class HessianSensitivity:
    """The traces and every (layer, bits) estimate made from them."""

    traces: HessianTraces
    estimates: tuple[Estimate, ...]

    @property
    def images(self) -> int:
        """Validation images the traces were estimated on."""
        return self.traces.images

    def drops(self, metric: str = "loss") -> dict[str, dict[int, float]]:
        """layer -> bits -> estimated loss increase ``0.5 * omega`` (negative where a trace came out negative).

        Raises:
            BitsweepError: ``metric`` is not ``loss`` (the estimate says nothing about top-1 points).
        """
        if metric != "loss":
            raise BitsweepError(f"the Hessian sensitivity estimates a loss increase, not '{metric}'; use metric "
                                "'loss' or the measured sensitivity")  # fmt: skip
        out: dict[str, dict[int, float]] = {}
        for e in self.estimates:
            out.setdefault(e.layer, {})[e.bits] = 0.5 * e.omega
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HessianSensitivity:
        """Inverse of :meth:`to_dict`."""
        try:
            estimates = tuple(Estimate(**e) for e in data["estimates"])
            return cls(HessianTraces.from_dict(data["traces"]), estimates)
        except (KeyError, TypeError) as e:
            raise BitsweepError(f"not a Hessian sensitivity record ({e})") from None


def _folded(model: nn.Module, base: QuantConfig) -> nn.Module:
    """A float copy in eval mode with BatchNorm folded as ``ptq`` folds it (when ``base`` says so)."""
    folded = copy.deepcopy(model).eval()
    if base.fold_bn:
        fold_batchnorm(folded)
    return folded


def _weight_layers(folded: nn.Module, layers: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """Name -> weight of the Conv2d/Linear ``layers`` (default all), refusing names the model does not have."""
    candidates = {n: m for n, m in folded.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    names = list(layers) if layers is not None else list(candidates)
    unknown = [n for n in names if n not in candidates]
    if unknown:
        raise BitsweepError(f"the model has no Conv2d/Linear layer named '{unknown[0]}'")
    return {n: cast(torch.Tensor, candidates[n].weight) for n in names}


def _first_images(
    validation: Iterable[tuple[torch.Tensor, torch.Tensor]], images: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``images`` (image, label) pairs of ``validation``, in its batches (the last one cut)."""
    out, seen = [], 0
    for x, y in validation:
        take = min(len(y), images - seen)
        out.append((x[:take], y[:take]))
        seen += take
        if seen >= images:
            break
    return out


def _rademacher(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Entries +1 or -1 with equal odds, drawn on the CPU (so seeds mean the same on every device)."""
    v = torch.randint(0, 2, shape, generator=generator, dtype=torch.float32).mul_(2).sub_(1)
    return v.to(like.device, like.dtype)


def hessian_traces(
    model: nn.Module,
    validation: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: HessianConfig | None = None,
    *,
    base: QuantConfig | None = None,
    layers: Sequence[str] | None = None,
    progress: bool = True,
) -> HessianTraces:
    """Hutchinson estimates of every weight layer's Hessian trace of the mean cross-entropy.

    Per batch, the gradient is built once with its graph kept, and each sample's Hessian-vector product
    is one more backward through it; a sample's estimate is the image-weighted sum over batches, so it
    is ``v^T H v`` of the loss on all the images together.

    Args:
        model: the float model (not changed: a deep copy is folded).
        validation: (images, labels) batches on the model's device.
        config: samples, images and seed (default ``HessianConfig()``).
        base: BN folding as ``ptq`` (default ``QuantConfig()``).
        layers: names of the weight layers (default every Conv2d/Linear).
        progress: show a tqdm bar over batches x samples.

    Raises:
        BitsweepError: no validation image, or a layer name the model does not have.
    """
    config = config or HessianConfig()
    base = base or QuantConfig()
    batches = _first_images(validation, config.images)
    total = sum(len(y) for _, y in batches)
    if total == 0:
        raise BitsweepError("the validation set is empty; give at least one batch to estimate Hessian traces on")
    folded = _folded(model, base)
    folded.requires_grad_(False)
    named = _weight_layers(folded, layers)
    weights = list(named.values())
    for w in weights:
        w.requires_grad_(True)
    seeds = torch.randint(0, 2**62, (config.samples,), generator=torch.Generator().manual_seed(config.seed)).tolist()
    estimates = torch.zeros(config.samples, len(weights), dtype=torch.float64)  # (sample, layer): v^T H v
    loss_sum = 0.0
    bar = tqdm(total=len(batches) * config.samples, desc="hessian trace", unit="hvp", disable=not progress,
               leave=False)  # fmt: skip
    for x, y in batches:
        loss = nn.functional.cross_entropy(folded(x).float(), y)
        loss_sum += float(loss.detach()) * len(y)
        grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        # a gradient with no graph is constant in the weights: its Hessian rows are zero
        curved = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        for s, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(seed)
            vs = [_rademacher(w.shape, generator, w) for w in weights]  # the same v_s for every batch
            if curved:
                hvs = torch.autograd.grad([grads[i] for i in curved], weights, [vs[i] for i in curved],
                                          retain_graph=True, allow_unused=True)  # fmt: skip
                quad = [(v * hv).sum() if hv is not None else v.new_zeros(()) for v, hv in zip(vs, hvs, strict=True)]
                estimates[s] += torch.stack(quad).double().cpu() * (len(y) / total)
            bar.update()
        del grads  # frees this batch's graph
    bar.close()
    mean = estimates.mean(0)
    stderr = estimates.std(0) / math.sqrt(config.samples)
    traces = tuple(
        LayerTrace(name, float(mean[i]), float(stderr[i]), weights[i].numel()) for i, name in enumerate(named)
    )
    return HessianTraces(traces, config.samples, total, config.seed, loss_sum / total)


def hessian_sensitivity(
    model: nn.Module, traces: HessianTraces, weight_bits: Sequence[int], *, base: QuantConfig | None = None
) -> HessianSensitivity:
    """HAWQ-V2's ``omega`` for every traced layer at every bit width (no evaluation: one rounding each).

    Args:
        model: the float model the traces were estimated on (not changed: a deep copy is folded).
        traces: from :func:`hessian_traces`.
        weight_bits: candidate bit widths.
        base: spec, observer and BN folding, as ``ptq`` would use them (default ``QuantConfig()``).
    """
    base = base or QuantConfig()
    folded = _folded(model, base)
    named = _weight_layers(folded, [t.layer for t in traces.traces])
    estimates = []
    with torch.no_grad():
        for t in traces.traces:
            weight = named[t.layer].detach()
            for bits in weight_bits:
                noise = float((quantized_weight(weight, t.layer, bits, base) - weight).double().square().sum())
                estimates.append(Estimate(t.layer, bits, noise, t.mean_trace * noise))
    return HessianSensitivity(traces, tuple(estimates))


def measure_hessian(
    model: nn.Module,
    validation: Iterable[tuple[torch.Tensor, torch.Tensor]],
    weight_bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    config: HessianConfig | None = None,
    *,
    base: QuantConfig | None = None,
    layers: Sequence[str] | None = None,
    cache: tuple[Path, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> HessianSensitivity:
    """:func:`hessian_traces` then :func:`hessian_sensitivity`; ``cache`` = (path, key) reuses or keeps the traces.

    Only the traces are cached: they do not depend on the candidate bits or the rounding, and the
    estimates from them take one rounding per (layer, bits).
    """
    config = config or HessianConfig()
    traces = load_cached_traces(*cache) if cache is not None else None
    if traces is not None and layers is not None and [t.layer for t in traces.traces] != list(layers):
        traces = None
    if traces is None:
        traces = hessian_traces(model, validation, config, base=base, layers=layers, progress=progress)
        if cache is not None:
            save_cached_traces(cache[0], cache[1], traces)
    return hessian_sensitivity(model, traces, weight_bits, base=base)


def load_cached_traces(
    path: str | Path, key: Mapping[str, Any], match: Collection[str] | None = None
) -> HessianTraces | None:
    """The traces cached at ``path`` under the same ``key``; None when absent, unreadable or keyed otherwise.

    ``match`` compares only those fields of the key (e.g. the model and data but not the sample count,
    to report whatever traces a folder holds beside another estimate).
    """
    return load_keyed(path, CACHE_FORMAT, key, "traces", HessianTraces.from_dict, match)


def save_cached_traces(path: str | Path, key: Mapping[str, Any], traces: HessianTraces) -> Path:
    """Write ``traces`` with their ``key`` (atomically), for :func:`load_cached_traces`."""
    return save_keyed(path, CACHE_FORMAT, key, "traces", traces.to_dict())


def rank_agreement(
    a: Mapping[str, Mapping[int, float]], b: Mapping[str, Mapping[int, float]]
) -> dict[str, float | None]:
    """Spearman rank correlation of two layer -> bits -> drop tables over the (layer, bits) pairs both have.

    ``all`` pools every pair (inflated: both rank fewer bits worse); ``"<b> bits"`` ranks the layers at one
    bit width, the comparison that decides which layers keep bits. None where either side is constant.
    """
    pairs = [(layer, bits) for layer in a if layer in b for bits in a[layer] if bits in b[layer]]

    def rho(keys: list[tuple[str, int]]) -> float | None:
        if len(keys) < 2:
            return None
        with warnings.catch_warnings():  # a constant side warns and gives nan, reported as None
            warnings.simplefilter("ignore")
            r = float(spearmanr([a[k[0]][k[1]] for k in keys], [b[k[0]][k[1]] for k in keys]).statistic)
        return None if math.isnan(r) else r

    out = {"all": rho(pairs)}
    for bits in sorted({k[1] for k in pairs}):
        out[f"{bits} bits"] = rho([k for k in pairs if k[1] == bits])
    return out
