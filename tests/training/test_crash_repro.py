"""Issue 15's crash: oneDNN's AVX2 weight gradient of a strided 1x1 convolution in channels-last.

On AVX2-only CPUs (and on any x86 CPU told ``ONEDNN_MAX_CPU_ISA=AVX2``), torch
2.13.0+cpu corrupts the heap within 200 training steps of
``Conv2d(4, 8, kernel_size=1, stride=2)`` on a 12x4x8x8 channels-last input.
:func:`bitsweep.models.to_channels_last` routes such layers through NCHW; these
tests run the reproduction, and a ResNet-20 training loop that contains such a
layer, in a subprocess so that a regression aborts one test, not the run.
``MALLOC_CHECK_``/``MALLOC_PERTURB_`` make glibc abort on the first corrupted
chunk instead of some steps later (or never).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPRODUCTION = """
import torch
from bitsweep.models import create_model, to_channels_last

torch.set_num_threads(1)
torch.manual_seed(0)
conv = to_channels_last(torch.nn.Conv2d(4, 8, kernel_size=1, stride=2, bias=False))
x = torch.randn(12, 4, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
for _ in range(200):
    conv(x).sum().backward()
model = to_channels_last(create_model("resnet20", num_classes=3, in_channels=1, width=0.25, dropout=0.0))
images = torch.randn(12, 1, 8, 8).contiguous(memory_format=torch.channels_last)
labels = torch.arange(12) % 3
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
for _ in range(50):
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
print("capability", torch.backends.cpu.get_cpu_capability())
print("finite", bool(torch.isfinite(loss)))
"""

# An AVX2-only CPU as oneDNN and ATen see it, on any x86 machine.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("emulate", [{}, AVX2_ONLY], ids=["this-cpu", "avx2-only"])
def test_strided_pointwise_channels_last_training_does_not_crash(emulate: dict[str, str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165", **emulate}
    proc = subprocess.run([sys.executable, "-c", REPRODUCTION], env=env, capture_output=True, text=True,
                          timeout=240, check=False)  # fmt: skip
    assert proc.returncode == 0, f"exit status {proc.returncode}; stderr:\n{proc.stderr[-2000:]}"
    assert "finite True" in proc.stdout
    if emulate:
        assert "capability AVX2" in proc.stdout  # the emulation took effect
