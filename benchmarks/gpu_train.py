"""MobileNet-v2 x1.0 training speed on one CUDA GPU: eager vs torch.compile, fp32 vs bf16 autocast.

Trains on Fashion-MNIST with bitsweep's own training API (``bitsweep.training.fit``)
in four configurations, a few epochs each, and records per-epoch wall time and
training images/s. The first epoch of a compiled run includes compilation, so
both the first and the last epoch are reported; the last one is the
steady-state speed.

Two steps, because the GPU machine has no internet and only a short lease:

1. On the GPU machine (its own python with CUDA torch; bitsweep is imported
   from ``src/`` when not installed)::

       python benchmarks/gpu_train.py --data-dir DIR_WITH_4_IDX_GZ --out "$OUT"

   writes ``$OUT/gpu_train.json`` and prints a markdown table. The whole run
   takes well under 6 minutes on an H100/H200 (2 epochs x 4 configurations,
   including two compilations).
2. Here, with the JSON fetched::

       python -m benchmarks.gpu_train --write PATH/gpu_train.json

   rewrites the ``gpu_train`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:  # the GPU machine runs a bare python without bitsweep installed
    import bitsweep  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

CONFIGS: tuple[tuple[str, bool, bool], ...] = (  # (name, compile, bf16 autocast)
    ("eager fp32", False, False),
    ("eager bf16", False, True),
    ("compile fp32", True, False),
    ("compile bf16", True, True),
)


def run_config(
    name: str, compile_: bool, amp: bool, args: argparse.Namespace, splits: Any, tmp: Path
) -> dict[str, Any]:
    """Train one configuration and return its per-epoch timings (or the error that stopped it)."""
    from bitsweep.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from bitsweep.training import fit

    config = RunConfig(
        data=DataConfig(name="fashion_mnist", data_dir=args.data_dir, download=False),
        model=ModelConfig(name="mobilenetv2", width=args.width),
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=0.0, lr=0.05,
                          compile=compile_, amp=amp, tensorboard=False, wandb=False),
        seed=0, device=args.device, output_dir=str(tmp), run_name=name.replace(" ", "_"),
    )  # fmt: skip
    walls: list[float] = []
    last = [time.perf_counter()]

    def on_epoch(epoch: int, row: dict[str, Any]) -> None:
        now = time.perf_counter()
        walls.append(now - last[0])
        last[0] = now

    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        result = fit(config, splits=splits, callbacks=[on_epoch], progress=False)
    except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
        return {"name": name, "compile": compile_, "amp": amp, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
    epochs = [
        {"epoch": int(r["epoch"]), "train_images_per_s": float(r["train_images_per_s"]),
         "epoch_seconds": float(r["epoch_seconds"]), "wall_seconds": w, "val_top1": float(r["val_top1"])}
        for r, w in zip(result.metrics, walls, strict=True)  # one callback per logged epoch
    ]  # fmt: skip
    return {"name": name, "compile": compile_, "amp": amp, "epochs": epochs, "test_top1": result.test.top1,
            "total_seconds": time.perf_counter() - start}  # fmt: skip


def markdown(results: dict[str, Any]) -> str:
    """The table of one results JSON (what ``--write`` puts into BENCHMARKS.md)."""
    head = ["Configuration", "Epoch 1 s (incl. compile)", "Epoch 1 img/s", f"Epoch {results['epochs']} s",
            f"Epoch {results['epochs']} train img/s", "Speed-up vs eager fp32", "Test top-1 %"]  # fmt: skip
    rows = []
    base = None
    for r in results["runs"]:
        if "error" in r:
            rows.append([r["name"], "failed", "-", "-", "-", "-", r["error"].splitlines()[0][:150]])
            continue
        first, final = r["epochs"][0], r["epochs"][-1]
        base = base or final["train_images_per_s"]
        rows.append([r["name"], f"{first['epoch_seconds']:.1f}", f"{first['train_images_per_s']:,.0f}",
                     f"{final['epoch_seconds']:.1f}", f"{final['train_images_per_s']:,.0f}",
                     f"{final['train_images_per_s'] / base:.2f}x", f"{r['test_top1']:.2f}"])  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    env = results["environment"]
    return (
        f"Command: `{results['command']}` (then `python -m benchmarks.gpu_train --write gpu_train.json`)  \n"
        f"Date: {results['date']}  \n"
        f"Machine: {env['device_name']}, CUDA {env['cuda']}, torch {env['torch']}, Python {env['python']}; "
        f"TF32 matmul {env['tf32_matmul']}, cuDNN TF32 {env['tf32_cudnn']}\n\n"
        f"MobileNet-v2 width {results['width']} on Fashion-MNIST ({results['train_images']} training images, "
        f"batch {results['batch_size']}), {results['epochs']} epochs per configuration, one run each. "
        "Epoch seconds include the validation pass; img/s counts training steps only. "
        "bf16 = `train.amp=true` (bf16 autocast), compile = `train.compile=true` (default torch.compile mode).\n\n"
        + "\n".join(out)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Either train the four configurations on CUDA (``--out``) or write the section (``--write``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", type=Path, help="results JSON to turn into the gpu_train section of BENCHMARKS.md")
    p.add_argument("--out", type=Path, help="folder for gpu_train.json (e.g. $OUT on the GPU machine)")
    p.add_argument("--data-dir", help="folder holding the four Fashion-MNIST IDX .gz files")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--configs", default=",".join(c[0].replace(" ", "_") for c in CONFIGS),
                   help="comma-separated subset, e.g. eager_fp32,compile_bf16")  # fmt: skip
    p.add_argument("--train-images", type=int, default=None, help="use only the first N training images (checks)")
    p.add_argument("--eval-images", type=int, default=None, help="use only the first N val/test images (checks)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # 'cpu' only to check the script itself
    args = p.parse_args(argv)

    if args.write is not None:
        sys.path.insert(0, str(ROOT))
        from benchmarks._common import update_section

        update_section("gpu_train", markdown(json.loads(args.write.read_text())))
        print(f"wrote the gpu_train section of BENCHMARKS.md from {args.write}")
        return 0
    if args.out is None or args.data_dir is None:
        p.error("training needs --out and --data-dir (or use --write RESULTS.json)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"gpu_train needs a CUDA GPU, but torch {torch.__version__} sees none "
                         f"(torch.version.cuda={torch.version.cuda}); run it on the GPU machine")  # fmt: skip
    from bitsweep.config import DataConfig
    from bitsweep.data import load_dataset

    splits = load_dataset(DataConfig(name="fashion_mnist", data_dir=args.data_dir, download=False), seed=0)
    if args.train_images is not None:
        splits = dataclasses.replace(splits, train=splits.train.subset(slice(0, args.train_images)))
    if args.eval_images is not None:
        cut = slice(0, args.eval_images)
        splits = dataclasses.replace(splits, val=splits.val.subset(cut), test=splits.test.subset(cut))
    wanted = {c.strip() for c in args.configs.split(",")}
    cuda = args.device.startswith("cuda")
    results: dict[str, Any] = {
        "command": "python benchmarks/gpu_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "epochs": args.epochs, "batch_size": args.batch_size, "width": args.width,
        "train_images": len(splits.train), "eval_images": len(splits.test),
        "environment": {
            "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "CPU",
            "cuda": torch.version.cuda, "torch": torch.__version__, "python": platform.python_version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        },
        "runs": [],
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # run directories (checkpoints) are not kept
        for name, compile_, amp in CONFIGS:
            if name.replace(" ", "_") not in wanted:
                continue
            print(f"[gpu_train] {name} ...", flush=True)
            r = run_config(name, compile_, amp, args, splits, Path(tmp))
            results["runs"].append(r)
            print(f"[gpu_train] {name}: {r.get('error') or r['epochs'][-1]}", flush=True)
            (args.out / "gpu_train.json").write_text(json.dumps(results, indent=2))  # partial results survive
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
