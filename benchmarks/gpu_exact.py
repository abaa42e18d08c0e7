"""The integer-exact simulation on a CUDA GPU: still bit-identical to the CPU integer reference?

On GPUs cuDNN may run float32 convolutions in TF32 (10-bit mantissa) and
autocast may pick bf16; either would break the exactness of integer sums in
float32. ``bitsweep.backend.simulate`` turns both off inside the simulation.
This script checks the result: a width-0.5 MobileNet-v2 (random weights and
BatchNorm statistics, 28x28 inputs) quantized at W8A8, W4A8 and W2A4, its
simulation on the GPU (eager, under bf16 autocast, and compiled) against the
int64 reference on the CPU, on 512 random images; plus images/s of the
simulation vs fake-quant on the GPU.

On the GPU machine (bitsweep is imported from ``src/`` when not installed)::

    python benchmarks/gpu_exact.py --out "$OUT"      # writes $OUT/gpu_exact.json, prints a table

Here, with the JSON fetched::

    python -m benchmarks.gpu_exact --write PATH/gpu_exact.json   # rewrites the gpu_exact section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def _model(bits: tuple[int, int]) -> nn.Module:
    from bitsweep.models import create_model
    from bitsweep.quant import QuantConfig, ptq

    torch.manual_seed(0)
    model = create_model("mobilenetv2", 10, 1, width=0.5).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    return ptq(model, QuantConfig.from_bits(*bits), [torch.randn(64, 1, 28, 28, generator=g) for _ in range(4)]).model


def _rate(fn: Any, x: torch.Tensor, reps: int = 20) -> float:
    fn(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn(x)
    torch.cuda.synchronize()
    return reps * x.shape[0] / (time.perf_counter() - start)


def measure() -> dict[str, Any]:
    from bitsweep.backend.intref import run_integer
    from bitsweep.backend.simulate import CompiledRunner, simulate

    dev = torch.device("cuda")
    x = torch.randn(512, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    rows = []
    runner = CompiledRunner(batch_size=256)  # one for all configurations, as in a sweep: compiled once
    for bits in [(8, 8), (4, 8), (2, 4)]:
        model = _model(bits)
        ref = run_integer(model, x)  # CPU, int64
        model = model.to(dev)
        xd = x.to(dev)
        sim = simulate(model, xd[:1])
        eager = sim(xd).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            under_autocast = sim(xd).cpu()
        start = time.perf_counter()
        compiled = torch.cat([runner(sim, xd[i : i + 256]) for i in range(0, 512, 256)]).cpu()
        compile_s = time.perf_counter() - start
        with torch.no_grad():
            fq = model(xd).float().cpu()
            fq_rate = _rate(model, xd[:256])
        rows.append({
            "config": f"W{bits[0]}A{bits[1]}",
            "images": x.shape[0],
            "eager_equal": bool(torch.equal(eager, ref)),
            "autocast_equal": bool(torch.equal(under_autocast, ref)),
            "compiled_equal": bool(torch.equal(compiled, ref)),
            "max_abs_diff_eager": float((eager - ref).abs().max()),
            "fakequant_same_prediction_pct": 100.0 * float((fq.argmax(1) == ref.argmax(1)).float().mean()),
            "fakequant_max_abs_diff": float((fq - ref).abs().max()),
            "first_call_s": compile_s,
            "sim_eager_img_s": _rate(sim, xd[:256]),
            "sim_compiled_img_s": _rate(functools.partial(runner, sim), xd[:256]),
            "fakequant_img_s": fq_rate,
        })  # fmt: skip
        print(rows[-1], flush=True)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    head = ["config", "images", "eager == reference", "bf16 autocast == reference", "compiled == reference",
            "fake-quant same prediction %", "fake-quant max abs diff", "first compiled call s", "sim eager img/s",
            "sim compiled img/s", "fake-quant img/s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        vals = [r["config"], str(r["images"]), str(r["eager_equal"]), str(r["autocast_equal"]),
                str(r["compiled_equal"]), f"{r['fakequant_same_prediction_pct']:.1f}",
                f"{r['fakequant_max_abs_diff']:.3g}", f"{r['first_call_s']:.1f}", f"{r['sim_eager_img_s']:,.0f}",
                f"{r['sim_compiled_img_s']:,.0f}", f"{r['fakequant_img_s']:,.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for gpu_exact.json (GPU machine)")
    parser.add_argument("--write", default=None, help="a fetched gpu_exact.json: rewrite the BENCHMARKS.md section")
    args = parser.parse_args()
    if args.write:
        from benchmarks._common import update_section

        result = json.loads(Path(args.write).read_text())
        text = "\n".join([
            "### Integer-exact simulation on a GPU",
            "",
            "Command: `python benchmarks/gpu_exact.py --out DIR` on the GPU machine, then "
            "`python -m benchmarks.gpu_exact --write DIR/gpu_exact.json`  ",
            f"Date: {result['date']}  ",
            f"Machine: {result['gpu']}, torch {result['torch']}",
            "",
            table(result),
            "",
            "Width-0.5 MobileNet-v2 with random weights and BatchNorm statistics on 28x28 random images (the GPU "
            "machine has no datasets); reference = bitsweep.backend.intref on the CPU (int64).",
        ])  # fmt: skip
        update_section("gpu_exact", text)
        print(text)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    result = measure()
    print(table(result))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_exact.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
