"""Measured per-layer sensitivity: how much loss and accuracy one layer at ``b`` bits costs on its own.

Each trial quantizes the weights of exactly one layer, with the same spec,
observer and rounding ``ptq`` would use for it, and keeps **everything else in
float** (BatchNorm folded as ``ptq`` folds it, activations not quantized). Float
rather than 8 bits around the layer because it isolates the layer's own damage,
needs no calibration, and is fast: BN is folded once into one copy of the model,
and each trial swaps one weight tensor in and back out (no ``ptq``, no deep copy
per trial). The solver then adds these drops up, the usual additivity assumption
of mixed-precision search (HAWQ, Sony MCT); the caller validates the chosen plan.

Activation sites are measured the same way when their bits are searched
(:func:`measure_activation_sensitivity`): one site's quantizers at ``b`` bits,
with ranges from the observer on the calibration images, every other site and
every weight in float. They are stored beside the weight trials, keyed by the
site name (``activation_trials``); a record without them reads as "not measured".

Results are plain data (:meth:`Sensitivity.to_dict`) so a run can cache them as JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from bitsweep.errors import BitsweepError
from bitsweep.io import write_json_atomic
from bitsweep.quant import QuantConfig, WeightQuantizer, fold_batchnorm
from bitsweep.quant.api import calibrate, quantize_
from bitsweep.quant.inspect import activation_quantizers, weight_layers
from bitsweep.search.layer_bits import LayerBits, activation_key
from bitsweep.training.evaluate import evaluate


@dataclass(frozen=True)
class Trial:
    """One layer at one bit width, everything else float."""

    layer: str
    bits: int
    loss: float
    top1: float


@dataclass(frozen=True)
class Sensitivity:
    """The float baseline and every trial, measured on the same ``images`` validation images."""

    baseline_loss: float
    baseline_top1: float
    images: int
    trials: tuple[Trial, ...]
    reference: str = "float"  # what the other layers were during a trial
    activation_trials: tuple[Trial, ...] = ()  # Trial.layer is the activation site name

    def drops(self, metric: str = "top1") -> dict[str, dict[int, float]]:
        """layer -> bits -> accuracy drop in points (``top1``) or loss increase (``loss``); may be negative."""
        return self._drops(self.trials, metric)

    def activation_drops(self, metric: str = "top1") -> dict[str, dict[int, float]]:
        """Activation site -> bits -> drop, as :meth:`drops` (empty when activations were not measured)."""
        return self._drops(self.activation_trials, metric)

    def has_activations(self, sites: Iterable[str], bits: Iterable[int]) -> bool:
        """True when every site was measured at every one of ``bits``."""
        measured = {(t.layer, t.bits) for t in self.activation_trials}
        wanted = tuple(bits)  # read once per site below
        return all((s, b) in measured for s in sites for b in wanted)

    def _drops(self, trials: Iterable[Trial], metric: str) -> dict[str, dict[int, float]]:
        if metric not in ("top1", "loss"):
            raise BitsweepError(f"sensitivity metric must be 'top1' or 'loss', got {metric!r}")
        out: dict[str, dict[int, float]] = {}
        for t in trials:
            value = self.baseline_top1 - t.top1 if metric == "top1" else t.loss - self.baseline_loss
            out.setdefault(t.layer, {})[t.bits] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sensitivity:
        """Inverse of :meth:`to_dict`."""
        try:
            trials = tuple(Trial(**t) for t in data["trials"])
            acts = tuple(Trial(**t) for t in data.get("activation_trials", ()))  # absent in older records
            reference = data.get("reference", "float")
            return cls(data["baseline_loss"], data["baseline_top1"], data["images"], trials, reference, acts)
        except (KeyError, TypeError) as e:
            raise BitsweepError(f"not a sensitivity record ({e}); delete the cache file to measure again") from None

    def save(self, path: str | Path) -> Path:
        """Write as JSON (atomically)."""
        write_json_atomic(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        """Read a cache written by :meth:`save`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise BitsweepError(f"cannot read sensitivity cache {path}: {e}") from None


def quantized_weight(weight: torch.Tensor, name: str, bits: int, base: QuantConfig) -> torch.Tensor:
    """Layer ``name``'s ``weight`` at ``bits`` as ``ptq`` would round it (same spec, observer), dequantized.

    Shared by the measured trials and the Hessian estimate, so both perturb a layer exactly as the plan will.

    Raises:
        BitsweepError: the base config's own overrides keep this layer in float.
    """
    cfg = LayerBits(weights={name: bits}).to_quant_config(base)
    spec = cfg.spec_for(name)
    if spec is None:  # only when the base config's own overrides skip this layer
        raise BitsweepError(f"layer '{name}' is kept in float by the base config; leave it out of layers")
    return WeightQuantizer(spec, cfg.weight_observer).compute(weight)


