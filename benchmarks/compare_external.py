"""Brevitas and NNCF post-training quantization, run in their own venv (``benchmarks/work/tools-venv``).

They live apart from bitsweep's environment so installing them can never
change the torch (or anything else) bitsweep is tested with. The tools venv
holds the same torch 2.13.0 CPU wheel, bitsweep (editable) and the two tools;
``compare_tools`` calls this module there as a subprocess::

    benchmarks/work/tools-venv/bin/python -m benchmarks.compare_external --tool brevitas \
        --checkpoint CKPT --settings W8A8,W4A8 --out rows.json --work DIR

Each tool is used the way its documentation tells a user to: Brevitas with
its ImageNet PTQ example recipe (``preprocess_for_quantize`` + ``quantize_model``
+ calibration + bias correction), NNCF with ``nncf.quantize`` and the bit
widths given through ``AdvancedQuantizationParameters``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

try:
    from benchmarks._common import ROOT, WORK
    from benchmarks.compare_runners import Row, file_bytes, guarded, make_row, parse_setting
    from benchmarks.fmnist_model import BenchData, load_bench_data, top1
except ImportError:  # pragma: no cover - run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._common import ROOT, WORK
    from benchmarks.compare_runners import Row, file_bytes, guarded, make_row, parse_setting
    from benchmarks.fmnist_model import BenchData, load_bench_data, top1

TOOLS_VENV = WORK / "tools-venv"
TOOLS_PYTHON = TOOLS_VENV / "bin" / "python"
TOOL_PACKAGES = ("brevitas", "nncf", "onnx", "onnxscript", "onnxoptimizer")


def ensure_tools_venv() -> tuple[Path | None, str]:
    """Create the tools venv when absent; return (its python or None, a log line saying what happened).

    The torch pin is passed as a pip constraint so pip fails loudly instead of
    replacing torch when a tool wants another version.
    """
    if TOOLS_PYTHON.is_file():
        return TOOLS_PYTHON, "tools venv present"
    constraint = WORK / "tools-constraint.txt"
    constraint.parent.mkdir(parents=True, exist_ok=True)
    constraint.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    steps = [
        [sys.executable, "-m", "venv", str(TOOLS_VENV)],
        [str(TOOLS_PYTHON), "-m", "pip", "install", "-q", "-c", str(constraint), "torch", "-e", str(ROOT)],
        [str(TOOLS_PYTHON), "-m", "pip", "install", "-q", "-c", str(constraint), *TOOL_PACKAGES],
    ]
    for cmd in steps:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            tail = " ".join((out.stderr or out.stdout).strip().splitlines()[-2:])[:300]
            return None, f"'{' '.join(cmd[-3:])}' failed: {tail}"
    return TOOLS_PYTHON, "tools venv created"


def tool_version(name: str) -> str:
    """The installed version of a package, or 'not installed'."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------- Brevitas


