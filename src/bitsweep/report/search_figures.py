"""Figures of the search section: mixed precision against the uniform grid, and each layer's bits and bytes.

Same rules as :mod:`bitsweep.report.figures`: matplotlib's object API on the Agg
canvas, no pyplot, so no global figure state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.ticker as mticker
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from bitsweep.report.figures import _render
from bitsweep.report.search import SearchRun
from bitsweep.sweep.pareto import pareto_front

METRIC_NAMES = {"val": "validation top-1", "test": "test top-1"}
RATIO_TICKS = (1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50, 100, 200)


def is_uniform(row: Mapping[str, Any]) -> bool:
    """A grid cell: quantized with one weight and one activation bit width, by the sweep itself."""
    quantized = row.get("weight_bits") is not None or row.get("activation_bits") is not None
    return quantized and not row.get("layer_bits") and not row.get("checkpoint")


def _xy(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [r for r in rows if r.get("size_bytes") is not None and r.get(key) is not None]
    return [float(r["size_bytes"]) / 1e6 for r in pts], [float(r[key]) for r in pts]


def mixed_front_figure(
    rows: Sequence[Mapping[str, Any]], runs: Sequence[SearchRun], metric: str, fp32_bytes: int
) -> dict[str, bytes]:
    """Accuracy vs packed size: the uniform grid with its Pareto front, and every searched plan (and its QAT).

    Args:
        rows: the sweep's results rows.
        runs: the searches to place on the plot.
        metric: ``val`` or ``test``: the top-1 plotted for every point.
        fp32_bytes: the FP32 file's size, for the compression-ratio axis on top.

    Returns:
        ``{"png": bytes, "svg": bytes}``.
    """
    key = f"{metric}_top1"
    fig = Figure(figsize=(8.0, 5.4), layout="constrained")
    ax = fig.subplots()
    uniform = [r for r in rows if is_uniform(r)]
    ax.scatter(*_xy(uniform, key), s=22, color="0.62", zorder=2, label="uniform grid cells (one W, one A)")
    front = pareto_front(uniform, acc_key=key)
    if front:
        xs, ys = _xy(front, key)
        ax.plot(xs, ys, "-o", color="tab:blue", ms=4, lw=1.5, zorder=3, label="uniform grid Pareto front")
        for r, x, y in zip(front, xs, ys, strict=True):
            ax.annotate(str(r.get("label", "")).split(" ")[0], (x, y), xytext=(4, -11), textcoords="offset points",
                        fontsize=7, color="tab:blue")  # fmt: skip
    mixed = [r for r in rows if r.get("layer_bits")]
    if mixed:
        ax.scatter(*_xy(mixed, key), marker="D", s=40, facecolor="none", edgecolor="tab:red", linewidths=1.5,
                   zorder=4, label="per-layer cells of the sweep (--layer-bits)")  # fmt: skip
    checkpoints = [r for r in rows if r.get("checkpoint")]
    if checkpoints:
        ax.scatter(*_xy(checkpoints, key), marker="^", s=40, color="tab:purple", zorder=4,
                   label="quantized checkpoints of the sweep (--add-quantized)")  # fmt: skip
    base = [r for r in rows if r.get("weight_bits") is None and r.get("activation_bits") is None]
    if base:
        ax.scatter(*_xy(base, key), marker="s", s=60, color="black", zorder=4, label="FP32")
    plans = [(run, run.plan) for run in runs if run.plan.accuracy(metric) is not None]
    for i, (run, p) in enumerate(plans):
        x, y = p.file_bytes / 1e6, float(p.accuracy(metric) or 0.0)
        ax.scatter([x], [y], marker="D", s=70, color="tab:red", edgecolor="black", zorder=6,
                   label="searched per-layer plan (PTQ)" if i == 0 else None)  # fmt: skip
        ax.annotate(f"{run.name}\n{fp32_bytes / p.file_bytes:.2f}x", (x, y), xytext=(6, 4),
                    textcoords="offset points", fontsize=7, color="tab:red")  # fmt: skip
    if len(plans) > 1:
        pts = sorted((p.file_bytes / 1e6, float(p.accuracy(metric) or 0.0)) for _, p in plans)
        best, line = -np.inf, []
        for x, y in pts:
            if y > best:
                line.append((x, y))
                best = y
        ax.plot(*zip(*line, strict=True), "--", color="tab:red", lw=1.2, zorder=5, label="mixed-precision front")
    tuned = [run for run in runs if run.finetune is not None and run.finetune.accuracy(metric) is not None]
    for i, run in enumerate(tuned):
        assert run.finetune is not None
        x, y = run.finetune.file_bytes / 1e6, float(run.finetune.accuracy(metric) or 0.0)
        ax.scatter([x], [y], marker="*", s=220, color="tab:green", edgecolor="black", zorder=7,
                   label="plan after QAT fine-tuning" if i == 0 else None)  # fmt: skip
        start = run.plan.accuracy(metric)
        if start is not None:
            ax.annotate("", xy=(x, y), xytext=(run.plan.file_bytes / 1e6, float(start)),
                        arrowprops={"arrowstyle": "->", "color": "tab:green", "lw": 1.2}, zorder=6)  # fmt: skip
        # left of the star (the uniform front climbs to the right of a plan that beats it), one line higher
        # per star, since QAT points sit at nearly the same accuracy and their labels would overlap
        ax.annotate(run.finetune.label, (x, y), xytext=(-10, 5 + 9 * i), textcoords="offset points", fontsize=7,
                    color="tab:green", ha="right")  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(mticker.FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    fp32_mb = fp32_bytes / 1e6

    def ratio(x: Any) -> Any:  # MB <-> times smaller than FP32: the same map both ways
        return fp32_mb / np.maximum(np.asarray(x, dtype=float), 1e-12)

    top = ax.secondary_xaxis("top", functions=(ratio, ratio))
    top.xaxis.set_major_locator(mticker.FixedLocator(RATIO_TICKS))
    top.xaxis.set_major_formatter(mticker.FormatStrFormatter("%gx"))
    top.xaxis.set_minor_locator(mticker.NullLocator())
    top.set_xlabel("compression ratio (FP32 file / packed file)", fontsize=8)
    ax.set_xlabel("packed model file (MB, log scale)")
    ax.set_ylabel(f"{METRIC_NAMES[metric]} (%, integer-exact)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"Mixed precision vs the uniform grid ({METRIC_NAMES[metric]})", fontsize=10)
    return _render(fig)


def layer_bytes_figure(run: SearchRun) -> dict[str, bytes]:
    """Chosen weight bits per layer (model order) above each layer's share of the file, integers vs overhead.

    Raises:
        ValueError: when the search's packed file was not found (``run.breakdown`` is None).
    """
    b = run.breakdown
    if b is None:
        raise ValueError(f"search {run.name} has no packed file to split by layer")
    layers = b.layers
    x = np.arange(len(layers))
    fig = Figure(figsize=(max(7.0, 0.2 * len(layers) + 2.0), 6.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.0, 1.6])
    bits = [ly.bits for ly in layers]
    distinct = sorted(set(bits))
    cmap = colormaps["viridis"]
    colour = {v: cmap(0.15 + 0.7 * i / max(1, len(distinct) - 1)) for i, v in enumerate(distinct)}
    top.bar(x, bits, width=0.8, color=[colour[v] for v in bits])
    top.set_yticks(distinct)
    top.set_ylim(0, max(distinct) + 0.6)
    top.set_ylabel("weight bits")
    top.grid(axis="y", alpha=0.3)
    top.set_title(f"{run.name}: chosen weight bits per layer (model order)", fontsize=10)
    total = b.file_bytes
    ints = np.array([100.0 * ly.integer_bytes / total for ly in layers])
    over = np.array([100.0 * ly.overhead_bytes / total for ly in layers])
    bottom.bar(x, ints, width=0.8, color="tab:blue", label="integer weights")
    bottom.bar(x, over, width=0.8, bottom=ints, color="tab:orange", label="overhead: scales, zero points, biases")
    bottom.set_ylabel("share of the packed file (%)")
    bottom.set_xticks(x, [ly.name for ly in layers], rotation=90, fontsize=6)
    bottom.set_xlim(-0.6, len(layers) - 0.4)
    bottom.grid(axis="y", alpha=0.3)
    bottom.legend(fontsize=8, loc="upper left")
    n_int = sum(ly.integer_bytes for ly in layers)
    n_over = sum(ly.overhead_bytes for ly in layers)
    rest = total - n_int - n_over
    bottom.set_title(
        f"file {total:,} B: integers {n_int:,} B ({100 * n_int / total:.1f}%), layer overhead {n_over:,} B "
        f"({100 * n_over / total:.1f}%), activation qparams + float state + header {rest:,} B "
        f"({100 * rest / total:.1f}%, not drawn)",
        fontsize=8,
    )
    return _render(fig)
