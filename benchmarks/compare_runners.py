"""One function per tool: quantize THE FP32 checkpoint at one setting, measure top-1 and the file on disk.

Every runner takes the same inputs (checkpoint path, :class:`BenchData`, a
setting such as ``W4A8``, a scratch folder) and returns one row dict with the
same keys, so ``compare_tools`` can put bitsweep, PyTorch, Brevitas, NNCF and
the reference quantizer in one table. A tool that cannot do a setting returns
a row whose ``status`` says exactly why instead of a number.

The runners for bitsweep, torch.ao and the reference run in bitsweep's own
environment; Brevitas and NNCF ones live in ``compare_external`` because they
are installed in a separate venv.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from benchmarks.fmnist_model import BenchData, top1
except ImportError:  # pragma: no cover - run as a file
    from fmnist_model import BenchData, top1  # type: ignore[no-redef]

SETTINGS: dict[str, tuple[int, int]] = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W2A8": (2, 8)}
Row = dict[str, Any]


def parse_setting(name: str) -> tuple[int, int]:
    """``"W4A8"`` -> ``(4, 8)``; any ``W<b>A<b>`` with 1..16 bits is accepted."""
    if name in SETTINGS:
        return SETTINGS[name]
    up = name.upper()
    if up.startswith("W") and "A" in up:
        w, a = up[1:].split("A", 1)
        if w.isdigit() and a.isdigit():
            return int(w), int(a)
    raise SystemExit(f"setting '{name}' must look like W4A8")


def make_row(tool: str, version: str, setting: str, **fields: Any) -> Row:
    """A row with every key present, so tables never miss a column."""
    row: Row = {
        "tool": tool,
        "version": version,
        "setting": setting,
        "method": "",
        "granularity": "",
        "top1": None,
        "weight_quantizers": None,
        "act_quantizers": None,
        "file": None,
        "file_bytes": None,
        "seconds": None,
        "status": "ok",
    }
    row.update(fields)
    return row


def guarded(tool: str, version: str, setting: str, fn: Callable[[], Row]) -> Row:
    """Run one measurement; an exception becomes a row that quotes the error instead of a crash."""
    start = time.perf_counter()
    try:
        row = fn()
    except Exception as e:  # noqa: BLE001 - any tool failure is a result to report
        last = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{Path(last.filename).name}:{last.lineno}"
        msg = " ".join(str(e).split())[:220]
        return make_row(tool, version, setting, status=f"failed: {type(e).__name__}: {msg} ({where})")
    row.setdefault("seconds", None)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def file_bytes(path: Path) -> int:
    """Size of a file on disk in bytes (what the size table compares)."""
    return path.stat().st_size


# --------------------------------------------------------------------------- FP32 baseline


def run_fp32(checkpoint: Path, data: BenchData, work: Path) -> Row:
    """The FP32 model's accuracy and its float state dict on disk (the 100 % of every ratio)."""
    from bitsweep.training import load_model

    model, _ = load_model(checkpoint)
    path = work / "fp32_state_dict.pt"
    torch.save(model.state_dict(), path)
    return make_row(
        "FP32", torch.__version__, "FP32", method="float32", top1=top1(model, data.test),
        file=str(path), file_bytes=file_bytes(path),
    )  # fmt: skip


# --------------------------------------------------------------------------- bitsweep


def run_bitsweep(checkpoint: Path, data: BenchData, setting: str, observer: str, work: Path) -> Row:
    """bitsweep PTQ: fold BN, per-channel weights, activations at every integer site; packed file size."""
    import bitsweep
    from bitsweep.artifacts import PackedMeta, save_packed
    from bitsweep.quant import QuantConfig, ptq
    from bitsweep.training import load_model

    w, a = parse_setting(setting)
    model, info = load_model(checkpoint)
    config = QuantConfig.from_bits(w, a, "per_channel", observer)
    result = ptq(model, config, data.calib)
    model, summary = result.model, result.summary
    acc = top1(model, data.test)
    packed = save_packed(model, work / f"bitsweep_{setting}_{observer}.safetensors", PackedMeta(info.record, config))
    return make_row(
        "bitsweep", bitsweep.__version__, setting, method=f"{observer} observer, BN folded",
        granularity="per-channel W", top1=acc, weight_quantizers=summary.weight_count,
        act_quantizers=summary.activation_count, file=str(packed.path), file_bytes=packed.file_bytes,
    )  # fmt: skip


