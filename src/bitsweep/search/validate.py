"""Check a searched plan with the integer-exact evaluation, and re-solve when it misses the drop budget.

:func:`bitsweep.search.search` adds single-layer drops measured with everything
else in float; the plan's real drop also holds the 8-bit activations and the
interactions between layers, so it can be larger. :func:`search_validated`
therefore quantizes the chosen plan as ``ptq`` would, measures its validation
top-1 with the integer-exact simulation (the same machinery and ``accuracy`` the
sweep uses), and compares it with the BN-folded FP32 model on the same images.

The tightening rule (drop budgets only; a size budget is exact and is measured,
not retried): when round ``k``'s plan, predicted to lose ``p_k`` summed points,
measures a drop ``m_k`` above the budget ``B``, round ``k + 1`` solves with the
summed-drop budget ``p_k * B / m_k``. It assumes the prediction is off by a
factor (``m ~ p * m_k / p_k``), the usual shape of non-additive damage, and it
always moves: the new budget is strictly below ``p_k``, so the next plan is a
different, more accurate-by-prediction one. A miss by a plan predicted to lose
nothing cannot be tightened (the damage is not in the per-layer sensitivity:
activations or interactions), so the loop stops there, as it does after
``max_rounds`` rounds or when no plan meets the tightened budget; the result then
carries ``met=False`` and a note that says why.

Only validation images make choices. Test images, when given, are evaluated once
on the final plan and reported.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from bitsweep.artifacts.packed import PackedMeta, save_packed
from bitsweep.artifacts.record import ModelRecord
from bitsweep.backend.simulate import CompiledRunner, evaluation_model
from bitsweep.config import to_dict
from bitsweep.errors import BitsweepError
from bitsweep.measure.size import fp32_file_bytes
from bitsweep.quant import QuantConfig, fold_batchnorm, ptq
from bitsweep.quant.inspect import activation_quantizers, weight_layers
from bitsweep.search.activation_memory import activation_numels, allowed_bits
from bitsweep.search.api import SearchResult, check_estimate, search
from bitsweep.search.hessian import HessianConfig, HessianSensitivity, measure_hessian
from bitsweep.search.keyed_cache import load_keyed, save_keyed
from bitsweep.search.layer_bits import LayerBits, activation_key
from bitsweep.search.sensitivity import Sensitivity, Trial, measure_activation_sensitivity, measure_sensitivity
from bitsweep.sweep.evaluate import accuracy

CACHE_FORMAT = "bitsweep-sensitivity"
DROP_TOLERANCE = 1e-9  # a measured drop within this of the budget meets it (top-1 is a ratio of counts)

Split = tuple[torch.Tensor, torch.Tensor]  # normalized images (N, C, H, W), labels (N,)


@dataclass(frozen=True)
class Round:
    """One solve and its integer-exact check.

    Attributes:
        budget: what the solver was given: summed predicted drop (points) or packed bytes.
        predicted_drop: the plan's summed single-layer drops (points; a loss increase with the Hessian estimate).
        predicted_bytes: the plan's exact packed size.
        val_top1: measured validation top-1 of the quantized plan (percent).
        val_drop: FP32 validation top-1 minus ``val_top1`` (points).
        weight_bits: layer -> bits of the plan.
        activation_bits: every site -> its bits in the plan (only when activation bits are searched).
    """

    budget: float
    predicted_drop: float
    predicted_bytes: int
    val_top1: float
    val_drop: float
    weight_bits: Mapping[str, int]
    activation_bits: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "budget": self.budget,
            "predicted_drop": self.predicted_drop,
            "predicted_bytes": self.predicted_bytes,
            "val_top1": self.val_top1,
            "val_drop": self.val_drop,
            "weight_bits": dict(self.weight_bits),
            **({"activation_bits": dict(self.activation_bits)} if self.activation_bits else {}),
        }


@dataclass(frozen=True)
class ValidatedPlan:
    """The final plan, its quantized model, and every number the search measured.

    Attributes:
        plan / config: the per-layer plan and the QuantConfig built from it.
        model: the converted model of the plan (what was measured and packed).
        predicted_bytes: the exact predictor's size of the packed file.
        file_bytes: the packed file's real size on disk (equal to ``predicted_bytes``; a difference is a bug).
        packed_path: where the packed file was kept (None: written to a temporary folder only to be measured).
        fp32_bytes: the FP32 reference file's size (the sweep's ``fp32_bytes``).
        max_bytes / max_drop: the budget the caller gave (one of them).
        fp32_val_top1 / val_top1: validation top-1 of the BN-folded FP32 model and of the plan.
        fp32_test_top1 / test_top1: the same on the test images (None when none were given); reported only.
        rounds: each solve and its check, in order.
        met: the final plan's measured drop is within ``max_drop`` (always True for a size budget).
        simulation: how the accuracy was computed (``integer-exact``, ``integer`` or ``fake-quant: ...``).
        sensitivity: the per-layer measurement (or Hessian estimate) the solver used.
        notes: what the loop did and why, in words.
        activation_bits: every activation site -> its bits in the plan.
        peak_activation_bytes / peak_activation_site: the plan's largest activation tensor for one image
            (:mod:`bitsweep.search.activation_memory`) and where it is.
        max_activation_bytes: the peak activation-memory budget the caller gave (None: none).
    """

    plan: LayerBits
    config: QuantConfig
    model: nn.Module
    predicted_bytes: int
    file_bytes: int
    packed_path: Path | None
    fp32_bytes: int
    max_bytes: int | None
    max_drop: float | None
    fp32_val_top1: float
    val_top1: float
    fp32_test_top1: float | None
    test_top1: float | None
    rounds: tuple[Round, ...]
    met: bool
    simulation: str
    sensitivity: Sensitivity | HessianSensitivity
    notes: tuple[str, ...] = field(default_factory=tuple)
    activation_bits: Mapping[str, int] = field(default_factory=dict)
    peak_activation_bytes: int = 0
    peak_activation_site: str = ""
    max_activation_bytes: int | None = None

    @property
    def val_drop(self) -> float:
        """Measured validation drop of the final plan (points)."""
        return self.fp32_val_top1 - self.val_top1

    @property
    def ratio(self) -> float:
        """How many times smaller the packed file is than the FP32 file."""
        return self.fp32_bytes / self.file_bytes

    def to_dict(self) -> dict[str, Any]:
        """Every number, JSON-ready (the model and the sensitivity trials are stored elsewhere)."""
        return {
            "layer_bits": self.plan.to_dict(),
            "quant_config": to_dict(self.config),
            "predicted_bytes": self.predicted_bytes,
            "file_bytes": self.file_bytes,
            "sizes_equal": self.predicted_bytes == self.file_bytes,
            "packed_file": str(self.packed_path) if self.packed_path is not None else None,
            "fp32_bytes": self.fp32_bytes,
            "ratio": self.ratio,
            "max_bytes": self.max_bytes,
            "max_drop": self.max_drop,
            "fp32_val_top1": self.fp32_val_top1,
            "val_top1": self.val_top1,
            "val_drop": self.val_drop,
            "fp32_test_top1": self.fp32_test_top1,
            "test_top1": self.test_top1,
            "test_drop": None if self.test_top1 is None or self.fp32_test_top1 is None
            else self.fp32_test_top1 - self.test_top1,
            "met": self.met,
            "activation_bits_per_site": dict(self.activation_bits),
            "peak_activation_bytes": self.peak_activation_bytes,
            "peak_activation_site": self.peak_activation_site,
            "max_activation_bytes": self.max_activation_bytes,
            "rounds": [r.to_dict() for r in self.rounds],
            "simulation": self.simulation,
            "sensitivity_images": self.sensitivity.images,
            "sensitivity_estimate": "hessian" if isinstance(self.sensitivity, HessianSensitivity) else "measured",
            **({"hessian": self.sensitivity.to_dict()} if isinstance(self.sensitivity, HessianSensitivity) else {}),
            "notes": list(self.notes),
        }  # fmt: skip


def integer_top1(
    model: nn.Module, split: Split, batch_size: int = 40, runner: CompiledRunner | None = None
) -> tuple[float, str]:
    """Top-1 (percent) of a converted model on ``split`` through the integer-exact simulation, and its kind.

    The sweep's own path (``evaluation_model`` then ``accuracy``), so a searched plan and a grid cell are
    measured the same way.
    """
    images, labels = split
    evaluated, kind = evaluation_model(model, images[:1], runner)
    return accuracy(evaluated, images, labels, batch_size)[0], kind


def float_top1(model: nn.Module, split: Split, batch_size: int = 40) -> float:
    """Top-1 of the float model with BatchNorm folded: the FP32 reference every quantized plan starts from."""
    folded = copy.deepcopy(model).eval()
    fold_batchnorm(folded)
    return accuracy(folded, *split, batch_size)[0]


def batches_of(split: Split, batch_size: int) -> list[Split]:
    """``split`` cut into (images, labels) batches, the form sensitivity measurement reads."""
    images, labels = split
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)]


def load_cached_sensitivity(path: str | Path, key: Mapping[str, Any]) -> Sensitivity | None:
    """The sensitivity cached at ``path`` when it was measured under the same ``key``; else None.

    The key names everything the measurement depends on (checkpoint contents, candidate bits,
    images, observer, granularity); a cache under another key, or one that cannot be read, is
    measured again rather than trusted.
    """
    return load_keyed(path, CACHE_FORMAT, key, "sensitivity", Sensitivity.from_dict)


def save_cached_sensitivity(path: str | Path, key: Mapping[str, Any], sensitivity: Sensitivity) -> Path:
    """Write ``sensitivity`` with its ``key`` (atomically), for :func:`load_cached_sensitivity`."""
    return save_keyed(path, CACHE_FORMAT, key, "sensitivity", sensitivity.to_dict())


def search_validated(
    model: nn.Module,
    calibration: Iterable[Any],
    val: Split,
    test: Split | None = None,
    *,
    record: ModelRecord,
    max_bytes: int | None = None,
    max_ratio: float | None = None,
    max_drop: float | None = None,
    weight_bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    activation_bits: int | Sequence[int] = 8,
    max_activation_bytes: int | None = None,
    base: QuantConfig | None = None,
    extra: Mapping[str, Any] | None = None,
    sensitivity: Sensitivity | HessianSensitivity | None = None,
    sensitivity_cache: tuple[Path, Mapping[str, Any]] | None = None,
    estimate: str = "measured",
    hessian: HessianConfig | None = None,
    calibration_batches: int | None = None,
    method_options: Mapping[str, Any] | None = None,
    max_rounds: int = 3,
    batch_size: int = 40,
    runner: CompiledRunner | None = None,
    packed_path: str | Path | None = None,
    progress: bool = True,
) -> ValidatedPlan:
    """Search a plan under one budget, check it integer-exact, tighten and re-solve on a miss.

    Args:
        model: the float model (not changed).
        calibration: batches for calibration (read once; kept for learned methods).
        val: normalized validation images and labels: sensitivity, the check and every choice use them.
        test: normalized test images and labels, evaluated once on the final plan (never for choices).
        record: the model record the packed file carries.
        max_bytes / max_ratio / max_drop: exactly one budget: packed bytes, times smaller than the FP32
            file (``fp32_bytes / max_ratio`` bytes), or measured validation top-1 points below FP32.
        weight_bits: candidate weight bit widths.
        activation_bits: bits of every activation site, or several candidates to choose from per site
            (measured one site at a time, like the weights).
        max_activation_bytes: peak activation memory: no activation tensor of one image may take more
            bytes; checked before any measurement (:mod:`bitsweep.search.activation_memory`).
        base: observers, granularity, method (default ``QuantConfig()``).
        extra: the packed file's ``extra`` (part of its header, so fixed before the search).
        sensitivity: a measurement to reuse.
        sensitivity_cache: (path, key): reuse the file's measurement when its key matches, else measure
            and write it there at once (before solving, so a failed budget keeps it). With the Hessian
            estimate it holds the traces (:func:`~bitsweep.search.hessian.save_cached_traces`).
        estimate: ``measured`` single-layer drops, or the ``hessian`` estimate (size budgets only: it
            predicts a loss increase, not points; see :mod:`bitsweep.search.hessian`).
        hessian: samples, images and seed of the Hessian estimate (default ``HessianConfig()``).
        calibration_batches: calibrate on at most this many batches.
        method_options: ``ptq`` options of the learned methods.
        max_rounds: solves at most (drop budgets only; 1 = no retry).
        batch_size: evaluation batch size.
        runner: a compiled simulation runner to reuse (``backend.simulate.runner_for``).
        packed_path: keep the final packed file here (written atomically); None = measure it in a temporary folder.
        progress: show progress bars.

    Raises:
        BitsweepError: no budget or several, a non-positive budget, or a size or activation-memory
            budget no plan reaches.
    """
    if sum(b is not None for b in (max_bytes, max_ratio, max_drop)) != 1:
        raise BitsweepError("give exactly one budget: a size (max_bytes or max_ratio) or an accuracy drop (max_drop)")
    if max_rounds < 1:
        raise BitsweepError(f"max_rounds must be at least 1, got {max_rounds}")
    for name, value in (("max_bytes", max_bytes), ("max_ratio", max_ratio)):
        if value is not None and not value > 0:
            raise BitsweepError(f"{name} must be positive, got {value}")
    if max_drop is not None and not (max_drop >= 0 and math.isfinite(max_drop)):
        raise BitsweepError(f"the drop budget must be a finite number of points >= 0, got {max_drop}")
    base = base or QuantConfig()
    bits = tuple(sorted(set(weight_bits)))
    a_bits = tuple(sorted({activation_bits} if isinstance(activation_bits, int) else set(activation_bits)))
    check_estimate(estimate, sensitivity, max_drop is not None, len(a_bits) > 1)
    calib = list(calibration)  # read once: every round quantizes from the same images and statistics
    reference = ptq(copy.deepcopy(model).eval(), LayerBits(8, max(a_bits)).to_quant_config(base), calib,
                    num_batches=calibration_batches)  # fmt: skip
    stats = reference.stats
    numels = activation_numels(reference.model, record)
    allowed_bits(numels, a_bits, max_activation_bytes)  # refuse an impossible peak before any measurement
    fp32_bytes = fp32_file_bytes(reference.model)  # the sweep's FP32 reference size (BN folded, float32)
    if max_ratio is not None:
        max_bytes = math.floor(fp32_bytes / max_ratio)
    common: dict[str, Any] = dict(weight_bits=bits, activation_bits=a_bits, record=record, base=base, extra=extra,
                                  stats=stats, max_activation_bytes=max_activation_bytes,
                                  progress=progress)  # fmt: skip
    if max_bytes is not None:  # refuse an impossible size before minutes of sensitivity measurement
        zero = _zero_sensitivity(reference.model, bits, a_bits)
        search(model, calib, [], max_bytes=max_bytes, sensitivity=zero, **common)
    if sensitivity is None and estimate == "hessian":
        sensitivity = measure_hessian(model, batches_of(val, batch_size), bits, hessian, base=base,
                                      cache=sensitivity_cache, progress=progress)  # fmt: skip
    if sensitivity is None and sensitivity_cache is not None:
        sensitivity = load_cached_sensitivity(*sensitivity_cache)
        if sensitivity is not None and len(a_bits) > 1 and not sensitivity.has_activations(numels, a_bits):
            sensitivity = None  # a record without these activation trials: measure again rather than misread it
    if sensitivity is None:
        sensitivity = measure_sensitivity(model, batches_of(val, batch_size), bits, base=base, progress=progress)
        if len(a_bits) > 1:
            acts = measure_activation_sensitivity(model, batches_of(val, batch_size), calib, a_bits, base=base,
                                                  sites=tuple(numels), calibration_batches=calibration_batches,
                                                  progress=progress)  # fmt: skip
            sensitivity = dataclasses.replace(sensitivity, activation_trials=acts)
        if sensitivity_cache is not None:
            save_cached_sensitivity(sensitivity_cache[0], sensitivity_cache[1], sensitivity)
    fp32_val = float_top1(model, val, batch_size)

    def quantize(config: QuantConfig) -> nn.Module:
        q = ptq(copy.deepcopy(model).eval(), config, calib, stats=stats, options=method_options).model
        out: nn.Module = q.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in the stubs
        return out

    rounds: list[Round] = []
    notes: list[str] = []
    budget: float = max_drop if max_drop is not None else float(max_bytes or 0)
    bar = tqdm(total=max_rounds if max_drop is not None else 1, desc="validate", unit="round", disable=not progress,
               leave=False)  # fmt: skip
    while True:
        try:
            if max_drop is not None:
                result = search(model, calib, [], max_drop=budget, sensitivity=sensitivity, **common)
            else:
                result = search(model, calib, [], max_bytes=max_bytes, sensitivity=sensitivity, **common)
        except BitsweepError as e:
            if not rounds:
                raise
            notes.append(f"no plan meets the tightened summed-drop budget {budget:.4g} ({e}); kept round "
                         f"{len(rounds)}'s plan")  # fmt: skip
            break
        notes.extend(result.notes)
        qmodel = quantize(result.config)
        val_top1, simulation = integer_top1(qmodel, val, batch_size, runner)
        per_site = {s: result.plan.activation_bits_of(s) for s in numels} if len(a_bits) > 1 else {}
        rounds.append(Round(budget, result.predicted_drop, result.predicted_bytes, val_top1, fp32_val - val_top1,
                            dict(result.plan.weights), per_site))  # fmt: skip
        bar.update()
        final: tuple[SearchResult, nn.Module, str] = (result, qmodel, simulation)
        measured = fp32_val - val_top1
        if max_drop is None or measured <= max_drop + DROP_TOLERANCE:
            break
        if len(rounds) >= max_rounds:
            notes.append(f"round {len(rounds)}: measured drop {measured:.2f} is still above {max_drop:g} after "
                         f"{max_rounds} round(s); raise --max-drop or allow more rounds")  # fmt: skip
            break
        if result.predicted_drop <= 0:
            notes.append(f"round {len(rounds)}: a plan predicted to lose nothing measures a drop of {measured:.2f} "
                         f"(above {max_drop:g}): the loss comes from activation quantization or layer interactions, "
                         "which tightening cannot remove")  # fmt: skip
            break
        budget = result.predicted_drop * max_drop / measured
        notes.append(f"round {len(rounds)}: measured drop {measured:.2f} > budget {max_drop:g} (predicted "
                     f"{result.predicted_drop:.2f}); re-solved with summed-drop budget {budget:.4g}")  # fmt: skip
    bar.close()
    result, qmodel, simulation = final
    met = max_drop is None or rounds[-1].val_drop <= max_drop + DROP_TOLERANCE
    meta = PackedMeta(record, result.config, dict(extra or {}))
    if packed_path is not None:
        packed = save_packed(qmodel, packed_path, meta)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            packed = save_packed(qmodel, Path(tmp) / "plan.safetensors", meta)
    if packed.file_bytes != result.predicted_bytes:
        notes.append(f"BUG: the packed file has {packed.file_bytes:,} bytes but {result.predicted_bytes:,} were "
                     "predicted; please report it")  # fmt: skip
    fp32_test = test_top1 = None
    if test is not None and len(test[1]) > 0:
        fp32_test = float_top1(model, test, batch_size)
        test_top1 = integer_top1(qmodel, test, batch_size, runner)[0]
    return ValidatedPlan(
        result.plan, result.config, qmodel, result.predicted_bytes, packed.file_bytes,
        Path(packed_path) if packed_path is not None else None, fp32_bytes, max_bytes, max_drop, fp32_val,
        rounds[-1].val_top1, fp32_test, test_top1, tuple(rounds), met, simulation, sensitivity, tuple(notes),
        {s: result.plan.activation_bits_of(s) for s in numels}, result.peak_activation_bytes,
        result.peak_activation_site, max_activation_bytes,
    )  # fmt: skip


def _zero_sensitivity(converted: nn.Module, bits: Sequence[int], activation_bits: Sequence[int] = ()) -> Sensitivity:
    """A stand-in with every drop 0, so ``search`` can check a byte budget before anything is measured."""
    trials = tuple(Trial(name, b, 0.0, 0.0) for name, _ in weight_layers(converted) for b in bits)
    sites = dict.fromkeys(activation_key(name) for name, _ in activation_quantizers(converted))
    acts = tuple(Trial(site, b, 0.0, 0.0) for site in sites for b in activation_bits)
    return Sensitivity(0.0, 0.0, 0, trials, activation_trials=acts)
