"""What a 4-bit network input costs at W4A4: round to nearest with MSE ranges, integer-exact test top-1.

Three configurations of the same checkpoint, calibrated on the first 2,048 training images: uniform W4A4; the
first layer's weights and its input (the network input) at 8 bits; and the classifier at 8 bits as well. Published
W4A4 results keep the first (and last) layer at 8 bits, so this shows how much of the uniform cell's loss is the
input's. Prints only (BENCHMARKS.md `qat_bias_rounding` quotes it).

    python benchmarks/input_bits.py [--checkpoint benchmarks/work/fmnist_mbv2/best.pt]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitsweep.artifacts import load  # noqa: E402
from bitsweep.backend.simulate import evaluation_model  # noqa: E402
from bitsweep.data import load_dataset  # noqa: E402
from bitsweep.quant import LayerOverride, QuantConfig, ptq  # noqa: E402
from bitsweep.sweep.evaluate import accuracy, normalize  # noqa: E402
from bitsweep.training import checkpoint_info  # noqa: E402

VARIANTS: dict[str, tuple[LayerOverride, ...]] = {
    "uniform W4A4": (),
    "first layer and input at 8 bits": (LayerOverride("features.0.0", weight_bits=8, activation_bits=8),),
    "and the classifier at 8 bits": (
        LayerOverride("features.0.0", weight_bits=8, activation_bits=8),
        LayerOverride("classifier*", weight_bits=8, activation_bits=8),
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="benchmarks/work/fmnist_mbv2/best.pt")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load(args.checkpoint, "cpu", expect="float")
    info = checkpoint_info(loaded.meta)
    splits = load_dataset(dataclasses.replace(info.config.data, download=False), info.config.seed)
    cpu = torch.device("cpu")
    calib = normalize(splits.train.images[:2048], splits.mean, splits.std, cpu)
    test_x = normalize(splits.test.images, splits.mean, splits.std, cpu)
    base = QuantConfig.from_bits(4, 4, observer="mse")
    for name, overrides in VARIANTS.items():
        config = dataclasses.replace(base, overrides=overrides)
        model = ptq(copy.deepcopy(loaded.model).eval(), config, [calib[i : i + 256] for i in range(0, 2048, 256)]).model
        evaluated, simulation = evaluation_model(model, test_x[:1], None)
        top1, _ = accuracy(evaluated, test_x, splits.test.labels, 200)
        print(f"{name:34s} test top-1 {top1:6.2f} %  ({simulation}, {len(splits.test.labels)} images)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
