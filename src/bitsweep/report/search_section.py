"""The report's mixed-precision section: searched plans against the uniform grid, and the per-layer bytes.

One accuracy is used for every point, test top-1 by default: the search picks its plan on
validation images (often a subset, ``--val-images``), so its validation number is both
optimistic and measured on other images than the sweep's; the test split is measured once
per model, on the same images for the sweep's cells and the search's plan.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bitsweep.errors import BitsweepError
from bitsweep.report.search import SearchPoint, SearchRun
from bitsweep.report.search_figures import METRIC_NAMES, is_uniform, layer_bytes_figure, mixed_front_figure
from bitsweep.report.tables import fmt, html_img, html_table, md_table

METRICS = tuple(METRIC_NAMES)


@dataclass(frozen=True)
class SearchSection:
    """What the section adds to a report.

    Attributes:
        figures: figure name -> ``{"png": bytes, "svg": bytes}`` (written under ``figures/``).
        markdown: the section's Markdown lines (figures linked from ``figures/``).
        html: the section's HTML (figures embedded).
        metric: the accuracy every point uses, ``val`` or ``test``.
        notes: what the reader should know about the comparison.
    """

    figures: dict[str, dict[str, bytes]]
    markdown: list[str]
    html: str
    metric: str
    notes: tuple[str, ...]


def slug(name: str) -> str:
    """A file-name-safe form of a search's name.

    >>> slug("runs/search 10x")
    'runs-search-10x'
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "search"


def _images(rows: Sequence[Mapping[str, Any]], key: str) -> int | None:
    return next((int(r[key]) for r in rows if r.get(key) is not None), None)


def _checks(rows: Sequence[Mapping[str, Any]], runs: Sequence[SearchRun], metric: str,
            identity: Mapping[str, Any]) -> tuple[str, list[str]]:  # fmt: skip
    """The metric to plot and the notes on comparability; refuses a search of another model."""
    notes = [n for run in runs for n in run.notes]
    fp32 = next((int(r["fp32_bytes"]) for r in rows if r.get("fp32_bytes") is not None), None)
    for run in runs:
        if fp32 is not None and run.fp32_bytes != fp32:
            raise BitsweepError(
                f"search {run.name} quantized a model whose FP32 file has {run.fp32_bytes:,} bytes, the sweep's has "
                f"{fp32:,}: it searched another model; pass a search of the swept checkpoint"
            )
        sha = identity.get("checkpoint_sha256")
        if run.checkpoint_sha256 is not None and sha is not None and run.checkpoint_sha256 != sha:
            notes.append(f"search {run.name} ran on another checkpoint file than the sweep (SHA-256 differs) of the "
                         "same architecture: its accuracies are of other weights")  # fmt: skip
    has_test = any(r.get("test_top1") is not None for r in rows if is_uniform(r))
    if metric == "test" and (not has_test or any(run.plan.test_top1 is None for run in runs)):
        notes.append("some results have no test accuracy, so validation top-1 is plotted")
        metric = "val"
    sweep_images = _images(rows, f"images_{metric}")
    for run in runs:
        images = run.test_images if metric == "test" else run.val_images
        if images is not None and sweep_images is not None and images != sweep_images:
            notes.append(f"search {run.name} measured {METRIC_NAMES[metric]} on {images:,} images, the sweep on "
                         f"{sweep_images:,}: the points are not measured on the same images")  # fmt: skip
    if metric == "val":
        notes.append("the searches chose their plans on these validation images, so their validation accuracy "
                     "is optimistic; test top-1 (the default) compares like with like")  # fmt: skip
    return metric, notes


def _best_uniform_within(rows: Sequence[Mapping[str, Any]], size: int, key: str) -> str:
    """The most accurate uniform cell no larger than ``size``, as ``W4A8 (90.57 %, 422,808 B)``."""
    fits = [r for r in rows if is_uniform(r) and r.get(key) is not None and 0 < int(r.get("size_bytes") or 0) <= size]
    if not fits:
        return "none this small"
    r = max(fits, key=lambda r: (float(r[key]), -int(r["size_bytes"])))
    return f"{str(r.get('label', '')).split(' ')[0]} ({float(r[key]):.2f} %, {int(r['size_bytes']):,} B)"


def _points_table(rows: Sequence[Mapping[str, Any]], runs: Sequence[SearchRun],
                  metric: str) -> tuple[list[str], list[list[str]]]:  # fmt: skip
    key = f"{metric}_top1"
    headers = ["model", "budget", "packed bytes", "ratio", "val top-1 %", "val images", "test top-1 %",
               "test images", "accuracy from", f"best uniform cell no larger ({METRIC_NAMES[metric]})"]  # fmt: skip
    body = []
    for run in runs:
        point: SearchPoint
        for point in run.points:
            body.append([
                point.label, run.budget if point is run.plan else "same bits, fine-tuned",
                f"{point.file_bytes:,}", f"{run.fp32_bytes / point.file_bytes:.2f}x", fmt(point.val_top1, "{:.2f}"),
                fmt(run.val_images, "{:,}"), fmt(point.test_top1, "{:.2f}"), fmt(run.test_images, "{:,}"),
                point.simulation, _best_uniform_within(rows, point.file_bytes, key),
            ])  # fmt: skip
    return headers, body


