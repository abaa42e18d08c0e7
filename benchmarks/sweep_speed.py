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
so the separate runs are, if anything, the lighter per-cell workload. The sweep
runs with its defaults, so collapsed cells (validation top-1 below half the FP32
model's with 99.9 % confidence) stop after 1,000 validation and 1,000 test images;
the table says how many did, and ``--also-full`` adds a ``--full-eval`` run that
measures every cell on every image.

Target: the 5x5 grid (W, A in {1, 2, 4, 8, 16}) on the Fashion-MNIST
MobileNet-v2 (width 0.5; 5,000 validation + 10,000 test images) in under
3 minutes on 2 CPU cores, on every CPU kind. Each kind of machine keeps its
own section (``sweep_speed_<kind>``, see ``_common.machine_key``).

    python benchmarks/sweep_speed.py            # full: writes the sweep_speed section of BENCHMARKS.md
    python benchmarks/sweep_speed.py --quick    # tiny checkpoint, 2x1 grid, 500 images; prints only
    python benchmarks/sweep_speed.py --skip-separate --repeats 1 --also-full   # screened and full sweeps

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

from bitsweep.sweep.results import read_results

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


def _stopped_cells(results: Path) -> int:
    """How many cells of a finished sweep stopped early (collapsed)."""
    return sum(1 for r in read_results(results).rows if r.get("stopped_early"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="tiny checkpoint and grid: checks the script, publishes nothing"
    )
    parser.add_argument("--jobs", type=int, default=2, help="sweep workers (one per core)")
    parser.add_argument("--skip-separate", action="store_true", help="time only the sweep")
    parser.add_argument("--repeats", type=int, default=2, help="sweep runs (each from scratch; all are reported)")
    parser.add_argument("--also-full", action="store_true", help="also time one sweep with --full-eval")
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
    sweeps: list[tuple[str, float]] = []
    runs = [("", sweep_cmd)] * args.repeats + ([("full", [*sweep_cmd, "--full-eval"])] if args.also_full else [])
    for i, (kind, cmd) in enumerate(runs):
        shutil.rmtree(out / "sweep", ignore_errors=True)  # from scratch: nothing to resume
        with tempfile.TemporaryDirectory() as cache:
            seconds = _timed(cmd, cache)
        stopped = _stopped_cells(out / "sweep" / "results.jsonl")
        what = ("`--full-eval`: every cell on every image" if kind else
                f"{stopped} collapsed cell(s) stopped after 1,000 val + 1,000 test images")  # fmt: skip
        sweeps.append((f"`bitsweep sweep` run {i + 1} (FP32 + all cells, val + test each; {what})", seconds))
        print(f"sweep {i + 1}/{len(runs)} of {cells} cells (+ FP32 baseline), {what}: {seconds:.1f} s", flush=True)

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

    rows = [[name, f"{t:.1f}", f"{t / (cells + 1):.1f}"] for name, t in sweeps]
    default_runs = [t for name, t in sweeps if "--full-eval" not in name]
    if separate_s is not None:
        rows.append(
            [f"{cells} separate `bitsweep quantize` processes", f"{separate_s:.1f}", f"{separate_s / cells:.1f}"]
        )
    verdict = "meets" if max(default_runs) < TARGET_SECONDS else "MISSES"
    shown_ckpt = Path(ckpt).relative_to(ROOT) if Path(ckpt).is_relative_to(ROOT) else ckpt
    text = "\n".join([
        f"### Sweep speed: 5x5 grid vs separate processes ({machine_key()})",
        "",
        header(" ".join(["python", "benchmarks/sweep_speed.py", *(argv if argv is not None else sys.argv[1:])])),
        md_table(["what", "seconds", "seconds per cell"], rows),
        "",
        f"The sweep, with its defaults, {verdict} the target of {TARGET_SECONDS / 60:.0f} minutes for the 5x5 grid "
        f"in every run ({len(default_runs)} runs, each with an empty compile cache; checkpoint `{shown_ckpt}`)"
        + ("." if verdict == "meets" else
           f": the slowest run took {max(default_runs):.0f} s, {max(default_runs) / TARGET_SECONDS:.1f}x the target."),
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
