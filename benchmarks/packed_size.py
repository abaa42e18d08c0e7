"""Packed file size vs analytic estimate vs FP32, for MobileNet-v2 at W in {1,2,3,4,8,16} (A8).

Full run (the lead's trained Fashion-MNIST model)::

    python benchmarks/packed_size.py --checkpoint benchmarks/work/fmnist_mbv2/best.pt

Check the script quickly (random width-0.25 model, nothing written to BENCHMARKS.md)::

    python benchmarks/packed_size.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, header, md_table, update_section  # noqa: E402

from bitsweep.artifacts import ModelRecord, PackedMeta, save_packed  # noqa: E402
from bitsweep.measure.size import fp32_file_bytes, size_report  # noqa: E402
from bitsweep.quant import QuantConfig, ptq  # noqa: E402


def _float_model(args: argparse.Namespace) -> tuple[torch.nn.Module, ModelRecord, list[torch.Tensor]]:
    if args.quick:
        from bitsweep.models import create_model

        arch = ModelRecord("mobilenetv2", 10, 1, (28, 28), (0.286,), (0.353,), {"width": 0.25})
        g = torch.Generator().manual_seed(0)
        return create_model("mobilenetv2", 10, 1, width=0.25).eval(), arch, [torch.randn(16, 1, 28, 28, generator=g)]
    from bitsweep.data import TensorLoader, load_dataset
    from bitsweep.training import load_model

    model, info = load_model(args.checkpoint)
    splits = load_dataset(dataclasses.replace(info.data, download=False), seed=info.seed)
    loader = TensorLoader(splits.train, 256, mean=info.mean, std=info.std)
    batches = [x for _, (x, _) in zip(range(args.calib_batches), loader, strict=False)]
    return model, info.record, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(WORK / "fmnist_mbv2" / "best.pt"))
    parser.add_argument("--bits", default="1,2,3,4,8,16", help="weight bit widths")
    parser.add_argument("--activation-bits", type=int, default=8)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="random tiny model, W in {2,8}; prints only")
    args = parser.parse_args()
    bits = [2, 8] if args.quick else [int(b) for b in args.bits.split(",")]
    rows = []
    fp32 = None
    for w in bits:
        model, arch, batches = _float_model(args)
        config = QuantConfig.from_bits(w, args.activation_bits)
        model = ptq(model, config, batches).model
        report = size_report(model)
        fp32 = fp32 or fp32_file_bytes(model)
        with tempfile.TemporaryDirectory() as d:
            info = save_packed(model, Path(d) / "m.safetensors", PackedMeta(arch, config))
        rows.append([f"W{w}A{args.activation_bits}", f"{info.file_bytes:,}", f"{report.payload_bytes:,}",
                     f"{info.header_bytes:,}", f"{report.weight_payload_bytes:,}", f"{fp32:,}",
                     f"{fp32 / info.file_bytes:.2f}x", f"{report.weight_ratio:.2f}x",
                     f"{info.file_bytes / 1e6:.4f}"])  # fmt: skip
    table = md_table(["config", "packed file (B)", "analytic payload (B)", "header (B)", "packed weights (B)",
                      "FP32 file (B)", "model ratio", "weight ratio", "size (MB)"], rows)  # fmt: skip
    cmd = "python benchmarks/packed_size.py " + " ".join(sys.argv[1:])
    text = (f"### Packed model size (MobileNet-v2)\n\n{header(cmd)}\n{table}\n\n"
            "Packed file = the safetensors file `bitsweep export --format packed` writes (bytes on disk); "
            "analytic payload = elements x bits + qparams + biases; "
            "header = file - payload (tensor index + metadata JSON). "
            "MB = 1e6 bytes.\n")  # fmt: skip
    print(text)
    if not args.quick:
        update_section("packed_size", text)


if __name__ == "__main__":
    main()
