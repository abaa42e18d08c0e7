"""Data-parallel training through torchrun: two CPU processes with the Gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitsweep.training import load_checkpoint


@pytest.mark.slow  # torchrun: two subprocesses
def test_torchrun_two_processes_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "bitsweep", "train", "--dataset", "synthetic", "--model", "vgg16", "--width", "0.125",
        "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--quiet", "--output-dir", str(tmp_path),
        "--run-name", "ddp", "--set", "train.tensorboard=false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 1
    env_json = json.loads((run / "environment.json").read_text())
    assert env_json["world_size"] == 2
    assert proc.stdout.count("run directory:") == 1  # both ranks finish; only rank 0 reports and writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    # each rank saw half of the 400 training images (synthetic: 500 minus 100 for validation)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_images_per_s"] > 0
    assert all(torch.isfinite(v).all() for v in state["model_state"].values() if v.is_floating_point())
