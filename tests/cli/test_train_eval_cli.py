"""bitsweep train / eval / quickstart from the command line: outputs and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from bitsweep.artifacts import save_checkpoint
from bitsweep.cli import main
from bitsweep.cli.quickstart import quickstart_config
from bitsweep.config import DataConfig, ModelConfig, RunConfig, from_dict, to_dict
from bitsweep.data import load_dataset
from bitsweep.models import create_model
from bitsweep.runtime import torch_threads

ROOT = Path(__file__).resolve().parents[2]

# A two-epoch VGG run on the synthetic data: a few seconds on one core.
TINY = ["--dataset", "synthetic", "--model", "vgg16", "--width", "0.125", "--epochs", "2", "--batch-size", "64",
        "--device", "cpu", "--quiet", "--set", "train.warmup_epochs=0.5", "--set", "train.tensorboard=false",
        "--set", "train.eval_batch_size=256"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Single-threaded: on a shared CPU, OpenMP sync makes small kernels far slower."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli")
    assert main(["train", *TINY, "--output-dir", str(out), "--run-name", "tiny"]) == 0
    return out / "tiny"


def _error(capsys: pytest.CaptureFixture[str], argv: list[str], command: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bitsweep {command}: error: ") and "Traceback" not in err
    assert len(err.splitlines()) == 1
    return err


def test_train_writes_run_dir_and_prints_accuracies(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("best.pt", "last.pt", "eval.json", "metrics.csv", "config.yaml", "curves.png"):
        assert (trained / name).is_file()
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved["model"] == {"name": "vgg16", "width": 0.125, "dropout": 0.2}
    assert saved["train"]["epochs"] == 2 and saved["train"]["warmup_epochs"] == 0.5


def test_train_prints_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", *TINY, "--epochs", "1", "--output-dir", str(tmp_path), "--run-name", "one"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"run directory: {tmp_path / 'one'}" in out and "test top-1" in out


def test_eval_table_and_json(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(trained / "best.pt"), "--device", "cpu", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    saved = json.loads((trained / "eval.json").read_text())
    # the same held-out validation images and the same weights give the same numbers
    assert results["val"]["top1"] == pytest.approx(saved["val"]["top1"])
    assert results["test"]["top1"] == pytest.approx(saved["test"]["top1"])
    assert results["test"]["images"] == saved["test"]["images"] > 0
    assert main(["eval", str(trained), "--device", "cpu", "--batch-size", "50"]) == 0
    table = capsys.readouterr().out
    assert "top-1 %" in table and "\nval " in table and "\ntest " in table


def test_resume_a_finished_run_changes_nothing(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.load(trained / "last.pt", weights_only=True)["model_state"]
    assert main(["train", "--resume", str(trained), "--quiet", "--device", "cpu"]) == 0
    after = torch.load(trained / "last.pt", weights_only=True)["model_state"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model", "resnet99", "--dataset", "synthetic"], "unknown model 'resnet99'"),
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--dataset", "synthetic", "--epochs", "0"], "epochs must be a positive whole number, got 0"),
        (["train", "--dataset", "synthetic", "--epochs", "-3"], "epochs must be a positive whole number, got -3"),
        (["train", "--set", "train.epohcs=3"], "did you mean 'epochs'"),
        (["train", "--config", "no/such.yaml"], "not found"),
        (["eval", "no/such/best.pt"], "not found"),
        (["quickstart", "--epochs", "0"], "--epochs must be a positive whole number"),
    ],
)
def test_bad_input_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    command = argv[0]
    assert message in _error(capsys, argv, command)


def test_missing_data_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # CIFAR is not installed on the test machines and download=false forbids fetching it
    argv = ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--set", "data.download=false",
            "--epochs", "1", "--width", "0.125", "--output-dir", str(tmp_path / "runs")]  # fmt: skip
    err = _error(capsys, argv, "train")
    assert "cifar" in err.lower()
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_checkpoint_of_another_architecture(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["eval", str(trained / "best.pt"), "--model", "resnet20", "--device", "cpu"], "eval")
    assert "holds model vgg16" in err and "model resnet20 was expected" in err
    err = _error(capsys, ["train", "--resume", str(trained), "--model", "resnet20", "--quiet"], "train")
    assert "holds model vgg16" in err


def test_checkpoint_of_another_class_count(trained: Path, tmp_path: Path, capsys) -> None:
    state = torch.load(trained / "best.pt", weights_only=True)
    state["config"]["data"]["name"] = "digits"  # digits has 10 classes too, but 1 input channel
    torch.save(state, tmp_path / "relabelled.pt")
    err = _error(capsys, ["eval", str(tmp_path / "relabelled.pt"), "--device", "cpu"], "eval")
    assert "3 input channels" in err and "1 input channels was expected" in err


def test_corrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "best.pt").write_bytes(b"\x00" * 100)
    assert "corrupt" in _error(capsys, ["eval", str(tmp_path / "best.pt")], "eval")


def test_quickstart_recipe_file_matches_the_code() -> None:
    from_file = from_dict(RunConfig, yaml.safe_load((ROOT / "configs" / "quickstart_digits.yaml").read_text()))
    assert to_dict(from_file) == to_dict(quickstart_config())


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_recipe_parses(name: str) -> None:
    data = yaml.safe_load((ROOT / "configs" / name).read_text())
    if {"data", "model", "train"} & set(data):  # training recipes (quantization recipes belong to others)
        from_dict(RunConfig, data)


def test_quickstart_one_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["quickstart", "--output-dir", str(tmp_path), "--epochs", "1", "--device", "cpu", "--quiet", "--no-sweep"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "quickstart-digits-mobilenetv2"
    assert f"run directory: {run_dir}" in out and (run_dir / "best.pt").is_file()
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["test"]["images"] == 360  # digits test split


@pytest.mark.parametrize("value, what", [(float("nan"), "2 NaN values"), (float("inf"), "2 infinite values")])
def test_damaged_weights_stop_every_command_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: float, what: str
) -> None:
    config = RunConfig(data=DataConfig(name="synthetic"), model=ModelConfig(width=0.25))
    splits = load_dataset(config.data)
    model = create_model("mobilenetv2", splits.num_classes, splits.in_channels, width=0.25)
    state = model.state_dict()
    key = "features.3.conv.0.0.weight"
    state[key].view(-1)[:2] = value
    ckpt = tmp_path / "run" / "best.pt"
    save_checkpoint(ckpt, {"config": to_dict(config), "dataset": splits.meta(), "model_state": state, "epoch": 1,
                           "metrics": {}})  # fmt: skip
    want = (f"layer {key} has {what}; the checkpoint is damaged or training diverged; retrain or pick an "
            "earlier checkpoint")  # fmt: skip
    out = tmp_path / "out"
    bits = ["--weight-bits", "4", "--activation-bits", "8"]
    commands = {"eval": [], "quantize": ["--output", str(out / "q.pt")],
                "export": [*bits, "--output", str(out / "m.st")], "sweep": [*bits, "--output", str(out)]}  # fmt: skip
    for command, extra in commands.items():
        assert _error(capsys, [command, str(ckpt), *extra], command) == f"bitsweep {command}: error: {want}"
    assert not out.exists() and sorted(p.name for p in ckpt.parent.iterdir()) == ["best.pt"]
