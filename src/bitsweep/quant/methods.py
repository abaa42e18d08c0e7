"""The registry of post-training methods that :func:`bitsweep.quant.ptq` runs.

A method is a composition of optional steps around the fixed core
(prepare, calibrate, convert):

* ``restructure`` changes the float model's structure without data (the ReLU6
  of equalized pairs becomes ReLU); loading a saved model repeats it, so the
  rebuilt architecture matches the one that was quantized;
* ``before_prepare`` changes the float model (cross-layer equalization);
* ``after_convert`` changes the converted model (bias correction, learned
  rounding through ``WeightQuantizer.set_integers``, block reconstruction
  with trainable scales).

Names join with ``+`` to run several methods' steps in order: ``cle+qdrop`` equalizes
the float model, then reconstructs blocks.

Each step gets a :class:`PTQContext`. ``QuantConfig.method`` names the method,
and ``QuantConfig`` validates it against ``PTQ_METHODS``, which is why the
registry lives here (this module does not import the config or the API, so
the config can import it). New methods are added to ``PTQ_METHODS`` and
every caller of ``ptq`` (CLI, sweep, export, benchmarks) gets them.

>>> sorted(PTQ_METHODS)
['adaround', 'bias_correction', 'brecq', 'cle', 'qdrop', 'rtn']
>>> get_method("cle+adaround").needs_images
True
>>> check_method("adaround-typo")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: unknown post-training method 'adaround-typo'; choose one of rtn, ... (join with '+', e.g. cle+qdrop)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from bitsweep.errors import BitsweepError
from bitsweep.quant.bias_correction import correct_bias
from bitsweep.quant.equalize import cross_layer_equalization, relu6_to_relu
from bitsweep.quant.reconstruct import ReconstructConfig, reconstruct
from bitsweep.quant.registry import lookup


@dataclass(frozen=True)
class PTQContext:
    """What a method's step may read.

    Attributes:
        model: the model the step changes in place (float in ``before_prepare``, converted in ``after_convert``).
        config: the ``QuantConfig`` being applied.
        images: the calibration batches (image tensors) when the method asked for them
            (``PTQMethod.needs_images``), else empty.
        stats: the calibration statistics (None in ``before_prepare``).
        float_model: an unchanged copy of the float model (after ``before_prepare``) when the method
            asked for one (``PTQMethod.needs_float_model``), to reconstruct against.
        options: method settings from the caller (``ptq(..., options=...)``), e.g. ``images`` (how many
            calibration images learned methods use, default :data:`RECONSTRUCTION_IMAGES`),
            ``iterations`` (steps per reconstruction unit), ``act_lr`` (learning rate of the activation step
            sizes, for ablations), ``progress`` (show progress bars).
    """

    model: nn.Module
    config: Any
    images: tuple[Any, ...] = ()
    stats: Mapping[str, Any] | None = None
    float_model: nn.Module | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


PTQStep = Callable[[PTQContext], None]


@dataclass(frozen=True)
class PTQMethod:
    """One post-training method.

    Attributes:
        name: the name ``QuantConfig.method`` and ``--method`` use.
        description: one line for help texts.
        before_prepare: step on the float model before ``quantize_``.
        after_convert: step on the converted model.
        needs_images: the steps read calibration images (not only statistics): ``ptq`` keeps the batches
            it calibrated on and refuses to run without images.
        needs_float_model: ``ptq`` keeps a copy of the float model for the steps.
        restructure: data-free change of the float model's modules, run first by ``ptq`` and again
            by every loader of a saved model before its quantizers are restored.
    """

    name: str
    description: str
    before_prepare: PTQStep | None = None
    after_convert: PTQStep | None = None
    needs_images: bool = False
    needs_float_model: bool = False
    restructure: Callable[[nn.Module], Any] | None = None


RTN = PTQMethod("rtn", "round to nearest, with the configured observers choosing the ranges")
RECONSTRUCTION_IMAGES = 1024  # calibration images learned methods fit on, unless options say otherwise


def _images(ctx: PTQContext) -> torch.Tensor:
    """The first ``options['images']`` calibration images as one (N, C, H, W) tensor."""
    limit = int(ctx.options.get("images", RECONSTRUCTION_IMAGES))
    if limit < 1:
        raise ValueError(f"reconstruction images must be a positive whole number, got {limit}")
    return torch.cat([torch.as_tensor(b) for b in ctx.images])[:limit]


def _equalization(ctx: PTQContext) -> None:
    images = _images(ctx) if ctx.images else None
    report = cross_layer_equalization(ctx.model, images, absorb=bool(ctx.options.get("absorb_bias", True)))
    if report.pairs == 0:
        raise BitsweepError(
            "cross-layer equalization found no convolution -> ReLU/ReLU6 -> convolution pair in this model; "
            "choose another method (for example rtn or bias_correction)"
        )


def _bias_correction(ctx: PTQContext) -> None:
    correct_bias(ctx.model, _images(ctx), progress=bool(ctx.options.get("progress", True)))


_CALLER_SETTINGS: Mapping[str, Callable[[Any], Any]] = MappingProxyType({"iterations": int, "act_lr": float})
# ReconstructConfig fields a caller may override through ``options``


def _reconstruction(**settings: Any) -> PTQStep:
    def step(ctx: PTQContext) -> None:
        chosen = dict(settings)
        for key, kind in _CALLER_SETTINGS.items():
            if key in ctx.options:
                chosen[key] = kind(ctx.options[key])
        reconstruct(
            ctx.model, _images(ctx), ReconstructConfig(**chosen), progress=bool(ctx.options.get("progress", True))
        )

    return step


CLE = PTQMethod(
    "cle", "cross-layer equalization (ReLU6 of equalized pairs becomes ReLU) and high-bias absorption, then rtn",
    _equalization, None, True, False, relu6_to_relu,
)  # fmt: skip
BIAS_CORRECTION = PTQMethod(
    "bias_correction", "round to nearest, then empirical bias correction per layer", None, _bias_correction, True
)
ADAROUND = PTQMethod(
    "adaround", "learned rounding per layer (AdaRound) against the float layer output", None,
    _reconstruction(unit="layer"), True,
)  # fmt: skip
BRECQ = PTQMethod(
    "brecq", "learned rounding per block with learned activation step sizes (BRECQ + LSQ)", None,
    _reconstruction(unit="block", learn_activations=True), True,
)  # fmt: skip
QDROP = PTQMethod(
    "qdrop", "block reconstruction with learned steps and random dropping of activation quantization (QDrop)", None,
    _reconstruction(unit="block", learn_activations=True, drop_prob=0.5), True,
)  # fmt: skip

# The registry: method name -> method. Read-only; new methods are added here.
PTQ_METHODS: Mapping[str, PTQMethod] = MappingProxyType(
    {m.name: m for m in (RTN, CLE, BIAS_CORRECTION, ADAROUND, BRECQ, QDROP)}
)


def _chain(steps: list[Any]) -> Any:
    steps = [f for f in steps if f is not None]
    if len(steps) <= 1:
        return steps[0] if steps else None

    def run(arg: Any) -> None:
        for f in steps:
            f(arg)

    return run


def get_method(name: str) -> PTQMethod:
    """The method registered as ``name``, or the composition of ``a+b+...`` (steps in that order).

    Raises:
        ValueError: an unknown name (listing the choices), or a name repeated in a composition.
    """
    parts = str(name).split("+")
    if len(parts) == 1:
        return _lookup(name)
    methods = [_lookup(p) for p in parts]
    if len(set(parts)) != len(parts):
        raise ValueError(f"post-training method {name!r} names a method twice")
    return PTQMethod(
        name,
        ", then ".join(m.description for m in methods),
        _chain([m.before_prepare for m in methods]),
        _chain([m.after_convert for m in methods]),
        any(m.needs_images for m in methods),
        any(m.needs_float_model for m in methods),
        _chain([m.restructure for m in methods]),
    )


def _lookup(name: str) -> PTQMethod:
    try:
        return lookup(PTQ_METHODS, name, "post-training method")
    except ValueError as e:
        raise ValueError(f"{e} (join with '+', e.g. cle+qdrop)") from None


def check_method(name: str) -> str:
    """Return ``name`` if it is a registered method, else raise ValueError listing the choices."""
    get_method(name)
    return name
