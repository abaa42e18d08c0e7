"""Checking an int8 ONNX export on the spot: agreement with the integer-exact simulation, latency against FP32.

A user who quantizes to deploy needs two answers before shipping the file:
does it predict what bitsweep measured (the integer-exact simulation, the
source of every accuracy bitsweep reports), and is it faster than the float
model it replaces. :func:`check_qop` answers the first, :func:`compare_latency`
the second with fixed, recorded onnxruntime settings (:class:`OrtSettings`).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitsweep.backend.intref import image_batches
from bitsweep.backend.simulate import simulate
from bitsweep.errors import BitsweepError
from bitsweep.export.onnx import OnnxCheck, compare_session, export_onnx, import_ort
from bitsweep.quant.inspect import is_activation_quantizer, is_weight_layer
from bitsweep.quant.output import QuantOutput
from bitsweep.runtime import available_cores


@dataclass(frozen=True)
class OrtSettings:
    """onnxruntime session settings chosen for speed; recorded beside every latency figure."""

    graph_optimization: str = "ORT_ENABLE_ALL"  # fuses and picks integer/NCHWc kernels
    intra_op_threads: int = 0  # 0: auto, see threads_for
    inter_op_threads: int = 1  # one chain of operators: parallel execution brings nothing here
    execution_mode: str = "ORT_SEQUENTIAL"

    def threads_for(self, batch: int) -> int:
        """Intra-op threads for calls of ``batch`` images: the number set, or (auto) 1 for a single image and the
        cores this process may use for a batch.

        One image of a small network is too little work to share: measured on a 2-core EPYC with VNNI, the int8
        file ran slower on 2 threads than on 1 at batch 1 (0.39 against 0.375 ms) and its lead over FP32 shrank
        from 1.73x to 1.58x (BENCHMARKS.md ``onnx_latency_amd-epyc-vnni``; on a loaded host both files ran
        slower and the lead fell to 1.22x). Batches of 64 gain from every core (1.9x to 2.0x faster on 2 than on 1).
        """
        if self.intra_op_threads:
            return self.intra_op_threads
        return 1 if batch == 1 else available_cores()

    def session(self, path: str | Path, threads: int | None = None) -> Any:
        """An onnxruntime CPU ``InferenceSession`` of ``path`` with these settings and ``threads`` intra-op threads
        (default: the number set, else the cores this process may use)."""
        ort = import_ort()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, self.graph_optimization)
        opts.intra_op_num_threads = threads or self.intra_op_threads or available_cores()
        opts.inter_op_num_threads = self.inter_op_threads
        opts.execution_mode = getattr(ort.ExecutionMode, self.execution_mode)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def describe(self, timed_threads: Sequence[int] = ()) -> str:
        """``ORT_ENABLE_ALL, intra-op threads ..., ...``: what the latency figures were measured with.

        ``timed_threads``: the thread counts a benchmark timed one after another with otherwise these settings.
        """
        auto = f"intra-op threads 1 at batch 1 and {available_cores()} (the available cores) for batches"
        threads = f"{self.intra_op_threads} intra-op threads" if self.intra_op_threads else auto
        if timed_threads:
            threads = f"{' and '.join(map(str, timed_threads))} intra-op threads (each timed)"
        return (f"onnxruntime {import_ort().__version__}, {self.graph_optimization}, {threads}, "
                f"{self.inter_op_threads} inter-op thread, {self.execution_mode.lower()}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; ``intra_op_threads`` 0 is auto (each latency row has its thread count)."""
        return {**asdict(self), "onnxruntime": import_ort().__version__}


def compare_logits(
    path: str | Path, reference: Callable[[torch.Tensor], torch.Tensor], batches: Any, max_batches: int | None = None
) -> OnnxCheck:
    """Run ``path`` in onnxruntime (with :class:`OrtSettings`) and ``reference`` on the same images; compare them."""
    return compare_session(OrtSettings().session(path), reference, batches, max_batches)


def check_qop(path: str | Path, model: nn.Module, batches: Any, max_batches: int | None = None) -> OnnxCheck:
    """The exported file against the integer-exact simulation (``simulated_top1`` is the simulation's accuracy)."""
    batches = list(image_batches(batches, max_batches))
    if not batches:
        raise BitsweepError("no images to check; give at least one batch")
    sim = simulate(model, batches[0][0][:1])
    return compare_logits(path, sim, batches)


def float_twin(model: nn.Module) -> nn.Module:
    """A float copy of a converted model: quantized layers back to float, quantizers removed.

    Its ONNX export (:func:`bitsweep.export.onnx.export_onnx`) is the FP32
    graph of the same (BatchNorm-folded) network, the baseline the int8 file
    is timed against when the original float checkpoint is not at hand.
    """
    twin = copy.deepcopy(model).cpu().eval()
    replaced: list[str] = []
    for name, m in list(twin.named_modules()):
        if not name or any(name.startswith(r + ".") for r in replaced):  # inside a module already swapped out
            continue
        if is_weight_layer(m):
            new: nn.Module = m.to_float()
        elif is_activation_quantizer(m):
            new = nn.Identity()
        elif isinstance(m, QuantOutput):
            new = m.to_float()
        else:
            continue
        replaced.append(name)
        parent_name, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, attr, new)
    return twin


