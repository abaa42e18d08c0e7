"""THE FP32 Fashion-MNIST MobileNet-v2 checkpoint every accuracy benchmark starts from, and its data.

One checkpoint for all accuracy tables means every tool and every bit width
is measured against the same FP32 weights, the same calibration images and
the same test images, so rows differ only in the quantizer.

* :func:`ensure_checkpoint` returns ``benchmarks/work/fmnist_mbv2/best.pt``,
  training it with the CLI command in :data:`TRAIN_COMMAND` when it is absent
  (about 12 minutes on a 2-core CPU; the lead runs it once).
* :func:`quick_checkpoint` returns a width-0.25 model trained for a few
  hundred steps, for ``--quick`` checks of the scripts (numbers from it are
  never published).
* :func:`load_bench_data` gives the calibration and test loaders.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

try:  # run as a file (python benchmarks/x.py) or as a module (python -m benchmarks.x)
    from benchmarks._common import ROOT, WORK
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks._common import ROOT, WORK

RUN_NAME = "fmnist_mbv2"
CHECKPOINT = WORK / RUN_NAME / "best.pt"
CONFIG = ROOT / "configs" / "fashion_mnist_mobilenetv2.yaml"
TRAIN_COMMAND = [
    "bitsweep", "train", "--config", "configs/fashion_mnist_mobilenetv2.yaml", "--epochs", "3", "--seed", "0",
    "--output-dir", "benchmarks/work", "--run-name", RUN_NAME,
]  # fmt: skip
QUICK_CHECKPOINT = WORK / "fmnist_mbv2_quick" / "best.pt"
CALIB_SEED = 0


def ensure_checkpoint(train: bool = True) -> Path:
    """Path of the FP32 benchmark checkpoint, training it first when it is missing.

    Args:
        train: When False, a missing checkpoint is an error instead of a 12-minute training.

    Raises:
        SystemExit: The checkpoint is missing and cannot (or may not) be made.
    """
    if CHECKPOINT.is_file():
        return CHECKPOINT
    cmd = " ".join(TRAIN_COMMAND)
    if not train:
        raise SystemExit(f"benchmark checkpoint {CHECKPOINT} is missing; make it with: {cmd}")
    if not CONFIG.is_file():
        raise SystemExit(f"cannot train the benchmark checkpoint: {CONFIG} is missing (needed by: {cmd})")
    if (WORK / RUN_NAME).exists():
        raise SystemExit(f"{WORK / RUN_NAME} exists without best.pt (an interrupted run?); remove it and rerun")
    print(f"[fmnist_model] training the benchmark checkpoint (~12 min on 2 CPU cores): {cmd}", flush=True)
    argv = [sys.executable, "-m", "bitsweep", *TRAIN_COMMAND[1:]]
    subprocess.run(argv, cwd=ROOT, check=True)
    if not CHECKPOINT.is_file():
        raise SystemExit(f"training finished but {CHECKPOINT} was not written")
    return CHECKPOINT


def quick_checkpoint(steps: int = 40, width: float = 0.25, batch_size: int = 64) -> Path:
    """A tiny Fashion-MNIST MobileNet-v2 (``width``, ``steps`` SGD steps), made once and cached.

    It exists so ``--quick`` runs check every code path in a minute or two
    without the real checkpoint. It is trained with a plain loop rather than
    ``bitsweep.training.fit`` so it needs nothing but the data and model packages.
    """
    if QUICK_CHECKPOINT.is_file():
        return QUICK_CHECKPOINT
    from bitsweep.config import DataConfig, ModelConfig, RunConfig, TrainConfig, to_dict
    from bitsweep.data import TensorLoader, load_dataset
    from bitsweep.models import create_model
    from bitsweep.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = RunConfig(
        data=DataConfig(name="fashion_mnist", download=False),
        model=ModelConfig(name="mobilenetv2", width=width),
        train=TrainConfig(epochs=1, batch_size=batch_size, lr=0.05, warmup_epochs=0.0),
        run_name="fmnist_mbv2_quick",
    )
    splits = load_dataset(config.data, seed=0)
    model = create_model("mobilenetv2", splits.num_classes, splits.in_channels, width=width)
    loader = TensorLoader(splits.train, batch_size, mean=splits.mean, std=splits.std, shuffle=True, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    start = time.perf_counter()
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 10 == 0:
                print(f"[fmnist_model] quick checkpoint: step {step}/{steps}, loss {loss.item():.3f}", flush=True)
            if step >= steps:
                break
    print(f"[fmnist_model] quick checkpoint: {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    dataset = splits.meta()
    state = {"config": to_dict(config), "dataset": dataset, "model_state": model.state_dict(), "epoch": 1}
    save_checkpoint(QUICK_CHECKPOINT, {**state, "metrics": {"steps": steps}})
    return QUICK_CHECKPOINT


def benchmark_checkpoint(quick: bool, train: bool = True) -> Path:
    """The checkpoint a benchmark uses: the tiny one with ``--quick``, else THE FP32 checkpoint."""
    return quick_checkpoint() if quick else ensure_checkpoint(train=train)


@dataclass
class BenchData:
    """The calibration and test batches shared by every accuracy benchmark, on the CPU.

    ``calib`` and ``test`` are lists of (x, y) so every tool sees exactly the
    same tensors in the same order.
    """

    calib: list[tuple[torch.Tensor, torch.Tensor]]
    test: list[tuple[torch.Tensor, torch.Tensor]]
    calib_images: int
    test_images: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    example: torch.Tensor  # one input batch of 1, for tracing


def load_bench_data(
    checkpoint: Path,
    calib_images: int = 512,
    test_images: int | None = None,
    batch_size: int = 64,
    data_dir: str | None = None,
    calib_first: bool = False,
) -> BenchData:
    """Calibration images (a seeded subset of the training split, or its first N) and the test split.

    Args:
        checkpoint: Its dataset config and normalization are used.
        calib_images: Training images used for calibration (the same for every tool).
        test_images: First N test images; None = the whole test split.
        batch_size: Batch size of both lists.
        data_dir: Where the dataset files are, overriding the checkpoint's config.
        calib_first: Take the first ``calib_images`` training images (what ``ptq_methods`` calibrates bitsweep
            on) instead of the seeded subset.
    """
    import dataclasses

    from bitsweep.data import TensorLoader, load_dataset
    from bitsweep.training.checkpoint import checkpoint_info, load_checkpoint

    info = checkpoint_info(load_checkpoint(checkpoint))
    data_config = dataclasses.replace(info.data, download=False, **({"data_dir": data_dir} if data_dir else {}))
    splits = load_dataset(data_config, seed=info.seed)
    gen = torch.Generator().manual_seed(CALIB_SEED)
    order = torch.randperm(len(splits.train), generator=gen)[:calib_images]
    calib_set = splits.train.subset(slice(0, calib_images) if calib_first else order)
    test_set = splits.test if test_images is None else splits.test.subset(slice(0, test_images))
    kw = {"mean": info.mean, "std": info.std}
    calib = list(TensorLoader(calib_set, batch_size, **kw))
    test = list(TensorLoader(test_set, batch_size, **kw))
    return BenchData(calib, test, len(calib_set), len(test_set), info.mean, info.std, calib[0][0][:1].clone())


@torch.no_grad()
def top1(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy in percent; plain loop so it works for any tool's model (GraphModule, Brevitas, NNCF)."""
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    return 100.0 * correct / max(total, 1)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="make/return the tiny width-0.25 checkpoint")
    args = parser.parse_args()
    print(benchmark_checkpoint(args.quick))
