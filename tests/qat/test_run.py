"""qat() / resume_qat() / ``bitsweep qat``: the whole run, exact resume, what other commands read, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitsweep.artifacts import load
from bitsweep.artifacts.packed_read import load_packed
from bitsweep.cli import main
from bitsweep.data import DatasetSplits
from bitsweep.errors import BitsweepError
from bitsweep.qat import QATConfig, qat, resume_qat
from bitsweep.qat.run import _run_config, _with_training_compile
from bitsweep.quant import QuantConfig
from bitsweep.quant.inspect import weight_layers
from bitsweep.training import checkpoint_info, load_checkpoint

TRAIN = {"epochs": 2, "batch_size": 32, "eval_batch_size": 64, "tensorboard": False}
QUANT = QuantConfig.from_bits(4, 4, observer="mse")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, float_checkpoint: Path, qat_splits: DatasetSplits):
    """One uninterrupted 2-epoch W4A4 LSQ run with distillation, shared by the tests below."""
    run = tmp_path_factory.mktemp("qat") / "run"
    return qat(
        float_checkpoint,
        QUANT,
        QATConfig(),
        train=TRAIN,
        run_dir=run,
        splits=qat_splits,
        progress=False,
        compile_mode="off",
    )


def test_the_run_writes_an_integer_exact_quantized_checkpoint(full_run, qat_splits: DatasetSplits) -> None:
    assert full_run.quantized == full_run.run_dir / "quantized.pt"
    assert {
        "config.yaml",
        "metrics.csv",
        "metrics.jsonl",
        "best.pt",
        "last.pt",
        "curves.png",
        "eval.json",
        "quantized.pt",
        "qat.json",
    } <= {p.name for p in full_run.run_dir.iterdir()}
    assert full_run.simulation == "integer-exact"
    assert set(full_run.accuracy) == {"float", "start", "final"}
    assert [r["epoch"] for r in full_run.fit.metrics] == [1, 2]
    assert all("val_top1" in r for r in full_run.fit.metrics)  # the quantized model's validation accuracy per epoch
    record = json.loads((full_run.run_dir / "qat.json").read_text())
    assert record["recipe"]["method"] == "lsq" and record["recipe"]["distill"] is True
    assert record["accuracy"]["final"]["test"]["top1"] == full_run.accuracy["final"]["test"].top1
    loaded = load(full_run.quantized)
    assert loaded.kind == "quantized" and loaded.quant_config is not None
    assert loaded.quant_config.weight is not None and loaded.quant_config.weight.bits == 4


def test_the_quantized_checkpoint_packs_with_identical_logits(
    full_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    assert (
        main(["export", str(full_run.quantized), "--output", str(out), "--batch-size", "32", "--check-batches", "1"])
        == 0
    )
    assert "reloaded logits identical" in capsys.readouterr().out
    record = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert record["integer_reference"]["max_logit_diff"] == 0.0
    packed, _ = load_packed(out)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load(full_run.quantized).model(x), packed(x))


def test_interrupted_and_resumed_equals_uninterrupted(
    full_run, float_checkpoint: Path, tmp_path: Path, qat_splits: DatasetSplits, interrupt_after
) -> None:
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        qat(
            float_checkpoint,
            QUANT,
            QATConfig(),
            train=TRAIN,
            run_dir=run,
            splits=qat_splits,
            progress=False,
            compile_mode="off",
            evaluate_start=False,
            callbacks=[interrupt_after(1)],
        )
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and not (run / "quantized.pt").exists()
    resumed = resume_qat(run, splits=qat_splits, progress=False, compile_mode="off")
    for name in ("last.pt", "quantized.pt"):
        want = (
            load_checkpoint(full_run.run_dir / name)
            if name == "last.pt"
            else torch.load(full_run.run_dir / name, weights_only=True)
        )
        got = load_checkpoint(run / name) if name == "last.pt" else torch.load(run / name, weights_only=True)
        assert want["model_state"].keys() == got["model_state"].keys()
        for key, value in want["model_state"].items():
            assert torch.equal(value, got["model_state"][key]), f"{name}: {key}"
    assert resumed.accuracy["final"]["test"].top1 == full_run.accuracy["final"]["test"].top1


def test_a_qat_training_state_is_not_mistaken_for_a_model(full_run) -> None:
    with pytest.raises(BitsweepError, match="training state of a QAT run.*quantized.pt"):
        load(full_run.run_dir / "best.pt")


def test_a_teacher_with_other_classes_is_refused(float_checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "teacher.pt"
    state = load_checkpoint(float_checkpoint)
    state["model_state"] = {k: (v[:3] if k.startswith("classifier") else v) for k, v in state["model_state"].items()}
    state["dataset"] = {**state["dataset"], "num_classes": 3}
    torch.save(state, other)
    with pytest.raises(BitsweepError, match="teacher .* predicts 3 classes but the model has 10"):
        qat(float_checkpoint, QUANT, QATConfig(), teacher=other, train=TRAIN, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_teacher_for_other_images_is_refused(float_checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "teacher.pt"
    state = load_checkpoint(float_checkpoint)
    state["dataset"] = {**state["dataset"], "in_channels": 1, "image_size": [28, 28], "mean": [0.5], "std": [0.25]}
    state["model_state"] = {k: (v[:, :1] if k == "features.0.0.weight" else v) for k, v in state["model_state"].items()}
    torch.save(state, other)
    with pytest.raises(BitsweepError, match="takes 1x28x28 images but the model 3x16x16"):
        qat(float_checkpoint, QUANT, QATConfig(), teacher=other, train=TRAIN, run_dir=tmp_path / "run",
            progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_resuming_something_that_is_not_a_qat_run_is_refused(float_checkpoint: Path) -> None:
    with pytest.raises(BitsweepError, match="not a QAT run"):
        resume_qat(float_checkpoint.parent)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epochs", "0"], "--epochs must be a positive whole number, got 0"),
        (["--weight-bits", "0"], "bit"),
        (["--method", "lsq", "--init", "nope"], "unknown post-training method 'nope'"),
        (["--distill-weight", "2"], "distillation weight must be in"),
    ],
)
def test_cli_bad_settings_are_one_line_and_leave_nothing(
    float_checkpoint: Path, tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["qat", str(float_checkpoint), "--run-dir", str(run), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not run.exists()


def test_cli_from_a_quantized_checkpoint_is_refused(
    full_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["qat", str(full_run.quantized), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is a quantized model file, but a float one is needed" in err and not (tmp_path / "run").exists()


def test_cli_layer_bits_of_another_architecture_is_refused(
    float_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "bits.yaml"
    plan.write_text("weight_bits: 4\nactivation_bits: 8\nweights:\n  layer1.0.conv1: 2\n")  # a ResNet layer
    assert main(["qat", str(float_checkpoint), "--layer-bits", str(plan), "--run-dir", str(tmp_path / "run")]) == 2
    assert "layer1.0.conv1" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_cli_runs_end_to_end_and_prints_the_table(
    float_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "qat",
                str(float_checkpoint),
                "--weight-bits",
                "2",
                "--activation-bits",
                "8",
                "--epochs",
                "1",
                "--method",
                "ste",
                "--no-distill",
                "--batch-size",
                "32",
                "--run-dir",
                str(run),
                "--quiet",
                "--compile",
                "off",
                "--scale-dtype",
                "float16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "PTQ start" in out and "QAT" in out and "integer-exact" in out and "model compression" in out
    assert json.loads((run / "qat.json").read_text())["recipe"]["method"] == "ste"
    quantized = load(run / "quantized.pt")
    assert quantized.quant_config is not None and quantized.quant_config.scale_dtype == "float16"
    scales = [m.weight_quantizer.scale for _, m in weight_layers(quantized.model)]
    assert all(torch.equal(s.half().float(), s) for s in scales)


@pytest.mark.slow  # torchrun: two subprocesses
def test_torchrun_two_processes_gloo(float_checkpoint: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "bitsweep",
        "qat",
        str(float_checkpoint),
        "--weight-bits",
        "4",
        "--activation-bits",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--quiet",
        "--run-dir",
        str(tmp_path / "ddp"),
        "--compile",
        "off",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    assert json.loads((run / "environment.json").read_text())["world_size"] == 2
    assert proc.stdout.count("run directory:") == 1  # only rank 0 converts, reports and writes
    assert load(run / "quantized.pt").kind == "quantized"


@pytest.mark.parametrize(
    ("mode", "epochs", "images", "asked", "compiled"),
    [
        ("auto", 3, 55_000, False, True),  # the Fashion-MNIST recipe: 3 x 429 steps
        ("auto", 1, 128 * 299 + 127, False, False),  # 299 steps: compiling would not pay
        ("auto", 1, 128 * 300, False, True),
        ("auto", 1, 256, True, True),  # the settings asked for it
        ("off", 3, 55_000, True, False),
        ("on", 1, 256, False, True),
    ],
)
def test_compile_decides_whether_the_training_forward_is_compiled(
    float_checkpoint: Path, mode: str, epochs: int, images: int, asked: bool, compiled: bool
) -> None:
    source = checkpoint_info(load(float_checkpoint, "cpu").meta).config
    config = _run_config(source, {"epochs": epochs, "batch_size": 128, "compile": asked}, Path("/nonexistent/run"))
    assert _with_training_compile(config, mode, images).train.compile is compiled
