"""How long the 5x5 bit-width sweep takes, against 25 separate ``bitsweep quantize`` processes.

The sweep loads the model and data once, calibrates once (statistics reused
for every bit width), normalizes the evaluation images once, and evaluates
each cell with the integer-exact simulation compiled once per worker;
separate processes redo all of that per cell. Every run starts from an
empty ``torch.compile`` cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``), as on a
new machine; the 25 separate processes share one such cache, as a user's
consecutive commands would. Both run the same cells on the same checkpoint.
Note: each sweep cell evaluates validation AND test images and writes a packed
file; ``bitsweep quantize`` evaluates what its own command does (see its docs),
so the separate runs are, if anything, the lighter per-cell workload.

Target: the 5x5 grid (W, A in {1, 2, 4, 8, 16}) on the Fashion-MNIST
MobileNet-v2 (width 0.5; 5,000 validation + 10,000 test images) in under
3 minutes on 2 CPU cores, on every CPU kind. Each kind of machine keeps its
own section (``sweep_speed_<kind>``, see ``_common.machine_key``).

    python benchmarks/sweep_speed.py            # full: writes the sweep_speed section of BENCHMARKS.md
    python benchmarks/sweep_speed.py --quick    # tiny checkpoint, 2x1 grid, 500 images; prints only

On a VNNI/AMX machine, ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/sweep_speed.py``
runs the AVX2-only code path (oneDNN's int16-pair int8 kernels with split weights, AVX2 elementwise kernels)
and writes its own section (``sweep_speed_<kind>-as-avx2``): the same instructions as an AVX2-only CPU, but
another core and memory system, so it shows the code path's cost, not that machine's time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks._common import ROOT, WORK, header, machine_key, md_table, update_section
    from benchmarks.fmnist_model import benchmark_checkpoint
except ImportError:  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._common import ROOT, WORK, header, machine_key, md_table, update_section
    from benchmarks.fmnist_model import benchmark_checkpoint

TARGET_SECONDS = 180.0  # issue 15: 3 minutes on every CPU kind


def _timed(argv: list[str], cache: str) -> float:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="tiny checkpoint and grid: checks the script, publishes nothing"
    )
    parser.add_argument("--jobs", type=int, default=2, help="sweep workers (one per core)")
    parser.add_argument("--skip-separate", action="store_true", help="time only the sweep")
    parser.add_argument("--repeats", type=int, default=2, help="sweep runs (each from scratch; all are reported)")
    args = parser.parse_args(argv)

    ckpt = benchmark_checkpoint(args.quick)
    wbits, abits = ([2, 8], [8]) if args.quick else ([1, 2, 4, 8, 16], [1, 2, 4, 8, 16])
    limit = ["--limit", "500"] if args.quick else []
    out = WORK / ("sweep_speed_quick" if args.quick else "sweep_speed")
    shutil.rmtree(out, ignore_errors=True)
    bits = lambda v: ",".join(map(str, v))  # noqa: E731
    sweep_cmd = [sys.executable, "-m", "bitsweep", "sweep", str(ckpt), "--weight-bits", bits(wbits),
                 "--activation-bits", bits(abits), "--device", "cpu", "--jobs", str(args.jobs),
                 "--output", str(out / "sweep"), "--no-report", *limit]  # fmt: skip
    print("sweep:", " ".join(sweep_cmd[2:]), flush=True)
    cells = len(wbits) * len(abits)
    sweeps = []
    for i in range(args.repeats):
        shutil.rmtree(out / "sweep", ignore_errors=True)  # from scratch: nothing to resume
        with tempfile.TemporaryDirectory() as cache:
            sweeps.append(_timed(sweep_cmd, cache))
        print(f"sweep {i + 1}/{args.repeats} of {cells} cells (+ FP32 baseline): {sweeps[-1]:.1f} s", flush=True)

    separate_s = None
    if not args.skip_separate:
        separate_s = 0.0
        with tempfile.TemporaryDirectory() as cache:
            for w in wbits:
                for a in abits:
                    cmd = [sys.executable, "-m", "bitsweep", "quantize", str(ckpt), "--weight-bits", str(w),
                           "--activation-bits", str(a), "--device", "cpu",
                           "--output", str(out / f"w{w}a{a}.pt")]  # fmt: skip
                    t = _timed(cmd, cache)
                    separate_s += t
                    print(f"bitsweep quantize W{w}A{a}: {t:.1f} s", flush=True)
        print(f"{cells} separate processes: {separate_s:.1f} s", flush=True)

    rows = [[f"`bitsweep sweep` run {i + 1} (FP32 + all cells, val + test each)", f"{t:.1f}", f"{t / (cells + 1):.1f}"]
            for i, t in enumerate(sweeps)]  # fmt: skip
    if separate_s is not None:
        rows.append(
            [f"{cells} separate `bitsweep quantize` processes", f"{separate_s:.1f}", f"{separate_s / cells:.1f}"]
        )
    verdict = "meets" if max(sweeps) < TARGET_SECONDS else "MISSES"
    shown_ckpt = Path(ckpt).relative_to(ROOT) if Path(ckpt).is_relative_to(ROOT) else ckpt
    text = "\n".join([
        f"### Sweep speed: 5x5 grid vs separate processes ({machine_key()})",
        "",
        header(" ".join(["python", "benchmarks/sweep_speed.py", *(argv if argv is not None else sys.argv[1:])])),
        md_table(["what", "seconds", "seconds per cell"], rows),
        "",
        f"The sweep {verdict} the target of {TARGET_SECONDS / 60:.0f} minutes for the 5x5 grid in every run "
        f"({len(sweeps)} runs, each with an empty compile cache; checkpoint `{shown_ckpt}`)"
        + ("." if verdict == "meets" else
           f": the slowest run took {max(sweeps):.0f} s, {max(sweeps) / TARGET_SECONDS:.1f}x the target."),
    ])  # fmt: skip
    if args.quick:
        print(text)
        print("(--quick: BENCHMARKS.md not updated)")
    else:
        update_section(f"sweep_speed_{machine_key()}", text, beside="sweep_speed_")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
