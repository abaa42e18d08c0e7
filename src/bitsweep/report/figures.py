"""Report figures: the W x A accuracy heatmap and accuracy vs size with the Pareto front.

Figures use matplotlib's object API on the Agg canvas (``Figure`` +
``FigureCanvasAgg``), never pyplot, so building a report keeps no global
figure state and works in worker processes and on headless machines.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.ticker as mticker
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bitsweep.sweep.grid import AXES, ID_BASE_AXES, Cell, checkpoint_tag

# Rows written before an axis existed lack its column; they mean the axis default.
AXIS_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Cell)}


def _render(fig: Figure) -> dict[str, bytes]:
    FigureCanvasAgg(fig)  # attaches the Agg canvas; no pyplot involved
    out: dict[str, bytes] = {}
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        # metadata without a date keeps SVG output identical across rebuilds
        meta = {"Date": None} if fmt == "svg" else {}
        fig.savefig(buf, format=fmt, dpi=110, bbox_inches="tight", metadata=meta)
        out[fmt] = buf.getvalue()
    return out


def group_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """The non-bit-width axes of a row (granularity, observer, ...): one heatmap per distinct value."""
    return tuple(row.get(a, AXIS_DEFAULTS[a]) for a in AXES if a not in ("weight_bits", "activation_bits"))


def group_label(key: tuple[Any, ...]) -> str:
    """Human label of a :func:`group_key`, e.g. ``per_channel, minmax, symmetric``."""
    names = [a for a in AXES if a not in ("weight_bits", "activation_bits")]
    parts = []
    for name, value in zip(names, key, strict=True):
        if name not in ID_BASE_AXES and value == AXIS_DEFAULTS[name]:
            continue  # a newer axis at its default (e.g. method rtn) says nothing
        if name == "symmetric":
            parts.append("symmetric" if value else "asymmetric")
        elif name in ("checkpoint", "layer_bits"):
            parts.append(f"from {checkpoint_tag(str(value))}")
        elif name == "per_layer":
            continue  # the plan's bits; its file (layer_bits) names it
        else:
            parts.append(str(value))
    return ", ".join(parts)


def heatmap_figure(
    rows: Sequence[Mapping[str, Any]], metric: str = "val_top1", baseline: float | None = None
) -> dict[str, bytes]:
    """Heatmap of ``metric`` over weight bits (rows) x activation bits (columns), one panel per group.

    Per-layer (mixed) cells are left out: they have no single weight bit width to sit at; the
    accuracy-vs-size figure and the tables show them.

    Returns:
        ``{"png": bytes, "svg": bytes}``.
    """
    quant = [
        r
        for r in rows
        if r.get("weight_bits") is not None and r.get("activation_bits") is not None and not r.get("layer_bits")
    ]
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in quant:
        groups.setdefault(group_key(r), []).append(r)
    n = max(1, len(groups))
    fig = Figure(figsize=(4.6 * n, 4.0), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    if not groups:
        axes[0].text(0.5, 0.5, "no quantized cells yet", ha="center", va="center")
        axes[0].set_axis_off()
        return _render(fig)
    for ax, (key, grows) in zip(axes, groups.items(), strict=True):
        wbits = sorted({int(r["weight_bits"]) for r in grows})
        abits = sorted({int(r["activation_bits"]) for r in grows})
        grid = np.full((len(wbits), len(abits)), np.nan)  # (W, A)
        for r in grows:
            v = r.get(metric)
            if v is not None:
                grid[wbits.index(int(r["weight_bits"])), abits.index(int(r["activation_bits"]))] = float(v)
        im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=100.0, origin="lower", aspect="auto")
        ax.set_xticks(range(len(abits)), [str(b) for b in abits])
        ax.set_yticks(range(len(wbits)), [str(b) for b in wbits])
        ax.set_xlabel("activation bits")
        ax.set_ylabel("weight bits")
        ax.set_title(group_label(key), fontsize=9)
        for i in range(len(wbits)):
            for j in range(len(abits)):
                if not math.isnan(grid[i, j]):
                    color = "black" if grid[i, j] > 60 else "white"
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color=color, fontsize=8)
        cbar = fig.colorbar(im, ax=ax, shrink=0.85)
        cbar.set_label(f"{metric} (%)")
    title = "Validation top-1 (%) by bit width"
    if baseline is not None:
        title += f"; FP32 = {baseline:.2f} %"
    fig.suptitle(title, fontsize=10)
    return _render(fig)


def pareto_figure(
    rows: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    recommended: Mapping[str, Any] | None,
    size_key: str = "size_bytes",
    acc_key: str = "val_top1",
) -> dict[str, bytes]:
    """Accuracy vs measured size (log scale) of every cell, the Pareto front, FP32 and the recommendation.

    Returns:
        ``{"png": bytes, "svg": bytes}``.
    """
    fig = Figure(figsize=(7.0, 4.6), layout="constrained")
    ax = fig.subplots()
    pts = [r for r in rows if r.get(size_key) is not None and r.get(acc_key) is not None]
    quant = [r for r in pts if not (r.get("weight_bits") is None and r.get("activation_bits") is None)]
    base = [r for r in pts if r.get("weight_bits") is None and r.get("activation_bits") is None]
    mixed = [r for r in quant if r.get("layer_bits")]
    quant = [r for r in quant if not r.get("layer_bits")]
    if mixed:
        ax.scatter(
            [float(r[size_key]) / 1e6 for r in mixed],
            [float(r[acc_key]) for r in mixed],
            marker="D",
            s=40,
            facecolor="none",
            edgecolor="tab:red",
            linewidths=1.5,
            zorder=4,
            label="per-layer bits (--layer-bits)",
        )
    if quant:
        ax.scatter(
            [float(r[size_key]) / 1e6 for r in quant],
            [float(r[acc_key]) for r in quant],
            c=[float(r.get("activation_bits") or 32) for r in quant],
            cmap="plasma",
            s=28,
            alpha=0.8,
            label="quantized cells (colour: activation bits)",
        )
    if front:
        ax.plot(
            [float(r[size_key]) / 1e6 for r in front],
            [float(r[acc_key]) for r in front],
            "-o",
            color="tab:green",
            ms=4,
            lw=1.5,
            label="Pareto front",
        )
    for r in base:
        ax.scatter([float(r[size_key]) / 1e6], [float(r[acc_key])], marker="s", s=60, color="black", label="FP32")
    if recommended is not None:
        ax.scatter(
            [float(recommended[size_key]) / 1e6],
            [float(recommended[acc_key])],
            marker="*",
            s=260,
            facecolor="gold",
            edgecolor="black",
            zorder=5,
            label=f"recommended: {recommended.get('label', '')}",
        )
    if pts:
        ax.set_xscale("log")
        # Plain decimal MB labels: matplotlib's default 3x10^-1 minor labels overlap.
        ax.xaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(mticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("measured model size (MB, packed file, log scale)")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Accuracy vs size", fontsize=10)
    return _render(fig)
