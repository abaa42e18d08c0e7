"""``bitsweep export``: write the packed model file or an ONNX file (QOperator int8 or QDQ), and check it.

Examples::

    bitsweep export runs/fmnist/best-w4a8.pt --format packed
    bitsweep export runs/fmnist/best-w8a8.pt --format onnx --int8 --output w8a8.onnx     # QOperator int8
    bitsweep export runs/fmnist/best-w8a8.pt --format onnx --int8 --onnx-style qdq       # QDQ with int32 biases
    bitsweep export runs/fmnist/best.pt --weight-bits 4 --activation-bits 8 --format packed
    bitsweep export runs/fmnist/best.pt --layer-bits runs/fmnist/search/layer_bits.yaml --format onnx
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bitsweep.artifacts import Loaded, PackedMeta, load, load_packed, save_packed
from bitsweep.backend.intref import compare
from bitsweep.backend.simulate import evaluation_model
from bitsweep.cli import common
from bitsweep.config import DataConfig, from_dict
from bitsweep.data import TensorLoader, load_dataset
from bitsweep.errors import BitsweepError
from bitsweep.export.onnx import check_onnx, export_onnx
from bitsweep.export.onnx_check import qop_report
from bitsweep.export.onnx_qop import DENSE_WEIGHTS, export_onnx_qop
from bitsweep.io import write_json_atomic
from bitsweep.measure.summary import compression_summary
from bitsweep.quant import QuantConfig, ptq
from bitsweep.search.layer_bits import layer_names, load_layer_bits


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``export`` command."""
    p = common.add_command(
        subparsers, "export", "write a quantized model as a bit-packed or ONNX file, verified", description=__doc__
    )
    p.add_argument(
        "checkpoint", help="a quantized checkpoint from 'bitsweep quantize' (or a float one with --weight-bits)"
    )
    p.add_argument("--format", choices=("packed", "onnx"), default="packed", help="output format")
    p.add_argument("--int8", action="store_true", help="ONNX: integer operators end to end in onnxruntime (<=8 bits)")
    p.add_argument(
        "--onnx-style", choices=("qop", "qdq"), default=None,
        help="ONNX graph: qop = QOperator int8 from the integer program (implies --int8), qdq = "
        "QuantizeLinear/DequantizeLinear pairs; unset: qop with --int8, else qdq",
    )  # fmt: skip
    p.add_argument(
        "--qop-dense-weights", choices=DENSE_WEIGHTS, default="auto",
        help="qop: container of dense-layer weights; auto = int8 where onnxruntime's AVX2 int16 pair sums cannot "
        "saturate (weights of 7 bits or fewer) and uint8 elsewhere, exact on every CPU; uint8 everywhere; int8 "
        "everywhere (fastest on VNNI/AMX CPUs, inexact on AVX2-only ones)",
    )  # fmt: skip
    p.add_argument("--latency-runs", type=int, default=20, help="qop: timed runs per latency figure (median)")
    p.add_argument("--output", default=None, help="output path (default: beside the checkpoint, .safetensors/.onnx)")
    p.add_argument("--weight-bits", type=int, default=None, help="quantize a float checkpoint to these weight bits")
    p.add_argument("--activation-bits", type=int, default=None, help="... and these activation bits")
    p.add_argument("--layer-bits", default=None, metavar="FILE",
                   help="quantize a float checkpoint with this per-layer bit-width file (a search's "
                   "layer_bits.yaml) instead of --weight-bits/--activation-bits")  # fmt: skip
    p.add_argument("--calib-batches", type=int, default=16, help="calibration batches (float checkpoints only)")
    common.add_observer_option(p)
    common.add_method_options(p)
    p.add_argument("--batch-size", type=int, default=256, help="batch size for calibration and the check")
    p.add_argument("--check-batches", type=int, default=2, help="test batches used to verify the exported file")
    common.add_threads_option(p)
    p.set_defaults(func=run)


def _check_data(meta: PackedMeta, batch_size: int, n: int) -> tuple[Iterator[Any], str]:
    """Test-split batches of the checkpoint's dataset, or random images when it is not available here."""
    arch = meta.record
    data = meta.extra.get("data")
    if data:
        try:
            cfg = dataclasses.replace(from_dict(DataConfig, data), download=False)
            splits = load_dataset(cfg, seed=int(meta.extra.get("seed", 0)))
            loader = TensorLoader(splits.test, batch_size, mean=arch.mean, std=arch.std)
            return iter(tqdm(loader, total=min(n, len(loader)), desc="check", unit="batch", leave=False)), (
                f"{cfg.name} test images"
            )
        except BitsweepError:
            pass
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch_size, *arch.input_shape, generator=g) for _ in range(n)]
    return iter(batches), "random images (dataset not available here)"