# --------------------------------------------------------------------------- reference quantizer


def run_reference(checkpoint: Path, data: BenchData, setting: str, work: Path) -> Row:
    """The assignment's reference: per-tensor min-max weights without BN folding, activations after nn.ReLU only."""
    from bitsweep.training import load_model

    try:
        from benchmarks.reference_quantizer import reference_calibrate, reference_quantize_
    except ImportError:  # pragma: no cover
        from reference_quantizer import reference_calibrate, reference_quantize_  # type: ignore[no-redef]

    w, a = parse_setting(setting)
    model, _ = load_model(checkpoint)
    summary = reference_quantize_(model, w, a)
    reference_calibrate(model, data.calib)
    acc = top1(model, data.test)
    path = work / f"reference_{setting}.pt"
    torch.save(model.state_dict(), path)  # fake-quant: float32 tensors holding quantized values
    note = "" if summary.activation_quantizers else f"no nn.ReLU in model ({summary.relu6_modules} ReLU6 left float)"
    return make_row(
        "reference", "assignment", setting, method="min-max, no BN folding", granularity="per-tensor W",
        top1=acc, weight_quantizers=summary.weight_layers, act_quantizers=summary.activation_quantizers,
        file=str(path), file_bytes=file_bytes(path), status="ok" + (f" ({note})" if note else ""),
    )  # fmt: skip


# --------------------------------------------------------------------------- PyTorch torch.ao (FX graph mode)


def run_torch_ao(checkpoint: Path, data: BenchData, setting: str, work: Path) -> Row:
    """PyTorch's own int8 PTQ: prepare_fx/convert_fx, x86 backend default qconfig, real int8 kernels.

    The x86 backend has quint8 activation and qint8 weight kernels only, so
    any setting other than W8A8 is reported as unsupported rather than
    emulated.
    """
    from bitsweep.training import load_model

    version = torch.__version__
    if parse_setting(setting) != (8, 8):
        return make_row(
            "torch.ao FX", version, setting,
            status="not supported: the x86 backend's quantized kernels are 8-bit only (quint8 activations, "
            "qint8 weights); lower widths exist only as fake quantization without int kernels",
        )  # fmt: skip
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model, _ = load_model(checkpoint)
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of torch.ao.quantization
        prepared = prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), (data.example,))
        with torch.no_grad():
            for x, _ in data.calib:
                prepared(x)
        quantized = convert_fx(prepared)
    acc = top1(quantized, data.test)
    # Each quantized op requantizes its output with its own (scale, zero_point): count those output qparams.
    n_w = sum(
        1
        for m in quantized.modules()
        if "quantized" in type(m).__module__
        and hasattr(m, "_packed_params")
        and not type(m).__name__.endswith("PackedParams")
    )
    n_a = sum(1 for m in quantized.modules() if "quantized" in type(m).__module__ and hasattr(m, "scale"))
    n_a += sum(1 for n in quantized.graph.nodes if n.op == "call_function" and "quantize_per_tensor" in str(n.target))
    n_a += sum(1 for n in quantized.graph.nodes if n.op == "call_function" and "quantized.add" in str(n.target))
    path = work / "torch_ao_W8A8.pt"
    torch.save(quantized.state_dict(), path)
    return make_row(
        "torch.ao FX", version, setting, method="x86 default qconfig (histogram act., per-channel W)",
        granularity="per-channel W", top1=acc, weight_quantizers=n_w, act_quantizers=n_a or None,
        file=str(path), file_bytes=file_bytes(path),
    )  # fmt: skip


def count_leaf(model: nn.Module, cls_name: str) -> int:
    """Modules whose class name contains ``cls_name`` (for counting a tool's quantizers)."""
    return sum(1 for m in model.modules() if cls_name in type(m).__name__)
