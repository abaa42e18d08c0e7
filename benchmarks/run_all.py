"""Regenerate every BENCHMARKS.md table on a fresh machine, one benchmark after another.

Runs serially (benchmarks that share the CPU would time each other), after
making sure THE FP32 Fashion-MNIST checkpoint exists (training it, about 12
minutes on 2 CPU cores, when absent). Each benchmark is its own subprocess, so
one failure is reported and the rest still run; a benchmark script that is not
in the tree is reported as missing.

    python -m benchmarks.run_all                  # everything (hours on a small CPU)
    python -m benchmarks.run_all --quick          # every script with --quick (tiny checkpoint; BENCHMARKS.quick.md)
    python -m benchmarks.run_all --only compare_tools,eval_speed
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

try:
    from benchmarks._common import ROOT
    from benchmarks.fmnist_model import CHECKPOINT, ensure_checkpoint
except ImportError:  # pragma: no cover - run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._common import ROOT
    from benchmarks.fmnist_model import CHECKPOINT, ensure_checkpoint

# In dependency order: training speed first (it needs no checkpoint), then accuracy and size, then speed.
BENCHMARKS: tuple[str, ...] = (
    "fmnist_train", "train_speed", "ptq_accuracy", "packed_size", "intref_agreement", "onnx_latency", "sweep_speed",
    "compare_tools", "eval_speed", "gpu_train", "gpu_exact",
)  # fmt: skip
NEEDS_CHECKPOINT = frozenset(
    {
        "fmnist_train",
        "ptq_accuracy",
        "packed_size",
        "intref_agreement",
        "onnx_latency",
        "sweep_speed",
        "compare_tools",
        "eval_speed",
    }
)


def cuda_available() -> bool:
    """Whether this machine can run the GPU benchmark."""
    import torch

    return torch.cuda.is_available()


def command(name: str, quick: bool, data_dir: str | None, out: Path) -> list[str]:
    """The subprocess command line of one benchmark."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}"]
    if name == "gpu_exact":  # writes JSON, then --write turns it into the section (see its docstring)
        return cmd + ["--out", str(out)]
    if name == "gpu_train":
        # gpu_train writes JSON, then --write turns it into the section (see its docstring).
        cmd += ["--data-dir", data_dir or "/usr/share/datasets/fashion-mnist", "--out", str(out)]
        if quick:
            cmd += ["--epochs", "1", "--train-images", "5120", "--eval-images", "1024"]
        return cmd
    if quick:
        return cmd + ["--quick"]
    # Every accuracy benchmark gets THE checkpoint explicitly, whatever its own default path says.
    text = (ROOT / "benchmarks" / f"{name}.py").read_text(encoding="utf-8")
    if 'add_argument("--checkpoint"' in text:
        cmd += ["--checkpoint", str(CHECKPOINT)]
    elif name == "ptq_accuracy":  # takes the checkpoint as its positional argument
        cmd += [str(CHECKPOINT)]
    return cmd


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and print a summary; exit status 1 if any failed or is missing."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (tiny model, few images)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder for gpu_train")
    p.add_argument("--no-train", action="store_true", help="fail instead of training a missing checkpoint")
    args = p.parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if not args.quick and any(n in NEEDS_CHECKPOINT for n in names):
        print(f"[run_all] checkpoint: {ensure_checkpoint(train=not args.no_train)}", flush=True)
    summary: list[tuple[str, str, float]] = []
    for name in names:
        script = ROOT / "benchmarks" / f"{name}.py"
        if not script.is_file():
            summary.append((name, f"MISSING: {script.relative_to(ROOT)} is not in the tree", 0.0))
            continue
        if name == "fmnist_train" and args.quick:
            summary.append((name, "skipped: reads the real checkpoint's run directory (no --quick form)", 0.0))
            continue
        if name in ("gpu_train", "gpu_exact") and not cuda_available():
            summary.append((name, "skipped: no CUDA GPU here (run it on the GPU machine, see docs/benchmarks.md)", 0.0))
            continue
        out = ROOT / "benchmarks" / "work" / name
        cmd = command(name, args.quick, args.data_dir, out)
        print(f"[run_all] {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        if rc == 0 and name in ("gpu_train", "gpu_exact") and not args.quick:
            rc = subprocess.run([*cmd[:3], "--write", str(out / f"{name}.json")], cwd=ROOT, check=False).returncode
        summary.append((name, "ok" if rc == 0 else f"FAILED (exit status {rc})", time.perf_counter() - start))
    print("\n[run_all] summary")
    for name, status, secs in summary:
        print(f"  {name:14s} {status}" + (f"  ({secs:.0f} s)" if secs else ""))
    return 0 if all(s == "ok" or s.startswith("skipped") for _, s, _ in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
