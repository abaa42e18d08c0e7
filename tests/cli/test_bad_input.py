"""Bad input from issue 15: each gives one line on stderr, exit status 2, and leaves no output behind."""

from __future__ import annotations

import argparse
import gzip
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitsweep.cli import main


def _fails_cleanly(argv: list[str], capsys: pytest.CaptureFixture[str], message: str, out: Path) -> str:
    """Run ``bitsweep argv``; assert exit 2, one stderr line containing ``message``, and nothing at ``out``."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0]
    assert not out.exists(), sorted(p.name for p in out.rglob("*")) if out.is_dir() else out
    return lines[0]


def _train(out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "synthetic", "--epochs", "1", "--device", "cpu", "--quiet", "--output-dir", str(out),
            *extra]  # fmt: skip


def test_set_section_to_a_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    line = _fails_cleanly(_train(out, "--set", "train=5"), capsys, "train must be a mapping of train options", out)
    assert "got 5" in line
    _fails_cleanly(["train", "--set", "model=x", "--output-dir", str(out)], capsys, "model must be a mapping", out)


def test_yaml_section_is_a_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe, out = tmp_path / "r.yaml", tmp_path / "runs"
    recipe.write_text("train: 5\n")
    _fails_cleanly(["train", "--config", str(recipe), "--output-dir", str(out)], capsys,
                   "train must be a mapping of train options", out)  # fmt: skip


def test_yaml_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe, out = tmp_path / "r.yaml", tmp_path / "runs"
    recipe.write_bytes(b"train:\n  epochs: 1  # caf\xe9 in Latin-1\n")
    line = _fails_cleanly(["train", "--config", str(recipe), "--output-dir", str(out)], capsys, "is not UTF-8", out)
    assert "0xe9" in line


def _cifar10(root: Path, data: object, labels: object) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    good = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": data, "labels": labels} if name == "data_batch_2" else good
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))


@pytest.mark.parametrize(
    ("data", "labels", "message"),
    [
        ([["x"] * 3072, ["y"] * 3072], [0, 1], "has data that are not whole numbers"),
        (np.zeros((2, 3072), np.uint8), ["cat", "dog"], "has 'labels' that are not whole numbers"),
        (np.full((2, 3072), 0.5), [0, 1], "has data that are not whole numbers"),
        (np.full((2, 3072), 300), [0, 1], "has data outside 0..255"),
    ],
)
def test_cifar_batch_with_values_that_are_not_pixels_or_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: object, labels: object, message: str
) -> None:
    _cifar10(tmp_path / "data", data, labels)
    out = tmp_path / "runs"
    line = _fails_cleanly(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--set",
                           "data.download=false", "--output-dir", str(out)], capsys, message, out)  # fmt: skip
    assert "data_batch_2" in line


def test_fashion_mnist_with_a_bad_magic_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    arrays = {"train-images-idx3-ubyte": np.zeros((3, 28, 28)), "train-labels-idx1-ubyte": np.zeros(3),
              "t10k-images-idx3-ubyte": np.zeros((2, 28, 28)), "t10k-labels-idx1-ubyte": np.zeros(2)}  # fmt: skip
    for stem, arr in arrays.items():
        ndim = 1 if stem == "train-images-idx3-ubyte" else arr.ndim  # the images file claims 1 dimension
        header = bytes([0, 0, 8, ndim]) + np.array(arr.shape[:ndim], dtype=">u4").tobytes()
        (data / (stem + ".gz")).write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))
    out = tmp_path / "runs"
    line = _fails_cleanly(["train", "--dataset", "fashion_mnist", "--data-dir", str(data), "--set",
                           "data.download=false", "--output-dir", str(out)], capsys,
                          "has magic number 00000801 (1-d), expected 00000803 (3-d)", out)  # fmt: skip
    assert "truncated" not in line and "train-images-idx3-ubyte" in line


@pytest.mark.parametrize(
    ("bits", "message"),
    [
        ("4,,8", "empty item in '4,,8'"),
        ("4,8,4", "4 given twice"),
        ("4,32", "bit width 32 in '4,32' is out of range; bit widths are 1 to 16"),
        ("0", "bit width 0 in '0' is out of range"),
        ("4,x", "expected comma-separated whole numbers"),
    ],
)
def test_sweep_bit_lists_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bits: str, message: str
) -> None:
    out = tmp_path / "sweep"
    line = _fails_cleanly(["sweep", str(tmp_path / "best.pt"), f"--weight-bits={bits}", "--output", str(out)], capsys,
                          message, out)  # fmt: skip
    assert line.startswith("bitsweep sweep: error: argument --weight-bits:")


def _blocked(tmp_path: Path) -> Path:
    """A folder that cannot be created, even by root: its parent is a regular file."""
    (tmp_path / "file.txt").write_text("not a folder")
    return tmp_path / "file.txt" / "out"


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--dataset", "synthetic", "--epochs", "1", "--output-dir", "{out}"],
        ["quickstart", "--epochs", "1", "--output-dir", "{out}"],
        ["quantize", "{ckpt}", "--output", "{out}/q.pt"],
        ["export", "{ckpt}", "--output", "{out}/m.safetensors"],
        ["sweep", "{ckpt}", "--output", "{out}"],
        ["report", "{ckpt}", "--output", "{out}"],
    ],
    ids=lambda argv: argv[0],
)
def test_unwritable_output_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    out = _blocked(tmp_path)
    ckpt = tmp_path / "best.pt"  # never read: the output check comes first
    args = [a.replace("{out}", str(out)).replace("{ckpt}", str(ckpt)) for a in argv]
    line = _fails_cleanly(args, capsys, "file.txt is a file, not a folder", out)
    assert line.startswith(f"bitsweep {argv[0]}: error: cannot write to {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the file case above covers root")
def test_read_only_output_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _fails_cleanly(["train", "--dataset", "synthetic", "--output-dir", str(locked / "runs")], capsys,
                       "Permission denied", locked / "runs")  # fmt: skip
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_help_shows_each_default_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitsweep.cli import build_parser

    monkeypatch.setenv("COLUMNS", "1000")
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for name, sub in subparsers.choices.items():
        blocks: list[str] = []
        for line in sub.format_help().split("options:", 1)[1].splitlines():
            if line.startswith("  -"):
                blocks.append(line)
            elif blocks and line.startswith("   "):
                blocks[-1] += line
        for block in blocks:
            assert len(re.findall(r"\bdefault\b", block.lower())) <= 1, f"bitsweep {name}: {block.strip()}"
            assert "(default: None)" not in block and "(default: False)" not in block, block
            checked += 1
    assert checked > 60


def test_threads_option_and_wait_policy(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["train", "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "bitsweep train: error: --threads must be a positive whole number, got 0"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice is kept
    assert main(["eval", "missing.pt", "--threads", "0"]) == 2
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.slow
def test_cli_package_does_not_load_torch_before_main_sets_the_wait_policy() -> None:
    code = "import sys, bitsweep.cli, bitsweep.__main__; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "False"
