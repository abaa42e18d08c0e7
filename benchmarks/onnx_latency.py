"""int8 ONNX vs FP32 ONNX latency in onnxruntime on this CPU, batch 1 and 64.

Rows: FP32, bitsweep's QOperator int8 (dense weights uint8 and int8), bitsweep's QDQ
int8, and onnxruntime's own quantize_static (QDQ, per-channel, same calibration images).

Full run::

    python benchmarks/onnx_latency.py --checkpoint benchmarks/work/fmnist_mbv2/best.pt

Quick check (random width-0.25 model, few iterations, prints only)::

    python benchmarks/onnx_latency.py --quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, avx2_emulated, header, machine_key, md_table, update_section  # noqa: E402

from bitsweep.backend.simulate import simulate  # noqa: E402
from bitsweep.export.onnx import export_onnx  # noqa: E402
from bitsweep.export.onnx_check import BLOCK, OrtSettings, compare_latency, compare_logits  # noqa: E402
from bitsweep.export.onnx_qop import export_onnx_qop  # noqa: E402
from bitsweep.quant import QuantConfig, fold_batchnorm, ptq  # noqa: E402


def _setup(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[int, int, int], list, list]:
    """Float model, input shape, calibration batches, test batches (images, labels)."""
    if args.quick:
        from bitsweep.models import create_model

        g = torch.Generator().manual_seed(0)
        model = create_model("mobilenetv2", 10, 1, width=0.25).eval()
        calib = [torch.randn(16, 1, 28, 28, generator=g)]
        test = [(torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))]
        return model, (1, 28, 28), calib, test
    from bitsweep.data import TensorLoader, load_dataset
    from bitsweep.training import load_model

    model, info = load_model(args.checkpoint)
    splits = load_dataset(dataclasses.replace(info.data, download=False), seed=info.seed)
    train = TensorLoader(splits.train, 256, mean=info.mean, std=info.std)
    calib = [x for _, (x, _) in zip(range(8), train, strict=False)]
    test = list(TensorLoader(splits.test, 500, mean=info.mean, std=info.std))
    return model, (info.in_channels, *info.image_size), calib, test


class _Memo:
    """The simulation's logits per test batch, computed once and shared by every file compared with it."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.f, self.seen = f, {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape))
        if key not in self.seen:
            with torch.no_grad():
                self.seen[key] = self.f(x)
        return self.seen[key]


