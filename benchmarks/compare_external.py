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
import functools
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
# accelerate: Brevitas's learned round offloads blocks with it; 1.10.1 because newer ones break Brevitas 0.13.4
# ("'Int8ActPerTensorFloat' can not resolve attribute '_accelerate_added_attribute'").
TOOL_PACKAGES = ("brevitas", "nncf", "onnx", "onnxscript", "onnxoptimizer", "accelerate==1.10.1")


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


BREVITAS_METHODS = {
    "brevitas": "example PTQ recipe: BN merged, ReLU6 kept, percentile act., bias correction",
    "brevitas_gptq": "example PTQ recipe + GPTQ (act order) before bias correction",
    "brevitas_learned_round": "example PTQ recipe on the layerwise backend + learned round (hard sigmoid, per layer, "
    "1000 steps) before bias correction",
}


def run_brevitas(checkpoint: Path, data: BenchData, setting: str, work: Path, algorithm: str = "brevitas") -> Row:
    """Brevitas PTQ with its example recipe: BN merged, per-channel int weights, percentile activations.

    ``algorithm`` adds one of Brevitas's own weight-rounding algorithms in the place its ImageNet example
    (``ptq_evaluate``) puts it: after activation calibration, before bias correction.
    """
    import time
    import warnings

    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq import ptq_common

    from bitsweep.training import load_model

    w, a = parse_setting(setting)
    model, _ = load_model(checkpoint)
    # Brevitas runs learned round only on its layerwise backend (its example refuses the others): every conv /
    # linear quantizes its own input there, instead of one quantizer per activation tensor in the graph.
    backend = "layerwise" if algorithm == "brevitas_learned_round" else "fx"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # FX trace and merge BN as the example does, but keep ReLU6: its default ReLU6 -> ReLU swap changes the
        # float function (no clipping at 6), and the example's quant_act_map quantizes ReLU6 directly anyway.
        model = preprocess_for_quantize(model, equalize_iters=0, merge_bn=True, relu6_to_relu=False)
        qmodel = ptq_common.quantize_model(
            model, backend=backend, weight_bit_width=w, act_bit_width=a, bias_bit_width=None,
            weight_quant_granularity="per_channel", act_quant_percentile=99.999, act_quant_type="sym",
            scale_factor_type="float_scale", quant_format="int",
        )  # fmt: skip
        with torch.no_grad():  # as the example does: one forward pass initializes the weight quantizers
            qmodel.eval()(data.calib[0][0])
        ptq_common.calibrate(data.calib, qmodel)
        if algorithm == "brevitas_gptq":
            ptq_common.apply_gptq(data.calib, qmodel, act_order=True)
        elif algorithm == "brevitas_learned_round":
            _brevitas_learned_round(qmodel, data)
        ptq_common.apply_bias_correction(data.calib, qmodel)
    ptq_seconds = round(time.perf_counter() - start, 1)
    acc = top1(qmodel, data.test)
    path, how = _brevitas_artifact(qmodel, data, f"{algorithm}_{setting}", work)
    n_act = sum(1 for m in qmodel.modules() if type(m).__name__ in ("QuantReLU", "QuantIdentity", "QuantHardTanh"))
    n_w = sum(1 for m in qmodel.modules() if type(m).__name__ in ("QuantConv2d", "QuantLinear"))
    return make_row(
        "Brevitas", tool_version("brevitas"), setting, granularity="per-channel W", method=BREVITAS_METHODS[algorithm],
        top1=acc, weight_quantizers=n_w, act_quantizers=n_act, file=str(path), file_bytes=file_bytes(path),
        file_kind=how, ptq_seconds=ptq_seconds,
    )  # fmt: skip


def _brevitas_learned_round(qmodel: torch.nn.Module, data: BenchData) -> None:
    """Brevitas's learned round with its example's defaults, layer by layer; fp32 (its fp16 autocast is for GPUs)."""
    import functools

    from brevitas_examples.common.learned_round.learned_round_args import (
        HandlerSpec,
        LearnedRoundArgs,
        LossArgs,
        OptimizerArgs,
        TrainerConfig,
        TrainingArgs,
    )
    from brevitas_examples.common.learned_round.learned_round_trainer import LearnedRoundTrainer, get_blocks
    from brevitas_examples.imagenet_classification.ptq import learned_round_utils as lr

    optim = OptimizerArgs(target_params="learned_round", optimizer_cls="Adam", lr=1e-3, optimizer_kwargs={})
    losses = [LossArgs(cls="round_reg", kwargs=None), LossArgs(cls="mse", kwargs={"reduction": "none", "dim": 1})]
    training = TrainingArgs(
        optimizers_args=[optim], batch_size=1, iters=1000, losses_args=losses, loss_scaling_factor=1.0,
        use_best_model=False, use_amp=False, amp_dtype="float16", fast_update=False,
    )  # fmt: skip
    handler = HandlerSpec[LearnedRoundArgs](
        name="learned_round", config=LearnedRoundArgs(learned_round_param="hard_sigmoid", learned_round_kwargs=None)
    )
    trainer = LearnedRoundTrainer(config=TrainerConfig(training_args=training, training_handlers=[handler]))
    trainer.train(
        model=qmodel, model_forward=lr.vision_forward, block_forward=lr.vision_block_forward, data_loader=data.calib,
        cache=lr.CacheVision(), get_blocks_fn=functools.partial(get_blocks, block_check_fn=lr.is_layer),
        keep_gpu=True,
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


RUNNERS = {
    "brevitas": run_brevitas,
    "brevitas_gptq": functools.partial(run_brevitas, algorithm="brevitas_gptq"),
    "brevitas_learned_round": functools.partial(run_brevitas, algorithm="brevitas_learned_round"),
    "nncf": run_nncf,
}


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: measure one tool at each setting and write the rows as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tool", choices=sorted(RUNNERS), required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--settings", required=True, help="comma-separated, e.g. W8A8,W4A8")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--calib-first", action="store_true", help="calibrate on the first N training images")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    # NNCF JIT-compiles a C++ extension on first use: build it under benchmarks/work (not ~/.cache) and let a
    # slow, shared CPU take the minutes it needs instead of NNCF's 60-second default timeout.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(WORK / "torch_extensions"))
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    name = "NNCF" if args.tool == "nncf" else "Brevitas"
    version = tool_version(args.tool)
    data = load_bench_data(
        args.checkpoint, args.calib_images, args.test_images, data_dir=args.data_dir, calib_first=args.calib_first
    )
    rows = []
    for setting in args.settings.split(","):
        row = guarded(name, version, setting, lambda s=setting: RUNNERS[args.tool](args.checkpoint, data, s, args.work))
        print(f"[{name}] {setting}: top1={row['top1']} status={row['status']}", flush=True)
        rows.append(row)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