@dataclass(frozen=True)
class Latency:
    """Median onnxruntime latency of one file at one batch size."""

    model: str
    batch: int
    median_ms: float
    runs: int
    threads: int  # onnxruntime intra-op threads

    @property
    def images_per_s(self) -> float:
        """Throughput at this batch size."""
        return 1000.0 * self.batch / self.median_ms


BLOCK = 10  # timed calls of one file in a row (see compare_latency)


def compare_latency(
    paths: dict[str, Path], input_shape: tuple[int, int, int], *, batch_sizes: tuple[int, ...] = (1, 64),
    runs: int = 20, settings: OrtSettings | None = None,
) -> list[Latency]:  # fmt: skip
    """Median latency of every file at every batch size, sessions made with the same ``settings``.

    The files are timed in rounds at each batch size: a block of ``BLOCK`` calls of
    each file in turn, the first call of every block untimed, until each file has
    ``runs`` timed calls. Timing all of one file's calls and then the other's lets a
    load change on a shared machine land on one file only. Single calls in turn do
    not work either: onnxruntime's worker threads spin for a while after each call,
    and the spinning threads of the session that just ran slow down the next one.
    """
    settings = settings or OrtSettings()
    rng = np.random.default_rng(0)
    out: list[Latency] = []
    for batch in batch_sizes:
        threads = settings.threads_for(batch)
        sessions = {name: settings.session(p, threads) for name, p in paths.items()}
        feed = {"input": rng.standard_normal((batch, *input_shape)).astype(np.float32)}
        for sess in sessions.values():  # warm-up: first calls allocate and pick kernels
            for _ in range(3):
                sess.run(["logits"], feed)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for start in range(0, runs, BLOCK):
            for name, sess in sessions.items():
                sess.run(["logits"], feed)  # untimed: the previous session's threads are still spinning
                for _ in range(min(BLOCK, runs - start)):
                    t = time.perf_counter()
                    sess.run(["logits"], feed)
                    times[name].append(time.perf_counter() - t)
        out.extend(Latency(name, batch, 1000.0 * statistics.median(ts), runs, threads) for name, ts in times.items())
        del sessions  # their thread pools go before the next batch size's
    return out


def describe_latency(rows: list[Latency], baseline: str, settings: OrtSettings) -> str:
    """Lines ``name  batch B, T threads: X ms (Y img/s, Z x baseline)`` and the settings they were measured with."""
    base = {r.batch: r.median_ms for r in rows if r.model == baseline}
    lines = []
    for r in rows:
        speed = f", {base[r.batch] / r.median_ms:.2f}x {baseline}" if r.batch in base else ""
        lines.append(f"  {r.model:>6} batch {r.batch:>3}, {r.threads} thread{'s' if r.threads > 1 else ' '}: "
                     f"{r.median_ms:8.3f} ms ({r.images_per_s:,.0f} img/s{speed})")  # fmt: skip
    lines.append(f"  (median of {rows[0].runs if rows else 0} runs; {settings.describe()})")
    return "\n".join(lines)


@dataclass(frozen=True)
class QopReport:
    """What ``bitsweep export --format onnx --int8`` reports: agreement with the simulation and both latencies."""

    check: OnnxCheck  # the int8 file vs the integer-exact simulation
    latency: list[Latency]  # FP32 and int8 files, each batch size
    settings: OrtSettings

    def describe(self, what: str = "images") -> str:
        """Human-readable lines for the console."""
        c = self.check
        acc = ""
        if c.simulated_top1 is not None:
            acc = f"; top-1 integer-exact simulation {c.simulated_top1:.2f}% vs onnxruntime {c.onnx_top1:.2f}%"
        head = (
            f"onnxruntime (int8 QOperator) vs integer-exact simulation on {c.images} {what}: top-1 agreement "
            f"{c.top1_agreement:.2f}%, max logit difference {c.max_logit_diff:.3g}{acc}"
        )
        times = describe_latency(self.latency, "FP32", self.settings)
        return f"{head}\nlatency, FP32 vs int8 ONNX on this CPU:\n{times}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        rows = [{**asdict(r), "images_per_s": r.images_per_s} for r in self.latency]
        return {"check": self.check.to_dict(), "latency": rows, "settings": self.settings.to_dict()}


def qop_report(
    path: str | Path, model: nn.Module, input_shape: tuple[int, int, int], batches: Any, *,
    max_batches: int | None = None, runs: int = 20, batch_sizes: tuple[int, ...] = (1, 64),
    settings: OrtSettings | None = None,
) -> QopReport:  # fmt: skip
    """Check an exported QOperator file against the simulation and time it against the model's FP32 twin.

    The FP32 file (:func:`float_twin`, exported as plain ONNX) is written to a
    temporary folder and removed afterwards.
    """
    settings = settings or OrtSettings()
    check = check_qop(path, model, batches, max_batches)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(float_twin(model), Path(tmp) / "fp32.onnx", input_shape)
        paths = {"FP32": fp32, "int8": Path(path)}
        rows = compare_latency(paths, input_shape, batch_sizes=batch_sizes, runs=runs, settings=settings)
    return QopReport(check, rows, settings)
