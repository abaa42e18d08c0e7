"""bitsweep side by side with what users would pick instead: accuracy retention and file size.

Every tool quantizes THE FP32 Fashion-MNIST MobileNet-v2 checkpoint
(``benchmarks/fmnist_model.py``) with the same calibration images and is
scored on the same test images, at W8A8, W4A8, W4A4 and W2A8:

* bitsweep with each observer (minmax, moving_average, percentile, mse);
* PyTorch's own int8 PTQ (torch.ao FX graph mode, x86 backend; W8A8 only);
* Brevitas and NNCF PTQ, run in ``benchmarks/work/tools-venv`` (see ``compare_external``);
* the assignment's reference quantizer (``reference_quantizer``).

A tool that cannot be installed or cannot do a setting gets a row that says
why. Writes the ``compare_accuracy`` and ``compare_size`` sections of
BENCHMARKS.md (``--quick`` writes ``benchmarks/work/BENCHMARKS.quick.md``
instead: numbers from the tiny checkpoint are never published).

    python -m benchmarks.compare_tools            # full run (about an hour on 2 CPU cores)
    python -m benchmarks.compare_tools --quick    # tiny model, 256 test images: checks every path
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks import _common
    from benchmarks.compare_runners import (
        SETTINGS,
        Row,
        guarded,
        make_row,
        run_bitsweep,
        run_fp32,
        run_reference,
        run_torch_ao,
    )
    from benchmarks.fmnist_model import benchmark_checkpoint, load_bench_data
except ImportError:  # pragma: no cover - run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import _common
    from benchmarks.compare_runners import (
        SETTINGS,
        Row,
        guarded,
        make_row,
        run_bitsweep,
        run_fp32,
        run_reference,
        run_torch_ao,
    )
    from benchmarks.fmnist_model import benchmark_checkpoint, load_bench_data

OBSERVERS = ("minmax", "moving_average", "percentile", "mse")
TOOLS = ("bitsweep", "torch_ao", "brevitas", "nncf", "reference")
EXTERNAL = {"brevitas": "Brevitas", "nncf": "NNCF"}
QUICK_MD = _common.WORK / "BENCHMARKS.quick.md"


def run_external(tool: str, args: argparse.Namespace, checkpoint: Path, work: Path) -> list[Row]:
    """Run one Brevitas/NNCF worker in the tools venv; failure to set it up becomes rows that say why."""
    from benchmarks.compare_external import ensure_tools_venv

    name = EXTERNAL[tool]
    python, log = ensure_tools_venv()
    if python is None:
        why = f"not installed beside torch 2.13: {log}"
        return [make_row(name, "not installed", s, status=why) for s in args.settings]
    out = work / f"{tool}_rows.json"
    out.unlink(missing_ok=True)
    cmd = [
        str(python), "-m", "benchmarks.compare_external", "--tool", tool, "--checkpoint", str(checkpoint),
        "--settings", ",".join(args.settings), "--calib-images", str(args.calib_images), "--out", str(out),
        "--work", str(work),
    ]  # fmt: skip
    if args.test_images is not None:
        cmd += ["--test-images", str(args.test_images)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    proc = subprocess.run(cmd, cwd=_common.ROOT, capture_output=True, text=True, check=False)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = " ".join(lines[-1:])[:300] or f"exit status {proc.returncode}"
        return [make_row(name, "?", s, status=f"failed: {why}") for s in args.settings]
    return json.loads(out.read_text())


def collect(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    """Measure every requested tool at every setting; returns the rows and the run description."""
    checkpoint = benchmark_checkpoint(args.quick)
    work = _common.WORK / ("compare_quick" if args.quick else "compare")
    work.mkdir(parents=True, exist_ok=True)
    data = load_bench_data(checkpoint, args.calib_images, args.test_images, data_dir=args.data_dir)
    rows: list[Row] = [run_fp32(checkpoint, data, work)]
    print(f"[compare] FP32 top1={rows[0]['top1']:.2f} on {data.test_images} test images", flush=True)
    for setting in args.settings:
        if "bitsweep" in args.tools:
            for obs in args.observers:
                run = functools.partial(run_bitsweep, checkpoint, data, setting, obs, work)
                rows.append(guarded("bitsweep", "?", setting, run))
                rows[-1]["method"] = rows[-1]["method"] or f"{obs} observer"
                _log(rows[-1])
        if "torch_ao" in args.tools:
            run = functools.partial(run_torch_ao, checkpoint, data, setting, work)
            rows.append(guarded("torch.ao FX", "?", setting, run))
            _log(rows[-1])
        if "reference" in args.tools:
            run = functools.partial(run_reference, checkpoint, data, setting, work)
            rows.append(guarded("reference", "assignment", setting, run))
            _log(rows[-1])
    for tool in EXTERNAL:
        if tool in args.tools:
            rows.extend(run_external(tool, args, checkpoint, work))
    info = {"checkpoint": str(checkpoint), "calib_images": data.calib_images, "test_images": data.test_images}
    (work / "rows.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    return rows, info


def _log(row: Row) -> None:
    print(f"[compare] {row['tool']} {row['setting']} {row['method']}: top1={row['top1']} {row['status']}", flush=True)


def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def accuracy_table(rows: list[Row]) -> str:
    """Top-1, drop and retention against the FP32 row, one line per tool, setting and method."""
    fp32 = rows[0]["top1"]
    out = []
    for r in rows:
        acc = r["top1"]
        drop = None if acc is None or r["tool"] == "FP32" else acc - fp32
        keep = None if acc is None or not fp32 else 100.0 * acc / fp32
        out.append([
            r["tool"], r["version"], r["setting"], r["method"] or "-", r["granularity"] or "-", _fmt(acc),
            _fmt(drop), _fmt(keep, 1), "-" if r["act_quantizers"] is None else r["act_quantizers"], r["status"],
        ])  # fmt: skip
    heads = ["Tool", "Version", "Setting", "Method", "Weights", "Top-1 %", "Δ pts", "Retention %", "Act. quantizers",
             "Status"]  # fmt: skip
    return _common.md_table(heads, out)


def size_table(rows: list[Row]) -> str:
    """Each tool's file on disk per setting, next to the FP32 state dict (bitsweep: one observer, sizes are equal)."""
    fp32_bytes = rows[0]["file_bytes"]
    out = []
    seen: set[tuple[str, str]] = set()
    for r in rows:
        if r["file_bytes"] is None or (r["tool"], r["setting"]) in seen:
            continue
        seen.add((r["tool"], r["setting"]))
        kind = r.get("file_kind") or _kind(r)
        ratio = f"{fp32_bytes / r['file_bytes']:.2f}x" if fp32_bytes else "-"
        out.append([r["tool"], r["setting"], kind, f"{r['file_bytes']:,}", f"{r['file_bytes'] / 1e6:.3f}", ratio])
    return _common.md_table(["Tool", "Setting", "File", "Bytes", "MB", "FP32 / file"], out)