class _Calibration:
    """onnxruntime's CalibrationDataReader over our calibration batches (the same images bitsweep calibrates on)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.feeds = iter([{"input": x.numpy()} for x in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def _ort_static(fp32: Path, out: Path, calib: list[torch.Tensor]) -> Path:
    """onnxruntime's own int8: quantize_static, QDQ, per-channel int8 weights, uint8 activations, MinMax."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(fp32), str(out), _Calibration(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(WORK / "fmnist_mbv2" / "best.pt"))
    parser.add_argument("--iters", type=int, default=200, help="timed runs per measurement (median reported)")
    parser.add_argument(
        "--threads",
        default=None,
        help="onnxruntime intra-op threads, comma-separated to time each (1,2; default: auto, 1 at batch 1 and all "
        "available cores at batch 64, what `bitsweep export --int8` times)",
    )
    parser.add_argument("--quick", action="store_true", help="random tiny model, 5 iterations; prints only")
    args = parser.parse_args()
    iters = 5 if args.quick else args.iters
    if avx2_emulated():
        parser.error("onnxruntime ignores ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY (its kernels read the CPU's own "
                     "flags): unset them, and run this on an AVX2-only CPU for AVX2 figures")  # fmt: skip
    try:
        threads = [int(t) for t in args.threads.split(",")] if args.threads else [0]
    except ValueError:
        parser.error(f"--threads takes whole numbers separated by commas, got {args.threads!r}")
    if args.threads and min(threads) < 1:
        parser.error(f"--threads must be at least 1, got {args.threads!r}")
    model, shape, calib, test = _setup(args)
    fp32 = copy.deepcopy(model).eval()
    fold_batchnorm(fp32)
    w4a8 = ptq(copy.deepcopy(model), QuantConfig.from_bits(4, 8), calib).model
    model = ptq(model, QuantConfig.from_bits(8, 8), calib).model
    sims = {"W8A8": _Memo(simulate(model, test[0][0][:1])), "W4A8": _Memo(simulate(w4a8, test[0][0][:1]))}
    all_settings = [OrtSettings(intra_op_threads=t) for t in threads]
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as d:
        paths = {
            "FP32": export_onnx(fp32, Path(d) / "fp32.onnx", shape),
            "bitsweep QOp int8 (uint8 dense weights)": export_onnx_qop(
                model, Path(d) / "qop_u8.onnx", shape, dense_weights="uint8"
            ),
            "bitsweep QOp int8 (int8 dense weights)": export_onnx_qop(
                model, Path(d) / "qop_s8.onnx", shape, dense_weights="int8"
            ),
            "bitsweep QDQ int8": export_onnx(model, Path(d) / "qdq.onnx", shape, int8=True),
            "bitsweep QOp W4A8 (auto: int8 dense weights)": export_onnx_qop(w4a8, Path(d) / "qop_w4.onnx", shape),
        }
        paths["onnxruntime quantize_static (QDQ, per-channel)"] = _ort_static(
            paths["FP32"], Path(d) / "ort.onnx", calib
        )
        for name, p in paths.items():
            if name == "FP32":
                continue
            c = compare_logits(p, sims["W4A8" if "W4A8" in name else "W8A8"], test)
            notes.append(f"- {name}: top-1 {c.onnx_top1:.2f}% (integer-exact simulation {c.simulated_top1:.2f}%), "
                         f"same prediction as the simulation on {c.top1_agreement:.2f}% of {c.images} test images, "
                         f"max logit difference {c.max_logit_diff:.3g}")  # fmt: skip
        for settings in all_settings:  # each thread count: FP32 and int8 timed in turn, compared at that count
            lat = compare_latency(paths, shape, batch_sizes=(1, 64), runs=iters, settings=settings)
            base = {r.batch: r.median_ms for r in lat if r.model == "FP32"}
            for r in lat:
                rows.append([r.model, r.batch, r.threads, f"{r.median_ms:.3f}", f"{r.images_per_s:,.0f}",
                             f"{base[r.batch] / r.median_ms:.2f}x", f"{paths[r.model].stat().st_size:,}"])  # fmt: skip
    columns = ["model", "batch", "threads", "median latency (ms)", "images/s", "speed-up vs FP32 (same threads)"]
    table = md_table([*columns, "file (B)"], rows)
    cmd = "python benchmarks/onnx_latency.py " + " ".join(sys.argv[1:])
    settings_text = all_settings[0].describe(threads if len(threads) > 1 else ())  # one line: only threads differ
    text = (f"### ONNX latency, int8 vs FP32 (onnxruntime, CPU, {machine_key()})\n\n{header(cmd)}\n{table}\n\n"
            "Agreement with bitsweep's integer-exact simulation of the same model (W8A8 unless the row says W4A8; "
            "quantize_static makes its own quantization, so only its top-1 compares):\n\n" + "\n".join(notes) + "\n\n"
            f"Median of {iters} runs after warm-up, the files timed in turn in blocks of {BLOCK} calls; "
            f"{settings_text}. int8 dense weights are exact only "
            "on VNNI/AMX CPUs (onnxruntime's AVX2 u8s8 kernels saturate int16 pair sums); the default `auto` takes "
            "them only for layers whose pair sums fit int16 (all of W4A8's), so it is exact everywhere.\n")  # fmt: skip
    print(text)
    if not args.quick:
        update_section(f"onnx_latency_{machine_key()}", text, beside="onnx_latency_")


if __name__ == "__main__":
    main()
