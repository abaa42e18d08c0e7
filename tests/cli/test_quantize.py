"""The ``bitsweep quantize`` command end to end on a tiny synthetic checkpoint, and its user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bitsweep.cli import main
from bitsweep.data import load_dataset


def test_quantize_writes_checkpoint_and_record(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q.pt"
    rc = main(["quantize", str(checkpoint), "--weight_quant_bits", "4", "--activation-bits", "8",
               "--calib-batches", "1", "--batch-size", "64", "--override", "features.0*=8,8", "--output", str(out),
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "weight quantizers" in text and "activation quantizers" in text and "test" in text
    state = torch.load(out, weights_only=True)
    assert state["format"] == "bitsweep-quantized" and state["quant_config"]["weight"]["bits"] == 4
    assert state["quantizers"]["features.0.0"]["bits"] == 8
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["summary"]["weight_quantizers"] and 0 <= record["quantized"]["test"]["top1"] <= 100
    assert record["quant_config"]["method"] == "rtn" and record["calibration_batches"] == 1


def test_observer_for_weights_and_activations_apart(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """``--observer mse/minmax`` reaches the recorded config: MSE weight scales, min-max activation ranges."""
    out = tmp_path / "q.pt"
    rc = main(["quantize", str(checkpoint), "--weight-bits", "2", "--observer", "mse/minmax", "--calib-batches", "1",
               "--output", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    config = json.loads(out.with_suffix(".json").read_text())["quant_config"]
    assert (config["weight_observer"], config["activation_observer"]) == ("mse", "minmax")


def test_calibration_batches_recorded_as_seen(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """Asking for 1000 batches of a 500-image split in batches of 100 calibrates on (and records) 5."""
    out = tmp_path / "q.pt"
    rc = main(["quantize", str(checkpoint), "--calib-batches", "1000", "--batch-size", "100", "--output", str(out),
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    assert "calibrated on 5 batches" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["calibration_batches"] == 5


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weight-bits", "0"], "1 to 16"),
        (["--activation-bits", "17"], "1 to 16"),
        (["--observer", "bogus"], "observer"),
        (["--observer", "mse/minmax/mse"], "WEIGHTS/ACTIVATIONS"),
        (["--method", "bogus"], "unknown post-training method 'bogus'; choose one of rtn"),
        (["--calib-batches", "0"], "calib-batches"),
        (["--override", "nonsense"], "PATTERN"),
        (["--override", "*=skip"], "nothing was quantized"),
    ],
)
def test_bad_input_is_one_line_error(checkpoint: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "q.pt"
    rc = main(["quantize", str(checkpoint), "--calib-batches", "1", "--output", str(out), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_fractional_bits_rejected_by_parser(checkpoint: Path, capsys) -> None:
    assert main(["quantize", str(checkpoint), "--weight-bits", "2.5"]) == 2
    assert "invalid int value" in capsys.readouterr().err


def test_quantized_checkpoint_round_trips(checkpoint: Path, tmp_path: Path) -> None:
    from bitsweep.artifacts import load, quantized_state, save_quantized
    from bitsweep.data import TensorLoader
    from bitsweep.quant import QuantConfig, ptq
    from bitsweep.training import load_model
    from bitsweep.training.checkpoint import load_checkpoint

    model, info = load_model(checkpoint)
    splits = load_dataset(info.data)
    x = TensorLoader(splits.test, 32, mean=info.mean, std=info.std)
    batch = next(iter(x))[0]
    cfg = QuantConfig.from_bits(3, 5, "per_tensor", "percentile")
    result = ptq(model, cfg, x, num_batches=2)
    assert result.calibration_batches == 2
    summary = result.summary
    path = save_quantized(tmp_path / "q.pt", quantized_state(model, cfg, load_checkpoint(checkpoint), summary))
    loaded = load(path)
    assert loaded.kind == "quantized" and loaded.quant_config.weight.granularity == "per_tensor"
    torch.testing.assert_close(loaded.model(batch), model(batch), atol=0, rtol=0)