def _float_config(loaded: Loaded, args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig for a float checkpoint: uniform bits, or the ``--layer-bits`` plan (names checked)."""
    if args.layer_bits is None and (args.weight_bits is None or args.activation_bits is None):
        raise BitsweepError("a float checkpoint needs --weight-bits and --activation-bits, or --layer-bits FILE "
                            "(or run 'bitsweep quantize')")  # fmt: skip
    try:
        if args.layer_bits is None:
            return QuantConfig.from_bits(args.weight_bits, args.activation_bits, observer=args.observer,
                                         method=args.method)  # fmt: skip
        base = QuantConfig.from_bits(8, 8, observer=args.observer, method=args.method)
    except ValueError as e:
        raise BitsweepError(str(e)) from None
    return load_layer_bits(args.layer_bits, layer_names(loaded.model, base)).to_quant_config(base)


def _quantize_float(
    loaded: Loaded, args: argparse.Namespace, config: QuantConfig, calib_batches: int, batch_size: int
) -> torch.nn.Module:
    """PTQ of a float checkpoint with ``config`` and ``--method``, calibrated on its own training split."""
    if loaded.data is None:
        raise BitsweepError(f"'{loaded.path}' names no dataset to calibrate on; quantize it with the Python API")
    splits = load_dataset(dataclasses.replace(loaded.data, download=False), seed=loaded.seed)
    record = loaded.record
    loader = TensorLoader(splits.train, batch_size, mean=record.mean, std=record.std)
    return ptq(loaded.model, config, loader, num_batches=calib_batches, options=common.method_options(args)).model


def run(args: argparse.Namespace) -> int:
    """Load or quantize, export, reload/run the file, compare with the simulation, print the sizes."""
    common.require_positive("--batch-size", args.batch_size)
    common.require_positive("--check-batches", args.check_batches)
    if args.layer_bits is not None and (args.weight_bits is not None or args.activation_bits is not None):
        raise BitsweepError("--layer-bits sets every layer's bits; drop --weight-bits/--activation-bits")
    common.check_writable(Path(args.output).parent if args.output else Path(args.checkpoint).parent, "--output")
    loaded = load(args.checkpoint)
    if loaded.kind != "float":
        if args.weight_bits is not None or args.activation_bits is not None or args.layer_bits is not None:
            raise BitsweepError(
                "this checkpoint is already quantized; drop --weight-bits/--activation-bits/--layer-bits"
            )
        model, config = loaded.model, loaded.quant_config
    else:
        common.require_positive("--calib-batches", args.calib_batches)
        config = _float_config(loaded, args)  # a bad plan is refused before any calibration
        model = _quantize_float(loaded, args, config, args.calib_batches, args.batch_size)
    extra = loaded.meta if loaded.kind == "packed" else loaded.source_meta()
    meta = PackedMeta(loaded.record, config, extra)
    src = Path(args.checkpoint)
    style = args.onnx_style or ("qop" if args.int8 else "qdq")
    int8 = args.int8 or style == "qop"
    suffix = ".safetensors" if args.format == "packed" else (".int8.onnx" if int8 else ".onnx")
    out = Path(args.output) if args.output else src.with_name(src.stem + suffix)
    if out.resolve() == src.resolve():
        raise BitsweepError(f"--output {out} would overwrite the checkpoint; choose another path")
    batches, what = _check_data(meta, args.batch_size, args.check_batches)
    record: dict[str, Any] = {"checkpoint": str(src), "output": str(out), "format": args.format}
    if args.format == "packed":
        info = save_packed(model, out, meta)
        reloaded, _ = load_packed(out)
        same = n = 0
        sims: tuple[Any, Any] | None = None
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if i >= args.check_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if sims is None:  # the integer-exact simulations of both, when the model lowers
                    pair = [evaluation_model(m, x) for m in (model, reloaded)]
                    sims = (pair[0][0], pair[1][0]) if pair[0][1].startswith("integer") else (model, reloaded)
                same += int(torch.equal(model(x), reloaded(x)) and torch.equal(sims[0](x), sims[1](x)))
                n += 1
        if same != n:
            raise BitsweepError(f"reloaded packed model differs from the simulation on {n - same} of {n} batches")
        print(
            f"wrote {out}: {info.file_bytes:,} bytes; reloaded logits identical (fake-quant and integer simulation) "
            f"on {n} batches of {what}"
        )
        batches, _ = _check_data(meta, args.batch_size, args.check_batches)
        try:
            agreement = compare(model, batches, args.check_batches)
            fake = f"{agreement.fakequant_agreement:.2f}%, {agreement.fakequant_max_logit_diff:.3g}"
            print(
                f"integer reference vs integer simulation: top-1 agreement {agreement.top1_agreement:.2f}% on "
                f"{agreement.images} images, max logit difference {agreement.max_logit_diff:.3g} (fake-quant: {fake})"
            )
            record["integer_reference"] = agreement.to_dict()
        except BitsweepError as e:
            print(f"integer reference skipped: {e}")
        summary = compression_summary(model, meta, out)
    elif style == "qop":
        common.require_positive("--latency-runs", args.latency_runs)
        arch = meta.record
        props = {"mean": json.dumps(list(arch.mean)), "std": json.dumps(list(arch.std)), "source": str(src)}
        export_onnx_qop(model, out, arch.input_shape, dense_weights=args.qop_dense_weights, metadata=props)
        report = qop_report(out, model, arch.input_shape, batches, max_batches=args.check_batches,
                            runs=args.latency_runs)  # fmt: skip
        print(f"wrote {out}: {out.stat().st_size:,} bytes (QOperator int8)\n{report.describe(what)}")
        record["onnx_qop"] = report.to_dict()
        summary = compression_summary(model, meta)
    else:
        export_onnx(model, out, meta.record.input_shape, int8=args.int8)
        check = check_onnx(out, model, batches, args.check_batches)
        acc = ""
        if check.simulated_top1 is not None:
            acc = f"; top-1 simulation {check.simulated_top1:.2f}% vs onnxruntime {check.onnx_top1:.2f}%"
        print(
            f"wrote {out}: {out.stat().st_size:,} bytes; onnxruntime vs fake-quant simulation on {check.images} "
            f"{what}: top-1 agreement {check.top1_agreement:.2f}%, max logit difference {check.max_logit_diff:.3g}{acc}"
        )
        record["onnx_check"] = check.to_dict()
        summary = compression_summary(model, meta)
    print(summary.describe())
    record["compression"] = summary.to_dict()
    write_json_atomic(out.with_name(out.name + ".json"), json.loads(json.dumps(record, default=str)))
    return 0