def run_brevitas(checkpoint: Path, data: BenchData, setting: str, work: Path) -> Row:
    """Brevitas PTQ with its example recipe: BN merged, per-channel int weights, percentile activations."""
    import warnings

    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq import ptq_common

    from bitsweep.training import load_model

    w, a = parse_setting(setting)
    model, _ = load_model(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # FX trace and merge BN as the example does, but keep ReLU6: its default ReLU6 -> ReLU swap changes the
        # float function (no clipping at 6), and the example's quant_act_map quantizes ReLU6 directly anyway.
        model = preprocess_for_quantize(model, equalize_iters=0, merge_bn=True, relu6_to_relu=False)
        qmodel = ptq_common.quantize_model(
            model, backend="fx", weight_bit_width=w, act_bit_width=a, bias_bit_width=None,
            weight_quant_granularity="per_channel", act_quant_percentile=99.999, act_quant_type="sym",
            scale_factor_type="float_scale", quant_format="int",
        )  # fmt: skip
        ptq_common.calibrate(data.calib, qmodel)
        ptq_common.apply_bias_correction(data.calib, qmodel)
    acc = top1(qmodel, data.test)
    path, how = _brevitas_artifact(qmodel, data, setting, work)
    n_act = sum(1 for m in qmodel.modules() if type(m).__name__ in ("QuantReLU", "QuantIdentity", "QuantHardTanh"))
    n_w = sum(1 for m in qmodel.modules() if type(m).__name__ in ("QuantConv2d", "QuantLinear"))
    return make_row(
        "Brevitas", tool_version("brevitas"), setting, granularity="per-channel W",
        method="example PTQ recipe: BN merged, ReLU6 kept, percentile act., bias correction",
        top1=acc, weight_quantizers=n_w, act_quantizers=n_act, file=str(path), file_bytes=file_bytes(path),
        file_kind=how,
    )  # fmt: skip


def _brevitas_artifact(qmodel: torch.nn.Module, data: BenchData, setting: str, work: Path) -> tuple[Path, str]:
    """Brevitas's deployable file: the QCDQ ONNX export (int8 initializers); the state dict if export fails."""
    onnx_path = work / f"brevitas_{setting}.onnx"
    try:
        from brevitas.export import export_onnx_qcdq

        qmodel.eval()
        export_onnx_qcdq(qmodel, args=data.example, export_path=str(onnx_path))
        return onnx_path, "QCDQ ONNX export"
    except Exception as e:  # noqa: BLE001 - fall back and say so
        path = work / f"brevitas_{setting}.pt"
        torch.save(qmodel.state_dict(), path)
        return path, f"state dict (ONNX export failed: {type(e).__name__}: {' '.join(str(e).split())[:120]})"


# --------------------------------------------------------------------------- NNCF


def run_nncf(checkpoint: Path, data: BenchData, setting: str, work: Path) -> Row:
    """NNCF PTQ (``nncf.quantize``, default preset) with the weight/activation bit widths set explicitly."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    from bitsweep.training import load_model

    w, a = parse_setting(setting)
    model, _ = load_model(checkpoint)
    dataset = nncf.Dataset(data.calib, lambda batch: batch[0])
    advanced = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(num_bits=w, per_channel=True),
        activations_quantization_params=QuantizationParameters(num_bits=a),
    )
    try:
        qmodel = nncf.quantize(model, dataset, subset_size=len(data.calib), advanced_parameters=advanced)
    except ValueError as e:  # NNCF checks bit widths against its hardware configs and refuses the rest
        msg = " ".join(str(e).split())[:260]
        return make_row("NNCF", tool_version("nncf"), setting, status=f"not supported by nncf.quantize: {msg}")
    acc = top1(qmodel, data.test)
    # NNCF keeps quantizers as hooks: a pre-hook on input port 1 of a conv/linear quantizes its weight.
    hooks = {k.rsplit(".", 1)[0] for k in qmodel.state_dict() if k.startswith("__nncf_hooks")
             and k.endswith((".scale", ".input_low"))}  # fmt: skip
    n_w = sum(1 for k in hooks if "pre_hooks" in k and k.endswith("__1.0"))
    path = work / f"nncf_{setting}.pt"
    torch.save(qmodel.state_dict(), path)
    return make_row(
        "NNCF", tool_version("nncf"), setting, granularity="per-channel W",
        method="nncf.quantize, default preset, fast bias correction", top1=acc, weight_quantizers=n_w or None,
        act_quantizers=(len(hooks) - n_w) or None,
        file=str(path), file_bytes=file_bytes(path), file_kind="state dict (float weights + quantizer params)",
    )  # fmt: skip


RUNNERS = {"brevitas": run_brevitas, "nncf": run_nncf}


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: measure one tool at each setting and write the rows as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tool", choices=sorted(RUNNERS), required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--settings", required=True, help="comma-separated, e.g. W8A8,W4A8")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    # NNCF JIT-compiles a C++ extension on first use: build it under benchmarks/work (not ~/.cache) and let a
    # slow, shared CPU take the minutes it needs instead of NNCF's 60-second default timeout.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(WORK / "torch_extensions"))
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    name = {"brevitas": "Brevitas", "nncf": "NNCF"}[args.tool]
    version = tool_version(args.tool)
    data = load_bench_data(args.checkpoint, args.calib_images, args.test_images, data_dir=args.data_dir)
    rows = []
    for setting in args.settings.split(","):
        row = guarded(name, version, setting, lambda s=setting: RUNNERS[args.tool](args.checkpoint, data, s, args.work))
        print(f"[{name}] {setting}: top1={row['top1']} status={row['status']}", flush=True)
        rows.append(row)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
