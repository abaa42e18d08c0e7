"""Training throughput: bitsweep's tensor-resident loop vs a plain eager PyTorch loop.

Both train the same model on the same images with the same crop+flip
augmentation; the baseline uses ``torch.utils.data.DataLoader`` with
per-image transforms in ``Dataset.__getitem__`` (torchvision is not
required). Writes the ``train_speed_<kind>`` section of BENCHMARKS.md (one per CPU kind,
see ``_common.machine_key``).

    python benchmarks/train_speed.py --quick     # seconds, a smoke check (does not write BENCHMARKS.md)
    python benchmarks/train_speed.py             # fashion_mnist, mobilenetv2 width 0.5, 15,360 images each
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: python benchmarks/train_speed.py
from bitsweep.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from bitsweep.data import DatasetSplits, ImageSet, load_dataset
from bitsweep.models import create_model
from bitsweep.training import fit

from benchmarks._common import header, machine_key, md_table, update_section  # noqa: E402


class PerImageDataset(torch.utils.data.Dataset):
    """The conventional pipeline: one image at a time, pad + random crop + flip, normalize."""

    def __init__(self, data: ImageSet, mean: tuple[float, ...], std: tuple[float, ...], pad: int) -> None:
        self.images, self.labels, self.pad = data.images, data.labels, pad
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i].float() / 255.0  # (C, H, W)
        _, h, w = img.shape
        if self.pad:
            img = nn.functional.pad(img, (self.pad,) * 4)
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            img = img[:, top : top + h, left : left + w]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return (img - self.mean) / self.std, self.labels[i]


def plain_epoch(config: RunConfig, data: DatasetSplits) -> tuple[float, float]:
    """One epoch of a plain eager loop; returns (seconds, images/s)."""
    torch.manual_seed(config.seed)
    tc = config.train
    model = create_model(config.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                         width=config.model.width, dropout=config.model.dropout)  # fmt: skip
    ds = PerImageDataset(data.train, data.mean, data.std, config.data.augment.crop_padding)
    loader = torch.utils.data.DataLoader(ds, batch_size=tc.batch_size, shuffle=True, drop_last=True, num_workers=0)
    opt = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=True,
                          weight_decay=tc.weight_decay)  # fmt: skip
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    model.train()
    start, seen = time.perf_counter(), 0
    for x, y in loader:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
    seconds = time.perf_counter() - start
    return seconds, seen / seconds


def main(argv: list[str] | None = None) -> int:
    """Run both loops for one epoch and record the numbers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny synthetic run; prints, writes nothing")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=15360,
                        help="train on the first N training images (an 'epoch' of N); 0 = the whole split")  # fmt: skip
    args = parser.parse_args(argv)
    name, width, batch = ("synthetic", 0.125, 32) if args.quick else (args.dataset, args.width, args.batch_size)
    config = RunConfig(
        data=DataConfig(name=name, augment=AugmentConfig(crop_padding=2, hflip=True)),
        model=ModelConfig(name=args.model, width=width, dropout=0.1),
        train=TrainConfig(epochs=1, batch_size=batch, lr=0.02, warmup_epochs=0.2, tensorboard=False),
        device="cpu",
        output_dir="benchmarks/work/train_speed",
    )
    data = load_dataset(config.data, config.seed)
    if args.train_images and not args.quick:
        # Throughput settles within a few dozen steps; the full 3-epoch time is the fmnist_train section.
        data = dataclasses.replace(data, train=data.train.subset(slice(0, args.train_images)))
    rows = []
    for channels_last in (True, False):
        cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, channels_last=channels_last))
        result = fit(cfg, splits=data, progress=not args.quick)
        row = result.metrics[0]
        rows.append([f"bitsweep fit (channels_last={channels_last})", f"{row['train_images_per_s']:.0f}",
                     f"{row['epoch_seconds']:.1f}"])  # fmt: skip
    seconds, ips = plain_epoch(config, data)
    rows.append(["plain eager loop, DataLoader + per-image transforms", f"{ips:.0f}", f"{seconds:.1f}"])
    table = md_table(["loop", "train images/s", "epoch seconds"], rows)
    print(table)
    if not args.quick:
        command = "python benchmarks/train_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = (f"### Training speed ({machine_key()})\n\n{header(command.strip())}\n"
                f"{args.model} width {width}, {name}, batch {batch}, "
                f"one pass over {len(data.train)} training images each, CPU. Epoch seconds for bitsweep include "
                f"the validation pass (5,000 images).\n\n{table}\n")  # fmt: skip
        update_section(f"train_speed_{machine_key()}", text, beside="train_speed_")
    return 0


if __name__ == "__main__":
    sys.exit(main())
