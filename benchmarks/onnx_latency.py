"""int8 ONNX (integer kernels) vs FP32 ONNX latency in onnxruntime on this CPU, batch 1 and 64.

Full run::

    python benchmarks/onnx_latency.py --checkpoint benchmarks/work/fmnist_mbv2/best.pt

Quick check (random width-0.25 model, few iterations, prints only)::

    python benchmarks/onnx_latency.py --quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, header, md_table, update_section  # noqa: E402

from bitsweep.backend.simulate import simulate  # noqa: E402
from bitsweep.export.onnx import check_onnx, export_onnx, ort_session  # noqa: E402
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


def _latency_ms(path: Path, x: np.ndarray, iters: int, threads: int | None) -> float:
    sess = ort_session(path, threads)
    for _ in range(max(2, iters // 10)):
        sess.run(["logits"], {"input": x})
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(["logits"], {"input": x})
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(WORK / "fmnist_mbv2" / "best.pt"))
    parser.add_argument("--iters", type=int, default=200, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="random tiny model, 5 iterations; prints only")
    args = parser.parse_args()
    iters = 5 if args.quick else args.iters
    model, shape, calib, test = _setup(args)
    fp32 = copy.deepcopy(model).eval()
    fold_batchnorm(fp32)
    model = ptq(model, QuantConfig.from_bits(8, 8), calib).model
    rows = []
    with tempfile.TemporaryDirectory() as d:
        f_path = export_onnx(fp32, Path(d) / "fp32.onnx", shape)
        q_path = export_onnx(model, Path(d) / "int8.onnx", shape, int8=True)
        check = check_onnx(q_path, model, test)
        sizes = {"FP32": f_path.stat().st_size, "int8 QDQ": q_path.stat().st_size}
        for batch in (1, 64):
            x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
            lat = {name: _latency_ms(p, x, iters, args.threads) for name, p in (("FP32", f_path), ("int8 QDQ", q_path))}
            for name in lat:
                rows.append([name, batch, f"{lat[name]:.3f}", f"{batch / lat[name] * 1000:,.0f}",
                             f"{lat['FP32'] / lat[name]:.2f}x", f"{sizes[name]:,}"])  # fmt: skip
    table = md_table(["model", "batch", "median latency (ms)", "images/s", "speed-up vs FP32", "file (B)"], rows)
    cmd = "python benchmarks/onnx_latency.py " + " ".join(sys.argv[1:])
    sim = simulate(model, test[0][0][:1])
    exact_ok = sum(int((sim(x).argmax(1) == y).sum()) for x, y in test)
    exact_top1 = 100.0 * exact_ok / sum(y.shape[0] for _, y in test)
    acc = (f"int8 ONNX vs PyTorch W8A8 fake-quant simulation on {check.images} test images: top-1 "
           f"{check.onnx_top1:.2f}% vs {check.simulated_top1:.2f}%, agreement {check.top1_agreement:.2f}%, "
           f"max logit difference {check.max_logit_diff:.3g}. The integer-exact simulation (bitsweep's reported "
           f"accuracy) of the same model: {exact_top1:.2f}%, so ONNX is within "
           f"{abs(check.onnx_top1 - exact_top1):.2f} points of it.")  # fmt: skip
    text = (f"### ONNX latency, int8 vs FP32 (onnxruntime, CPU)\n\n{header(cmd)}\n{table}\n\n{acc}\n"
            f"Median of {iters} runs after warm-up; onnxruntime {__import__('onnxruntime').__version__}, "
            "all graph optimizations (QDQ fused to integer kernels).\n")  # fmt: skip
    print(text)
    if not args.quick:
        update_section("onnx_latency", text)


if __name__ == "__main__":
    main()