LAYER_HEADERS = ["layer", "weight shape", "bits", "integer bytes", "scale bytes", "zero-point bytes", "bias bytes",
                 "overhead bytes", "total bytes", "share of file"]  # fmt: skip


def layer_table(run: SearchRun) -> list[list[str]]:
    """One row per weight layer (model order), then what belongs to no layer, then the file's total.

    ``overhead bytes`` is everything but the integers; the ``total bytes`` column adds up to the file.
    """
    b = run.breakdown
    if b is None:
        return []
    total = b.file_bytes

    def share(n: int) -> str:
        return f"{100 * n / total:.2f} %"

    body = [[ly.name, "x".join(map(str, ly.shape)), str(ly.bits), f"{ly.integer_bytes:,}", f"{ly.scale_bytes:,}",
             f"{ly.zero_point_bytes:,}", f"{ly.bias_bytes:,}", f"{ly.overhead_bytes:,}", f"{ly.total_bytes:,}",
             share(ly.total_bytes)] for ly in b.layers]  # fmt: skip
    for name, n in (("activation quantizers (scales, zero points)", b.activation_bytes),
                    ("other state kept in float", b.float_bytes),
                    ("header (tensor index, metadata JSON)", b.header_bytes)):  # fmt: skip
        body.append([name, "", "", "0", "", "", "", f"{n:,}", f"{n:,}", share(n)])
    ints = sum(ly.integer_bytes for ly in b.layers)
    body.append(["total (the packed file)", "", "", f"{ints:,}", f"{sum(ly.scale_bytes for ly in b.layers):,}",
                 f"{sum(ly.zero_point_bytes for ly in b.layers):,}", f"{sum(ly.bias_bytes for ly in b.layers):,}",
                 f"{total - ints:,}", f"{total:,}", share(total)])  # fmt: skip
    return body


def search_section(
    rows: Sequence[Mapping[str, Any]],
    runs: Sequence[SearchRun],
    metric: str = "test",
    identity: Mapping[str, Any] | None = None,
) -> SearchSection:
    """The section for ``runs`` (one or several searches) next to the sweep's ``rows``.

    Raises:
        BitsweepError: an unknown metric, or a search of another model than the sweep's.
    """
    if metric not in METRICS:
        raise BitsweepError(f"the search metric must be one of {', '.join(METRICS)}, got {metric!r}")
    metric, notes = _checks(rows, runs, metric, identity or {})
    fp32 = next((int(r["fp32_bytes"]) for r in rows if r.get("fp32_bytes") is not None), runs[0].fp32_bytes)
    figures = {"mixed_front": mixed_front_figure(rows, runs, metric, fp32)}
    used: set[str] = set()
    layer_figs: list[tuple[SearchRun, str]] = []
    for run in runs:
        if run.breakdown is None:
            continue
        name = f"layer_bytes-{slug(run.name)}"
        while name in used:
            name += "-2"
        used.add(name)
        figures[name] = layer_bytes_figure(run)
        layer_figs.append((run, name))
    what = METRIC_NAMES[metric]
    intro = (f"Every point: {what} (integer-exact simulation) against the packed file's size. The uniform grid is "
             "the sweep's cells with one weight and one activation bit width; a searched plan chooses weight bits "
             "per layer (activations stay at one width).")  # fmt: skip
    ph, pb = _points_table(rows, runs, metric)
    md = ["## Mixed precision (per-layer search)", "", intro, ""]
    md += [f"- **Note:** {n}" for n in notes] + ([""] if notes else [])
    md += ["![mixed precision vs the uniform grid](figures/mixed_front.png)", "", md_table(ph, pb), ""]
    page = [f"<h2>Mixed precision (per-layer search)</h2>\n<p>{html.escape(intro)}</p>"]
    if notes:
        page.append("<ul>" + "".join(f"<li><b>Note:</b> {html.escape(n)}</li>" for n in notes) + "</ul>")
    page += [html_img("mixed_front", figures["mixed_front"]["png"], "mixed precision vs the uniform grid"),
             html_table(ph, pb)]  # fmt: skip
    for run, name in layer_figs:
        title = f"Per-layer bits and bytes: {run.name}"
        caption = (f"Weight bits {run.name} chose per layer, in model order, and each layer's bytes in its packed "
                   f"file ({run.breakdown.path.name if run.breakdown else ''}): the bit-packed integers and the "
                   "overhead a smaller bit width does not shrink (per-channel scales, zero points, biases, at the "
                   "widths the file stores them).")  # fmt: skip
        body = layer_table(run)
        md += [f"### {title}", "", caption, "", f"![per-layer bits and bytes of {run.name}](figures/{name}.png)", ""]
        md += [md_table(LAYER_HEADERS, body), ""]
        page += [f"<h3>{html.escape(title)}</h3>\n<p>{html.escape(caption)}</p>",
                 html_img(name, figures[name]["png"], f"per-layer bits and bytes of {run.name}"),
                 html_table(LAYER_HEADERS, body, bold_last=True)]  # fmt: skip
    return SearchSection(figures, md, "\n".join(page), metric, tuple(notes))
