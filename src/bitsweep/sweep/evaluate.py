"""The real cell function: a trained checkpoint, quantized per cell, evaluated and measured.

:class:`CheckpointEvaluator` is the picklable factory the runner hands to each
worker. Calling it loads, once per worker, everything that does not depend on
the bit width:

* the FP32 model, with BatchNorm folded (what every quantized cell starts from);
* the validation and test images, normalized once into float tensors
  (channels-last), so no cell converts data again;
* the calibration statistics, collected once on the float model; they hold
  ranges and samples, not bit widths, so every cell derives its own scales
  from them (``bitsweep.quant.ptq(model, config, stats=stats)``);
* the FP32 reference file size.

Each cell then costs: one module swap, one weight quantization, one lowering
to the integer program, one packed file write, and two evaluation passes of
the integer-exact simulation (``bitsweep.backend.simulate``; compiled once
per worker and reused by every cell when there are many images).

Collapsed cells stop early (``EvalSettings.stop_collapsed``). In a 5 x 5 grid most cells below 4 bits
sit at chance (16 of 25 for MobileNet-v2 on Fashion-MNIST), and measuring 10.0 % to a hundredth of a
point on 15,000 images was about half of the sweep's cell time. Every 1,000 validation images, a cell whose
validation top-1 is below half the FP32 model's (on the same first images) with 99.9 % confidence
(Wilson upper bound) stops: no accuracy budget could choose it. Its test top-1 is then measured on as
many test images, and its row says how many (``images_val``, ``images_test``, ``stopped_early``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsweep.artifacts import load
from bitsweep.artifacts.packed import PackedMeta, save_packed
from bitsweep.backend.simulate import evaluation_model, runner_for
from bitsweep.data import load_dataset
from bitsweep.errors import BitsweepError
from bitsweep.measure.activations import activation_memory
from bitsweep.measure.size import fp32_file_bytes, size_report
from bitsweep.quant import LayerOverride, QuantConfig, fold_batchnorm, ptq
from bitsweep.sweep.grid import Cell
from bitsweep.training import load_model


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes: identifies a checkpoint in the results header whatever its path."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class EvalSettings:
    """What the evaluation of every cell shares; part of the results file's identity.

    Attributes:
        calib_batches: calibration batches of training images (collected once per sweep).
        calib_batch_size: images per calibration batch.
        eval_batch_size: images per evaluation forward pass. Small batches keep a small network's
            activations in the CPU caches: for MobileNet-v2 on 28x28 images, tens of images ran twice
            as fast as 1,000 on a 2-core Xeon. 40 rather than 32: the compiled int8 simulation ran
            at ~1,100 images/s with batches of 20, 24 or 40 but ~600 with 32 (power-of-two strides
            collide in the caches); 40 also divides 5,000 and 10,000.
        limit: evaluate only the first ``limit`` validation and test images (quick checks); None = all.
        method_images: calibration images the learned PTQ methods (bias correction, AdaRound, BRECQ,
            QDrop) fit on: the first of the calibration batches.
        method_iterations: optimisation steps per reconstruction unit (None: the method's default).
        stop_collapsed: stop measuring a cell whose validation top-1 is, with 99.9 % confidence, below
            half the FP32 model's (checked every :data:`SCREEN_IMAGES` images; see the module docstring).
            False measures every cell on every image.
        compile: ``"on"``, ``"off"`` or ``"auto"``: run the integer-exact simulation through
            ``torch.compile``, once per worker for all cells (about 20 s on 2 CPU cores, then each
            cell ~1.4x faster than fake-quant in eager mode); ``auto`` compiles when a cell evaluates
            at least 5,000 images. Results are identical either way, so it is not part of the
            results' identity.
    """

    calib_batches: int = 8
    calib_batch_size: int = 256
    eval_batch_size: int = 40
    limit: int | None = None
    compile: str = "auto"
    method_images: int = 1024
    method_iterations: int | None = None
    stop_collapsed: bool = True

    def __post_init__(self) -> None:
        for name in ("calib_batches", "calib_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive whole number, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of images, got {self.limit}")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {self.compile!r}")


def quant_config_for(cell: Cell) -> QuantConfig:
    """The :class:`bitsweep.quant.QuantConfig` of a quantized cell.

    Raises:
        BitsweepError: for an observer, method or combination ``bitsweep.quant`` does not accept.
    """
    try:
        config = QuantConfig.from_bits(
            cell.weight_bits, cell.activation_bits, cell.granularity, cell.observer, method=cell.method
        )
        if not cell.symmetric and config.weight is not None:
            config = dataclasses.replace(
                config, weight=dataclasses.replace(config.weight, symmetric=False, narrow_range=False)
            )
        if cell.per_layer:  # what LayerBits.to_quant_config builds: one exact-name override per listed name
            weights, activations = cell.per_layer_bits()
            overrides = tuple(
                LayerOverride(_exact(n), weight_bits=weights.get(n), activation_bits=activations.get(n))
                for n in dict.fromkeys([*weights, *activations])
            )
            config = dataclasses.replace(config, overrides=(*overrides, *config.overrides))
            if cell.plan_scale_dtype is not None:
                config = dataclasses.replace(config, scale_dtype=cell.plan_scale_dtype)
    except ValueError as e:
        raise BitsweepError(f"cell {cell.label}: {e}") from None
    return config


def _exact(name: str) -> str:
    """An fnmatch pattern matching ``name`` only (``search.layer_bits.exact_pattern``; the search sits above)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def check_plan_names(cell: Cell, model: nn.Module) -> None:
    """Refuse a per-layer cell naming modules ``model`` (quantized as the cell says) does not have.

    ``bitsweep sweep --layer-bits`` checks names before any work; this catches plans handed to the
    Python API unchecked, whose unknown names would otherwise silently keep the default bits.
    """
    weights, activations = cell.per_layer_bits()
    known = {n for n, _ in model.named_modules()}
    unknown = [n for n in dict.fromkeys([*weights, *activations]) if n not in known]
    if unknown:
        raise BitsweepError(
            f"cell {cell.label}: the model has no layer named '{unknown[0]}' ({len(unknown)} unknown name(s) in "
            f"{cell.layer_bits}); check the plan with LayerBits.check_names(layer_names(model))"
        )


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalized float32 (N, C, H, W), channels-last, on ``device``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (images.float().div_(255.0) - m) / s
    return x.to(device).contiguous(memory_format=torch.channels_last)


SCREEN_IMAGES = 1000  # a collapsed cell is recognised after this many validation images (and each such step)
SCREEN_Z = 3.2905  # two-sided 99.9 % normal quantile: a working cell is stopped by mistake about once in 2,000 looks


def wilson_upper(correct: int, n: int, z: float = SCREEN_Z) -> float:
    """Upper end (percent) of the Wilson score interval of ``correct`` hits in ``n`` trials.

    >>> round(wilson_upper(100, 1000), 1)  # 10 % measured on 1,000 images: at most 13.6 %
    13.6
    """
    p, z2 = correct / n, z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return 100.0 * (centre + spread) / (1 + z2 / n)


@torch.inference_mode()
def screened_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, floor: float | None
) -> tuple[float, float, int]:
    """Top-1, top-5 (percent) and images measured: stops once top-1 is below ``floor`` with 99.9 % confidence.

    The check runs each time another :data:`SCREEN_IMAGES` images are done; ``floor`` None measures every image.
    """
    if x.shape[0] == 0:
        return math.nan, math.nan, 0
    k = 5
    c1 = c5 = n = 0
    next_look = SCREEN_IMAGES
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size]).float()  # (B, classes)
        labels = y[i : i + batch_size]
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (B, k)
        hit = top == labels.unsqueeze(1)
        c1 += int(hit[:, 0].sum())
        c5 += int(hit.any(dim=1).sum())
        n += labels.shape[0]
        if floor is not None and n >= next_look and n < x.shape[0]:
            if wilson_upper(c1, n) < floor:
                break
            next_look += SCREEN_IMAGES
    return 100.0 * c1 / n, 100.0 * c5 / n, n


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of ``model`` on pre-normalized ``x`` (N, C, H, W) and labels ``y`` (N,)."""
    top1, top5, _ = screened_accuracy(model, x, y, batch_size, None)
    return top1, top5


@dataclass(frozen=True)
class CheckpointEvaluator:
    """Picklable factory of the cell function for one checkpoint (see the module docstring).

    Attributes:
        checkpoint: a bitsweep checkpoint file.
        settings: calibration and evaluation settings shared by all cells.
        device: torch device name for this worker.
        data_dir: where the dataset files are; None = the data package's default search paths.
        packed_dir: keep each cell's packed model file here (``<cell_id>.safetensors``); None = discard.
    """

    checkpoint: str
    settings: EvalSettings = EvalSettings()
    device: str = "cpu"
    data_dir: str | None = None
    packed_dir: str | None = None

    def __call__(self) -> _Evaluator:
        return _Evaluator(self)


class _Evaluator:
    """The cell function with everything shared already loaded."""

    def __init__(self, spec: CheckpointEvaluator) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        model, info = load_model(spec.checkpoint, self.device)
        self.info = info
        data_config = info.data if spec.data_dir is None else dataclasses.replace(info.data, data_dir=spec.data_dir)
        data_config = dataclasses.replace(data_config, download=False)
        splits = load_dataset(data_config, seed=info.seed)
        s = spec.settings
        val, test = splits.val, splits.test
        if s.limit is not None:
            val, test = val.subset(slice(0, s.limit)), test.subset(slice(0, s.limit))
        self.val = (normalize(val.images, info.mean, info.std, self.device), val.labels.to(self.device))
        self.test = (normalize(test.images, info.mean, info.std, self.device), test.labels.to(self.device))
        calib = normalize(splits.train.images[: s.calib_batches * s.calib_batch_size], info.mean, info.std, self.device)
        if calib.shape[0] == 0:
            raise BitsweepError("the training split is empty, so there is nothing to calibrate on")
        # The FP32 reference: BN folded (the same float network every quantized cell starts from).
        self.float_model = copy.deepcopy(model).eval()
        fold_batchnorm(self.float_model)
        self.float_model = self.float_model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # Calibration once: the statistics are bit-width free and are reused by every cell.
        observed = copy.deepcopy(model).eval()
        batches = [calib[i : i + s.calib_batch_size] for i in range(0, calib.shape[0], s.calib_batch_size)]
        self.stats = ptq(observed, QuantConfig.from_bits(8, 8), batches).stats
        self.calibration = batches  # learned methods fit on these images; rtn only needs the statistics
        self.model = model
        self.fp32_bytes = fp32_file_bytes(observed)
        self.input_shape = (info.in_channels, *info.image_size)
        images = self.val[1].shape[0] + self.test[1].shape[0]
        self.runner = runner_for(s.compile, images, s.eval_batch_size)
        self._floor: float | None = None  # half the FP32 model's top-1 on the first validation images

    def _collapse_floor(self) -> float | None:
        """Half the FP32 model's validation top-1 on the first :data:`SCREEN_IMAGES` images (once per worker)."""
        if not self.spec.settings.stop_collapsed or self.val[1].shape[0] <= SCREEN_IMAGES:
            return None
        if self._floor is None:
            first = (self.val[0][:SCREEN_IMAGES], self.val[1][:SCREEN_IMAGES])
            self._floor = accuracy(self.float_model, *first, self.spec.settings.eval_batch_size)[0] / 2
        return self._floor

    def _evaluate(self, model: nn.Module, floor: float | None = None) -> dict[str, Any]:
        bs = self.spec.settings.eval_batch_size
        v1, v5, n = screened_accuracy(model, *self.val, bs, floor)
        stopped = n < self.val[1].shape[0]
        test = (self.test[0][:n], self.test[1][:n]) if stopped else self.test
        t1, t5 = accuracy(model, *test, bs)
        return {
            "val_top1": v1,
            "val_top5": v5,
            "test_top1": t1,
            "test_top5": t5,
            "images_val": n,
            "images_test": int(test[1].shape[0]),
            "stopped_early": stopped,
        }

    def _method_options(self) -> dict[str, Any]:
        s = self.spec.settings
        options: dict[str, Any] = {"images": s.method_images, "progress": False}
        if s.method_iterations is not None:
            options["iterations"] = s.method_iterations
        return options

    def __call__(self, cell: Cell) -> dict[str, Any]:
        if cell.is_baseline:
            metrics = self._evaluate(self.float_model)
            act = activation_memory(self.float_model, self.input_shape)
            return {
                **metrics,
                "size_bytes": self.fp32_bytes,
                "fp32_bytes": self.fp32_bytes,
                "model_ratio": 1.0,
                "weight_ratio": 1.0,
                "act_total_ratio": 1.0,
                "act_peak_ratio": 1.0,
                "act_total_bytes": act.total_fp32_bytes,
                "act_peak_bytes": act.peak_fp32_bytes,
                "final_mb": self.fp32_bytes / 1e6,
            }
        return self._quantized(cell)

    def _quantized(self, cell: Cell) -> dict[str, Any]:
        if cell.checkpoint:  # measured as it is (QAT, a searched plan, ...): no quantization here
            loaded = load(cell.checkpoint, self.device, expect="quantized")
            assert loaded.quant_config is not None
            model, config = loaded.model, loaded.quant_config
        else:
            config = quant_config_for(cell)
            model = copy.deepcopy(self.model).eval()
            try:
                model = ptq(model, config, self.calibration, stats=self.stats, options=self._method_options()).model
            except ValueError as e:
                raise BitsweepError(f"cell {cell.label}: {e}") from None
            if cell.per_layer:
                check_plan_names(cell, model)
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from the stubs
        # Accuracy from the integer-exact simulation: what an integer deployment of this cell computes.
        evaluated, simulation = evaluation_model(model, self.val[0][:1], self.runner)
        metrics = self._evaluate(evaluated, self._collapse_floor())
        meta = PackedMeta(self.info.record, config, extra={"cell": cell.to_dict(), **metrics})
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(self.spec.packed_dir or tmp) / f"{cell.cell_id}.safetensors"
            packed = save_packed(model, target, meta)
        sizes = size_report(model)
        act = activation_memory(model, self.input_shape)
        row = {
            **metrics,
            "size_bytes": packed.file_bytes,
            "fp32_bytes": self.fp32_bytes,
            "model_ratio": self.fp32_bytes / packed.file_bytes,
            "weight_ratio": sizes.weight_ratio,
            "act_total_ratio": act.total_ratio,
            "act_peak_ratio": act.peak_ratio,
            "act_total_bytes": act.total_quant_bytes,
            "act_peak_bytes": act.peak_quant_bytes,
            "final_mb": packed.file_bytes / 1e6,
            "weight_payload_bytes": sizes.weight_payload_bytes,
            "packed_header_bytes": packed.header_bytes,
            "simulation": simulation,
        }
        if self.spec.packed_dir is not None:
            row["packed_file"] = str(target)
        return row
