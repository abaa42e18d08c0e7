"""Post-training methods side by side: method x {W4A8, W4A4, W3A8, W3A4, W2A8, W2A4}, integer-exact, timed.

Every method quantizes the same FP32 checkpoint with the same calibration
images (the first ``--images`` unaugmented training images) through
``bitsweep.quant.ptq``; accuracies come from the integer-exact simulation on
all validation and test images. Writes the ``ptq_methods`` section of
BENCHMARKS.md.

    python benchmarks/ptq_methods.py                                  # all methods, all cells
    python benchmarks/ptq_methods.py --methods rtn,qdrop --cells 4,4  # a subset
    python benchmarks/ptq_methods.py --quick                          # tiny random model, prints only
    python benchmarks/ptq_methods.py --methods rtn,cle --granularities per_tensor,per_channel \
        --cells "8,8;6,8;4,8" --section ptq_methods_cle                 # equalization, its own section
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitsweep.backend.simulate import evaluation_model, runner_for  # noqa: E402
from bitsweep.config import DataConfig  # noqa: E402
from bitsweep.data import load_dataset  # noqa: E402
from bitsweep.models import create_model  # noqa: E402
from bitsweep.quant import LayerOverride, QuantConfig, ptq  # noqa: E402
from bitsweep.quant.config import split_observers  # noqa: E402
from bitsweep.sweep.evaluate import accuracy, normalize  # noqa: E402
from bitsweep.training import load_model  # noqa: E402

from benchmarks._common import ROOT, WORK, header, md_table, update_section  # noqa: E402

CELLS = ((4, 8), (4, 4), (3, 8), (3, 4), (2, 8), (2, 4))
METHODS = ("rtn", "bias_correction", "adaround", "brecq", "qdrop")


def _cells(text: str) -> list[tuple[int, int]]:
    return [tuple(int(b) for b in pair.split(",")) for pair in text.split(";")]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=str(WORK / "fmnist_mbv2" / "best.pt"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cells", default=";".join(f"{w},{a}" for w, a in CELLS), help="W,A pairs separated by ';'")
    p.add_argument("--images", type=int, default=1024, help="calibration / reconstruction images")
    p.add_argument("--iterations", type=int, default=None, help="reconstruction steps per unit (method default)")
    p.add_argument("--act-lr", type=float, default=None, help="activation step-size learning rate (method default)")
    p.add_argument("--eval-batch-size", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(WORK / "ptq_methods.jsonl"), help="rows, appended as they finish")
    p.add_argument("--granularities", default="per_channel", help="weight granularities, comma-separated")
    p.add_argument("--section", default="ptq_methods", help="the BENCHMARKS.md section to write")
    p.add_argument("--observer", default="minmax",
                   help="weight observer (activations too, unless given), or WEIGHTS/ACTIVATIONS")  # fmt: skip
    p.add_argument("--activation-observer", default=None, help="activation observer (default: --observer)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="PATTERN=W,A",
        help="per-layer bits, as bitsweep quantize's (e.g. 'features.0*=8,8'); rows are labelled with them",
    )
    p.add_argument("--print-only", action="store_true", help="print the table; write no BENCHMARKS section")
    p.add_argument("--brevitas", default="", help=f"also run Brevitas: comma-separated of {', '.join(BREVITAS)}")
    p.add_argument("--table", action="store_true", help="only write the section from the rows stored in --out")
    p.add_argument("--quick", action="store_true", help="tiny random model and data; prints only")
    args = p.parse_args(argv)
    try:  # 'mse/minmax' is stored like --observer mse --activation-observer minmax, so the rows match either way
        if "/" in args.observer and args.activation_observer is None:
            args.observer, args.activation_observer = split_observers(args.observer)
        overrides = tuple(LayerOverride.parse(o) for o in args.override)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    unknown = [a for a in args.brevitas.split(",") if a and a not in BREVITAS]
    if unknown:  # refused before any measurement, not after the grid
        p.error(f"--brevitas takes {', '.join(BREVITAS)}; got {', '.join(unknown)}")
    if args.table:
        stored, fp32, fp32_val = _stored(args)
        info = load_model(args.checkpoint)[1]
        n_test = len(load_dataset(dataclasses.replace(info.data, download=False), seed=info.seed).test.labels)
        text = _render(stored, fp32, fp32_val, n_test, args, argv)
        print(text)
        if not args.print_only:
            update_section(args.section, text)
        return 0
    methods, cells = [m for m in args.methods.split(",") if m], _cells(args.cells)

    if args.quick:
        splits = load_dataset(DataConfig(name="synthetic"))
        model = create_model("mobilenetv2", splits.num_classes, splits.in_channels, width=0.25).eval()
        mean, std, seed = splits.mean, splits.std, 0
        args.images, args.iterations = 64, args.iterations or 5
    else:
        model, info = load_model(args.checkpoint)
        splits = load_dataset(dataclasses.replace(info.data, download=False), seed=info.seed)
        mean, std, seed = info.mean, info.std, info.seed
    calib = normalize(splits.train.images[: args.images], mean, std, torch.device("cpu"))
    batches = [calib[i : i + 256] for i in range(0, calib.shape[0], 256)]
    val = (normalize(splits.val.images, mean, std, torch.device("cpu")), splits.val.labels)
    test = (normalize(splits.test.images, mean, std, torch.device("cpu")), splits.test.labels)
    runner = runner_for("auto", len(val[1]) + len(test[1]), args.eval_batch_size)
    fp32 = accuracy(model, *test, args.eval_batch_size)[0]
    fp32_val = accuracy(model, *val, args.eval_batch_size)[0]
    print(f"FP32 val {fp32_val:.2f} test {fp32:.2f}", flush=True)
    if not args.quick:
        _append(args.out, {"method": "fp32", "val_top1": fp32_val, "test_top1": fp32, "seed": seed})

    results: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    options = {"images": args.images, "progress": True} | ({"iterations": args.iterations} if args.iterations else {})
    options |= {"act_lr": args.act_lr} if args.act_lr is not None else {}
    granularities = args.granularities.split(",")
    labels = [(m, g) for m in methods for g in granularities]

    def cfg_of(w: int, a: int, gran: str, method: str) -> QuantConfig:
        obs, act_obs = args.observer, args.activation_observer
        return QuantConfig.from_bits(w, a, gran, obs, activation_observer=act_obs, method=method, overrides=overrides)

    for method, gran in labels:
        for w, a in cells:
            m = copy.deepcopy(model)
            start = time.perf_counter()
            qm = ptq(m, cfg_of(w, a, gran, method), batches, options=options).model
            seconds = time.perf_counter() - start
            evaluated, kind = evaluation_model(qm, val[0][:1], runner)
            row: dict[str, float | str] = {
                "method": method, "granularity": gran, "weight_bits": w, "activation_bits": a,
                "seconds": round(seconds, 1),
                "val_top1": accuracy(evaluated, *val, args.eval_batch_size)[0],
                "test_top1": accuracy(evaluated, *test, args.eval_batch_size)[0], "simulation": kind,
                "images": args.images, "seed": seed, "observer": args.observer,
                "activation_observer": args.activation_observer or args.observer,
                "iterations": args.iterations or "default",
                "act_lr": args.act_lr if args.act_lr is not None else "default",
            } | ({"overrides": list(args.override)} if args.override else {})  # fmt: skip
            results[(_label(row), gran, w, a)] = row
            print(json.dumps(row), flush=True)
            if not args.quick:
                _append(args.out, row)

    if args.brevitas:
        for algo in args.brevitas.split(","):
            for row in _brevitas_rows(algo, args, cells):
                results[(str(row["method"]), "per_channel", int(row["weight_bits"]), int(row["activation_bits"]))] = row
    text = _render(list(results.values()), fp32, fp32_val, len(test[1]), args, argv)
    print(text)
    if not (args.quick or args.print_only):
        update_section(args.section, text)
    return 0


TARGET_DROPS = {(4, 8): 0.3, (4, 4): 1.5, (3, 8): 1.0, (2, 8): 4.0, (2, 4): 6.0}  # the targets, in points
BREVITAS = {
    "recipe": "brevitas",
    "gptq": "brevitas_gptq",
    "learned_round": "brevitas_learned_round",
}  # --brevitas name -> compare_external tool


def _append(path: str, row: dict[str, Any]) -> None:
    """One JSON line at the end of --out, written as soon as the row is measured."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _brevitas_rows(algo: str, args: argparse.Namespace, cells: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Brevitas 0.13.4 on the same checkpoint and calibration images, in its own venv; rows appended to --out."""
    from benchmarks.compare_external import ensure_tools_venv

    python, log = ensure_tools_venv()
    if python is None:
        raise SystemExit(f"Brevitas is not installed beside torch: {log}")
    rows = []
    for w, a in cells:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [
                str(python), "-m", "benchmarks.compare_external", "--tool", BREVITAS[algo], "--checkpoint",
                args.checkpoint, "--settings", f"W{w}A{a}", "--calib-images", str(args.images), "--calib-first",
                "--out", str(out), "--work", tmp,
            ]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
            got = json.loads(out.read_text())[0] if out.is_file() else {"status": proc.stderr[-300:]}
        row = {
            "method": f"Brevitas {algo.replace('_', ' ')}", "granularity": "per_channel", "weight_bits": w,
            "activation_bits": a, "seconds": got.get("ptq_seconds"), "test_top1": got.get("top1"),
            "simulation": "Brevitas fake-quant (float)", "images": args.images, "status": got.get("status"),
            "detail": got.get("method"),
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        _append(args.out, row)
        rows.append(row)
    return rows


def _stored(args: argparse.Namespace) -> tuple[list[dict[str, Any]], float, float]:
    """The rows in --out measured like this invocation asks (images, steps, observers), and the FP32 row."""
    rows = [json.loads(line) for line in Path(args.out).read_text(encoding="utf-8").splitlines() if line.strip()]
    fp32 = [r for r in rows if r["method"] == "fp32"]
    if not fp32:
        raise SystemExit(f"{args.out} has no FP32 row; run the measurement first")
    same = {"images": args.images, "observer": args.observer,
            "activation_observer": args.activation_observer or args.observer}  # fmt: skip
    if args.iterations:  # else every step count, each labelled by _label
        same["iterations"] = args.iterations
    keep: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in rows:
        brevitas = r["method"].startswith("Brevitas") and r["images"] == args.images
        if brevitas or (r["method"] != "fp32" and all(r.get(k) == v for k, v in same.items())):
            keep[(_label(r), r["weight_bits"], r["activation_bits"])] = r  # the latest measurement wins
    return list(keep.values()), float(fp32[-1]["test_top1"]), float(fp32[-1]["val_top1"])


def _label(r: dict[str, Any]) -> str:
    """A row's name in the table: the method, with its weight granularity and step-size rate when not the default."""
    label = str(r["method"])
    if r.get("granularity", "per_channel") != "per_channel" and not label.startswith("Brevitas"):
        label += f" ({r['granularity']})"
    if r.get("iterations", "default") != "default" and not label.startswith("Brevitas"):
        label += f" ({r['iterations']} steps)"
    if r.get("act_lr", "default") != "default":
        label += f" (act_lr {r['act_lr']:g})"
    if r.get("overrides"):
        label += f" ({', '.join(r['overrides'])})"
    return label


def _render(
    rows: list[dict[str, Any]], fp32: float, fp32_val: float, n_test: int, args: argparse.Namespace,
    argv: list[str] | None,
) -> str:  # fmt: skip
    """The section: method x cell, test top-1 with the change from FP32, and the issue's targets."""
    order = [c for c in CELLS if any((r["weight_bits"], r["activation_bits"]) == c for r in rows)]
    order += sorted({(r["weight_bits"], r["activation_bits"]) for r in rows} - set(order), reverse=True)
    by: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(_label(r), {})[(r["weight_bits"], r["activation_bits"])] = r

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        if r.get("test_top1") is None:
            return f"failed: {str(r.get('status'))[:60]}"
        return f"{r['test_top1']:.2f} ({r['test_top1'] - fp32:+.2f})"

    def rank(label: str) -> tuple[bool, int, str]:
        name = label.split(" ")[0]
        return label.startswith("Brevitas"), METHODS.index(name) if name in METHODS else len(METHODS), label

    table: list[list[object]] = []
    for label, got in sorted(by.items(), key=lambda item: rank(item[0])):
        secs = [float(r["seconds"]) for r in got.values() if r.get("seconds") is not None]
        table.append([label, *(cell(got.get(c)) for c in order), f"{sum(secs) / max(len(secs), 1):.0f}"])
    table.append(
        [
            "target (drop)",
            *(f">= {fp32 - TARGET_DROPS[c]:.2f} (-{TARGET_DROPS[c]})" if c in TARGET_DROPS else "" for c in order),
            "",
        ]  # fmt: skip
    )
    headers = ["method"] + [f"W{w}A{a}" for w, a in order] + ["seconds per cell (mean)"]
    iters = f"{args.iterations} steps per unit" if args.iterations else "the method's steps per unit unless named"
    brevitas = ""
    if any(label.startswith("Brevitas") for label in by):
        brevitas = (
            " Brevitas rows: Brevitas 0.13.4 in its own venv (`benchmarks/compare_external.py`), calibrated on the "
            "same images, accuracy of its fake-quant model in float (it has no integer-exact path); seconds = its "
            "quantization and calibration."
        )
    command = " ".join(["python", "benchmarks/ptq_methods.py", *(argv if argv is not None else sys.argv[1:])])
    return (
        header(command)
        + f"\nTest top-1 (%), integer-exact simulation, {n_test} test images, in brackets the change from FP32 "
        f"{fp32:.2f} % (val {fp32_val:.2f} %). Calibration and reconstruction: the first {args.images} training "
        f"images, {iters}; weights per channel unless named; observers: weights {args.observer}, activations "
        f"{args.activation_observer or args.observer}; seconds = the whole `ptq` call on {args.threads} "
        f"thread(s).{brevitas}\n\n{md_table(headers, table)}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