def measure_sensitivity(
    model: nn.Module,
    validation: Iterable[tuple[torch.Tensor, torch.Tensor]],
    weight_bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    *,
    base: QuantConfig | None = None,
    layers: Sequence[str] | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> Sensitivity:
    """Quantize one weight layer at a time at each of ``weight_bits`` and measure loss and top-1.

    Args:
        model: the float model (not changed: a deep copy is folded and modified).
        validation: (images, labels) batches on the model's device; read once and kept.
        weight_bits: candidate bit widths.
        base: supplies granularity and observer (default ``QuantConfig()``); BN is folded when it says so.
        layers: names of the weight layers to measure (default: every Conv2d/Linear).
        max_batches: use at most this many batches.
        progress: show a tqdm bar over the trials.

    Raises:
        BitsweepError: no validation batch, or a layer name the model does not have.
    """
    base = base or QuantConfig()
    batches = list(itertools.islice(validation, max_batches))
    if not batches:
        raise BitsweepError("the validation set is empty; give at least one batch to measure sensitivity on")
    folded = copy.deepcopy(model).eval()
    if base.fold_bn:
        fold_batchnorm(folded)
    mods = dict(folded.named_modules())
    candidates = [n for n, m in mods.items() if type(m) in (nn.Conv2d, nn.Linear)]
    names = list(layers) if layers is not None else candidates
    unknown = [n for n in names if n not in candidates]
    if unknown:
        raise BitsweepError(f"the model has no Conv2d/Linear layer named '{unknown[0]}'")
    baseline = evaluate(folded, batches, amp=False)
    trials = []
    bar = tqdm(total=len(names) * len(weight_bits), desc="sensitivity", unit="trial", disable=not progress, leave=False)
    with torch.no_grad():
        for name in names:
            layer = mods[name]
            original = layer.weight.detach().clone()
            for bits in weight_bits:
                layer.weight.copy_(quantized_weight(original, name, bits, base))
                r = evaluate(folded, batches, amp=False)
                trials.append(Trial(name, bits, r.loss, r.top1))
                bar.update()
            layer.weight.copy_(original)
    bar.close()
    return Sensitivity(baseline.loss, baseline.top1, baseline.images, tuple(trials))


def measure_activation_sensitivity(
    model: nn.Module,
    validation: Iterable[tuple[torch.Tensor, torch.Tensor]],
    calibration: Iterable[Any],
    activation_bits: Sequence[int] = (4, 8),
    *,
    base: QuantConfig | None = None,
    sites: Sequence[str] | None = None,
    calibration_batches: int | None = None,
    progress: bool = True,
) -> tuple[Trial, ...]:
    """Quantize one activation site at a time at each of ``activation_bits``; weights and other sites in float.

    The model is prepared once as ``ptq`` prepares it (BN folded per ``base``) and calibrated once; the
    statistics do not depend on bits, so a trial only sets one site's quantizers to ``b`` bits with the
    qparams ``convert`` would give them (same observer, signedness from calibration) and switches them
    off again. The post-training method's own steps are left out, as in the weight trials.

    Args:
        model: the float model (not changed: a deep copy is prepared).
        validation: (images, labels) batches on the model's device; read once and kept.
        calibration: batches for the one calibration (tensors or (images, labels)).
        activation_bits: candidate bit widths.
        base: observers, BN folding and the activation spec (default ``QuantConfig()``).
        sites: names of the sites to measure (default: every site, in model order).
        calibration_batches: calibrate on at most this many batches.
        progress: show a tqdm bar over the trials.

    Returns:
        One trial per (site, bits), ``Trial.layer`` being the site name.

    Raises:
        BitsweepError: no validation batch, no calibration batch, or a site name the model does not have.
    """
    base = base or QuantConfig()
    batches = list(validation)
    if not batches:
        raise BitsweepError("the validation set is empty; give at least one batch to measure sensitivity on")
    prepared = copy.deepcopy(model).eval()
    quantize_(prepared, LayerBits(8, 8).to_quant_config(base))  # the bits here are replaced per trial
    stats = calibrate(prepared, calibration, calibration_batches)
    for _, layer in weight_layers(prepared):
        layer.weight_mode = "off"  # float weights (BN folded), as in the weight trials' baseline
    by_site: dict[str, list[str]] = {}
    quantizers = dict(activation_quantizers(prepared))
    for name in quantizers:
        by_site.setdefault(activation_key(name), []).append(name)
    names = list(sites) if sites is not None else list(by_site)
    unknown = [n for n in names if n not in by_site]
    if unknown:
        raise BitsweepError(f"the model has no activation site named '{unknown[0]}'")
    trials = []
    bar = tqdm(total=len(names) * len(activation_bits), desc="activation sensitivity", unit="trial",
               disable=not progress, leave=False)  # fmt: skip
    for site in names:
        for bits in activation_bits:
            for name in by_site[site]:
                q = quantizers[name]
                spec = stats[name].effective_spec(dataclasses.replace(q.requested_spec, bits=bits))
                q.set_qparams(spec, *stats[name].qparams(spec, q.observer))
            r = evaluate(prepared, batches, amp=False)
            trials.append(Trial(site, bits, r.loss, r.top1))
            for name in by_site[site]:
                quantizers[name].mode = "off"
            bar.update()
    bar.close()
    return tuple(trials)
