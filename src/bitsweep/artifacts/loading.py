"""Rebuilding a converted quantized model from the checkpoints other commands write.

``bitsweep quantize`` writes a plain-dict checkpoint (``format:
bitsweep-quantized``) holding the QuantConfig, every quantizer's final spec,
the converted state (integer weights included) and its source training
checkpoint's ``config``/``dataset`` entries. :func:`load_quantized` rebuilds
the float architecture, applies ``quantize_`` with that config and restores
every buffer, so the model computes exactly what ``bitsweep quantize``
evaluated. :func:`quantize_float` covers the other input: a float training
checkpoint plus bit widths, calibrated on its own dataset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsweep.config import ModelConfig, from_dict
from bitsweep.errors import BitsweepError
from bitsweep.artifacts.packed import Architecture, PackedMeta

QUANTIZED_FORMAT = "bitsweep-quantized"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load any bitsweep checkpoint dict safely (``weights_only=True``), with one clear error."""
    p = Path(path)
    if not p.is_file():
        raise BitsweepError(f"checkpoint '{p}' not found; pass a file written by 'bitsweep quantize' or 'bitsweep train'")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere inside the unpickler
        raise BitsweepError(f"cannot read checkpoint '{p}' ({type(e).__name__}); the file is corrupt") from None
    if not isinstance(state, dict) or "format" not in state:
        raise BitsweepError(f"'{p}' is not a bitsweep checkpoint (no format marker)")
    return state


def architecture_of(source: dict[str, Any]) -> Architecture:
    """The :class:`Architecture` named by a training checkpoint's ``config`` and ``dataset`` entries."""
    try:
        model = from_dict(ModelConfig, source["config"]["model"])
        ds = source["dataset"]
        return Architecture(
            name=model.name,
            num_classes=int(ds["num_classes"]),
            in_channels=int(ds["in_channels"]),
            image_size=(int(ds["image_size"][0]), int(ds["image_size"][1])),
            mean=tuple(float(v) for v in ds["mean"]),
            std=tuple(float(v) for v in ds["std"]),
            options={"width": model.width, "dropout": model.dropout},
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise BitsweepError(f"checkpoint lacks its model/dataset description ({e}); re-run 'bitsweep quantize'") from None


def load_quantized(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, PackedMeta]:
    """Rebuild the converted model of a ``bitsweep quantize`` checkpoint, in eval mode, with its packing metadata.

    The model comes from ``bitsweep.artifacts.quantized.load_quantized`` (one loader for the format);
    this adds the :class:`PackedMeta` (architecture, config, source data) that exports need.

    Raises:
        BitsweepError: for a missing, corrupt or non-quantized checkpoint.
    """
    from bitsweep.quant import QuantConfig
    from bitsweep.artifacts.quantized import load_quantized as load_converted

    state = read_checkpoint(path)
    if state.get("format") != QUANTIZED_FORMAT:
        raise BitsweepError(f"'{path}' is not a quantized checkpoint; run 'bitsweep quantize' on it first "
                            "or pass --weight-bits/--activation-bits to quantize it here")  # fmt: skip
    try:
        model, state = load_converted(path, device)
    except (KeyError, RuntimeError, AttributeError) as e:
        raise BitsweepError(f"'{path}' does not fit the architecture it names ({e}); re-run 'bitsweep quantize'") from None
    arch = architecture_of(state.get("source", {}))
    config = from_dict(QuantConfig, state["quant_config"])
    source = state.get("source", {})
    extra = {"source_checkpoint": str(path), "metrics": source.get("metrics", {}),
             "data": source.get("config", {}).get("data"), "seed": source.get("config", {}).get("seed", 0)}  # fmt: skip
    return model, PackedMeta(arch, config, extra)


def quantize_float(
    path: str | Path,
    weight_bits: int,
    activation_bits: int,
    calib_batches: int = 16,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, PackedMeta]:
    """Quantize a float training checkpoint with the default recipe, calibrating on its training split."""
    from bitsweep.data import TensorLoader, load_dataset
    from bitsweep.quant import QuantConfig, calibrate, convert, quantize_
    from bitsweep.training import load_model
    from bitsweep.training.checkpoint import load_checkpoint

    try:
        config = QuantConfig.from_bits(weight_bits, activation_bits)
    except ValueError as e:
        raise BitsweepError(str(e)) from None
    model, info = load_model(path, device=device)
    arch = architecture_of(load_checkpoint(path))
    splits = load_dataset(dataclasses.replace(info.data, download=False), seed=info.seed)
    loader = TensorLoader(splits.train, batch_size, mean=info.mean, std=info.std, device=torch.device(device))
    quantize_(model, config)
    calibrate(model, loader, calib_batches)
    convert(model)
    extra = {"source_checkpoint": str(path), "data": dataclasses.asdict(info.data), "seed": info.seed}
    return model.eval(), PackedMeta(arch, config, extra)
