"""Seconds per QAT training step, eager against compiled (``bitsweep qat --compile``), on real images.

One W4A4 LSQ + distillation step (student forward and backward, teacher forward, SGD) of a batch of
Fashion-MNIST training images, on the benchmark checkpoint in channels_last as ``bitsweep qat`` runs
it. Dropout is switched off so eager and compiled compute the same thing. Reports the one-off compile
time (first step) and the median of the timed steps after warm-up; writes BENCHMARKS.md ``qat_compile``.

    python benchmarks/qat_compile.py [--batch-size 128] [--steps 12] [--threads 2]
    python benchmarks/qat_compile.py --quick     # width-0.25 checkpoint, a few steps, prints only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitsweep.artifacts import load  # noqa: E402
from bitsweep.data import load_dataset  # noqa: E402
from bitsweep.models import to_channels_last  # noqa: E402
from bitsweep.qat import QATConfig, prepare_qat  # noqa: E402
from bitsweep.qat.distill import DistillationLoss  # noqa: E402
from bitsweep.quant import QuantConfig  # noqa: E402
from bitsweep.sweep.evaluate import normalize  # noqa: E402
from bitsweep.training import checkpoint_info  # noqa: E402
from bitsweep.training.compiled import CompiledOrEager  # noqa: E402

from benchmarks._common import header, md_table, update_section  # noqa: E402
from benchmarks.fmnist_model import benchmark_checkpoint  # noqa: E402


def _time_steps(
    forward: nn.Module | CompiledOrEager, params: list[nn.Parameter], loss: DistillationLoss, batches: list, warmup: int
) -> tuple[float, float]:
    """(seconds of the first step, median seconds of the steps after ``warmup``)."""
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    times = []
    for x, y in batches:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss(forward(x), y, x).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[warmup:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode (the first 3 are warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a small checkpoint and few steps; prints only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = benchmark_checkpoint(args.quick)
    loaded = load(ckpt, "cpu", expect="float")
    info = checkpoint_info(loaded.meta)
    splits = load_dataset(dataclasses.replace(info.config.data, download=False), info.config.seed)
    steps = 5 if args.quick else args.steps
    images = normalize(splits.train.images[: steps * args.batch_size], splits.mean, splits.std, torch.device("cpu"))
    images = images.contiguous(memory_format=torch.channels_last)
    labels = splits.train.labels[: steps * args.batch_size]
    batches = [
        (images[i : i + args.batch_size], labels[i : i + args.batch_size])
        for i in range(0, len(labels), args.batch_size)
    ]
    teacher = to_channels_last(copy.deepcopy(loaded.model).eval())
    loss = DistillationLoss(teacher, 2.0, 0.9, 0.0)
    warmup = min(3, steps - 2)
    rows, seconds = [], {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = copy.deepcopy(loaded.model).eval()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        prepared = prepare_qat(
            model, QuantConfig.from_bits(4, 4), [b[0] for b in batches[:2]], QATConfig(), options={"progress": False}
        )
        student = to_channels_last(prepared.model)
        forward = CompiledOrEager(student) if mode == "compiled" else student
        params = [p for p in student.parameters() if p.requires_grad]
        first, median = _time_steps(forward, params, loss, batches, warmup=warmup)
        seconds[mode] = median
        rows.append([mode, f"{first:.1f}", f"{median:.3f}", f"{args.batch_size / median:.0f}"])
        print(f"{mode:8s} first step {first:6.1f} s, then {median:.3f} s/step ({args.batch_size / median:.0f} img/s)")
    speedup = seconds["eager"] / seconds["compiled"]
    print(f"compiled steps are {speedup:.2f}x faster")
    if args.quick:
        return 0
    command = (
        f"python benchmarks/qat_compile.py --batch-size {args.batch_size} --steps {args.steps} --threads {args.threads}"
    )
    table = md_table(["training forward", "first step (s, compiling)", "s/step (median)", "images/s"], rows)
    try:
        shown = ckpt.resolve().relative_to(ROOT)
    except ValueError:
        shown = Path(ckpt.name)
    text = (
        f"{header(command)}\nOne W4A4 LSQ + distillation step of {args.batch_size} Fashion-MNIST training images "
        f"(student forward and backward, teacher forward, SGD) on `{shown}`, channels_last, dropout off, "
        f"{args.threads} thread(s); median of the steps after {warmup} warm-up steps.\n\n{table}\n\n"
        f"Compiled steps are **{speedup:.2f}x** faster; the first compiled step includes compiling.\n"
    )
    update_section("qat_compile", text, beside="qat_bias_rounding")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