def _kind(row: Row) -> str:
    return {
        "FP32": "torch.save(state_dict), float32",
        "bitsweep": "bit-packed safetensors (bitsweep.measure.save_packed)",
        "torch.ao FX": "torch.save(converted state_dict), int8 weights",
        "reference": "torch.save(fake-quant state_dict), float32 values",
    }.get(row["tool"], "")


def write(rows: list[Row], info: dict[str, Any], args: argparse.Namespace, command: str) -> Path:
    """Write both sections (to BENCHMARKS.md, or the quick scratch file with ``--quick``)."""
    path = QUICK_MD if args.quick else _common.BENCHMARKS_MD
    versions = sorted({f"{r['tool']} {r['version']}" for r in rows if r["tool"] not in ("FP32", "reference")})
    common = (
        f"Checkpoint: `{Path(info['checkpoint']).relative_to(_common.ROOT)}`; calibration: {info['calib_images']} "
        f"training images (seeded subset, the same for every tool); test: {info['test_images']} test images.  \n"
        f"Versions: {', '.join(versions)}.\n"
    )
    acc = _common.header(command) + common + "\n" + accuracy_table(rows) + "\n"
    size = _common.header(command) + common + "\n" + size_table(rows) + "\n"
    _common.update_section("compare_accuracy", acc, path)
    _common.update_section("compare_size", size, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, measure, write the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny checkpoint, few test images; writes BENCHMARKS.quick.md")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated W<b>A<b> list")
    p.add_argument("--observers", default=",".join(OBSERVERS))
    p.add_argument("--tools", default=",".join(TOOLS), help=f"subset of {','.join(TOOLS)}")
    p.add_argument("--calib-images", type=int, default=None, help="default 512 (quick: 256)")
    p.add_argument("--test-images", type=int, default=None, help="default: all 10000 (quick: 256)")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    args = p.parse_args(argv)
    args.settings = [s.strip().upper() for s in args.settings.split(",") if s.strip()]
    args.observers = [s.strip() for s in args.observers.split(",") if s.strip()]
    args.tools = [s.strip() for s in args.tools.split(",") if s.strip()]
    unknown = set(args.tools) - set(TOOLS)
    if unknown:
        p.error(f"unknown tool(s) {', '.join(sorted(unknown))}; choose from {', '.join(TOOLS)}")
    if args.calib_images is None:
        args.calib_images = 256 if args.quick else 512
    if args.quick and args.test_images is None:
        args.test_images = 256
    start = time.perf_counter()
    rows, info = collect(args)
    given = argv if argv is not None else sys.argv[1:]
    command = ("python -m benchmarks.compare_tools " + " ".join(given)).rstrip()
    print(accuracy_table(rows), "\n", size_table(rows), sep="\n")
    if not args.no_write:
        print(f"[compare] wrote {write(rows, info, args, command)}")
    print(f"[compare] done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
