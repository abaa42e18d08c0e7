"""Build report.md and a self-contained report.html from a sweep's results file alone.

Everything in the report comes from the JSONL file: the header (checkpoint,
dataset, environment recorded at sweep time) and the rows. So a report can be
rebuilt anywhere, later, without the model or the data, and it shows exactly
what was measured.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from bitsweep.io import atomic_path, write_text_atomic
from bitsweep.report.figures import heatmap_figure, pareto_figure
from bitsweep.report.search import read_searches
from bitsweep.report.search_section import SearchSection, search_section
from bitsweep.report.tables import fmt as _fmt
from bitsweep.report.tables import html_img
from bitsweep.report.tables import html_table as _html_table
from bitsweep.report.tables import md_table as _md_table
from bitsweep.report.tables import table as _table
from bitsweep.sweep.pareto import Recommendation, pareto_front, recommend
from bitsweep.sweep.results import SweepResults, read_results

# (column, header, format) of the cell table, in display order; absent columns are left out.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("label", "cell", "{}"),
    ("val_top1", "val top-1 %", "{:.2f}"),
    ("val_top5", "val top-5 %", "{:.2f}"),
    ("images_val", "val images", "{:,}"),
    ("test_top1", "test top-1 %", "{:.2f}"),
    ("test_top5", "test top-5 %", "{:.2f}"),
    ("images_test", "test images", "{:,}"),
    ("size_bytes", "packed bytes", "{:,.0f}"),
    ("model_ratio", "model ratio", "{:.2f}x"),
    ("weight_ratio", "weight ratio", "{:.2f}x"),
    ("act_total_ratio", "act. ratio (total)", "{:.2f}x"),
    ("act_peak_ratio", "act. ratio (peak)", "{:.2f}x"),
    ("final_mb", "final MB", "{:.4f}"),
    ("seconds", "seconds", "{:.1f}"),
    ("simulation", "accuracy from", "{}"),
    ("cell_id", "cell id", "{}"),
)

# The assignment's four figures for the recommended configuration.
FOUR_FIGURES: tuple[tuple[str, str, str], ...] = (
    ("model_ratio", "Model compression ratio (FP32 bytes / packed file bytes)", "{:.2f}x"),
    ("weight_ratio", "Weight compression ratio", "{:.2f}x"),
    ("act_total_ratio", "Activation compression ratio, total", "{:.2f}x"),
    ("act_peak_ratio", "Activation compression ratio, peak", "{:.2f}x"),
    ("final_mb", "Final model size (MB, packed file on disk)", "{:.4f} MB"),
)


@dataclass(frozen=True)
class ReportPaths:
    """Files a report build wrote."""

    markdown: Path
    html: Path
    figures: tuple[Path, ...]
    recommendation: Recommendation | None
    search: SearchSection | None = None


def checkpoint_name(path: str | None) -> str:
    """The checkpoint as its run folder and file name: a report names no absolute path of the machine that made it.

    >>> checkpoint_name("/home/ana/runs/fm-mbv2/best.pt")
    'fm-mbv2/best.pt'
    >>> checkpoint_name(None)
    '?'
    """
    if not path:
        return "?"
    p = PurePath(str(path))
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def _relative_to(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` when inside it, else its file name (never an absolute path)."""
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return path.name


def _sort_key(r: Mapping[str, Any]) -> tuple[Any, ...]:
    # FP32 first, then by weight bits, activation bits, then the other axes; per-layer (mixed) cells last
    return (
        r.get("weight_bits") is not None or r.get("activation_bits") is not None,
        bool(r.get("layer_bits")),
        r.get("weight_bits") or 99,
        r.get("activation_bits") or 99,
        str(r.get("granularity")),
        str(r.get("observer")),
        str(r.get("method", "rtn")),  # rows written before the method axis were all rtn
    )


def _stopped_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """A sentence on the cells measured on fewer images because they collapsed, or ``""`` when none did."""
    stopped = [str(r.get("label")) for r in rows if r.get("stopped_early")]
    if not stopped:
        return ""
    names = ", ".join(stopped[:8]) + (f" and {len(stopped) - 8} more" if len(stopped) > 8 else "")
    return (
        f"{len(stopped)} cell(s) stopped early ({names}): each one's validation top-1 was below half the FP32 "
        "model's with 99.9 % confidence, so it was measured on the images counted in its row (the same number of "
        "test images). `bitsweep sweep --full-eval` measures every cell on every image."
    )


def _recommended_lines(rec: Recommendation | None, baseline: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(name, value) pairs describing the recommendation, shared by Markdown and HTML."""
    lines: list[tuple[str, str]] = []
    if baseline is not None:
        lines.append(
            (
                "FP32 baseline",
                f"val {_fmt(baseline.get('val_top1'), '{:.2f}')} %, "
                f"test {_fmt(baseline.get('test_top1'), '{:.2f}')} %, "
                f"{_fmt(baseline.get('size_bytes'), '{:,.0f}')} bytes",
            )
        )
    if rec is None:
        lines.append(("Recommended configuration", "none yet: the FP32 baseline has not been evaluated"))
        return lines
    lines.append(("Recommended configuration", rec.summary()))
    if rec.row is not None:
        r = rec.row
        lines.append(
            (
                "Validation top-1 (used to choose)",
                f"{_fmt(r.get('val_top1'), '{:.2f}')} % (drop {rec.drop:.2f} points, budget {rec.max_drop:g})",
            )
        )
        lines.append(("Test top-1 (reported, not used to choose)", f"{_fmt(r.get('test_top1'), '{:.2f}')} %"))
        for key, name, fmt in FOUR_FIGURES:
            lines.append((name, _fmt(r.get(key), fmt)))
    return lines


def build_report(
    results: str | os.PathLike[str] | SweepResults,
    output_dir: str | os.PathLike[str] | None = None,
    max_drop: float | None = None,
    searches: Sequence[str | os.PathLike[str]] = (),
    search_metric: str = "test",
) -> ReportPaths:
    """Write ``report.md``, ``report.html`` and ``figures/*.png|svg`` for a results file.

    Args:
        results: the results JSONL (or its directory, or an already read :class:`SweepResults`).
        output_dir: where to write; default the results file's directory.
        max_drop: accuracy budget for the recommendation; default the one recorded at sweep time, else 1.0.
        searches: ``bitsweep search`` output folders (or their search.json) of the swept checkpoint: adds the
            mixed-precision section (their plans against the uniform grid, each plan's per-layer bytes).
        search_metric: ``test`` or ``val``: the top-1 of every point in that section.

    Raises:
        BitsweepError: when the results file is missing or not a sweep results file, or a search is
            unreadable or of another model.
    """
    res = results if isinstance(results, SweepResults) else read_results(results)
    out = Path(output_dir) if output_dir is not None else res.path.parent
    out.mkdir(parents=True, exist_ok=True)
    header = res.header
    if max_drop is None:
        max_drop = float(header.get("max_drop", 1.0))
    rows = sorted(res.rows, key=_sort_key)
    baseline = res.baseline
    front = pareto_front(rows)
    rec = (
        recommend(rows, float(baseline["val_top1"]), max_drop)
        if baseline and baseline.get("val_top1") is not None
        else None
    )
    rec_row = rec.row if rec is not None else None
    identity = header.get("identity", {})
    section = search_section(rows, read_searches(searches), search_metric, identity) if searches else None

    figs = {
        "heatmap": heatmap_figure(rows, baseline=None if baseline is None else baseline.get("val_top1")),
        "pareto": pareto_figure(rows, front, rec_row),
        **(section.figures if section is not None else {}),
    }
    fig_dir = out / "figures"
    written: list[Path] = []
    for name, data in figs.items():
        for fmt, blob in data.items():
            path = fig_dir / f"{name}.{fmt}"
            fig_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_bytes(blob)
            written.append(path)

    env = header.get("environment", {})
    model = f"{identity.get('model', 'model')} x{identity.get('width', '?')}"
    title = f"bitsweep report: {model} on {identity.get('dataset', '?')} ({checkpoint_name(header.get('checkpoint'))})"
    rec_lines = _recommended_lines(rec, baseline)
    headers, body = _table(rows, COLUMNS)
    fheaders, fbody = _table(front, COLUMNS)
    highlight = next(
        (i for i, r in enumerate(rows) if rec_row is not None and r.get("cell_id") == rec_row.get("cell_id")), None
    )
    meta = {**identity, "cells finished": len(rows), "results file": _relative_to(res.path, out)}

    md = [f"# {title}", ""]
    md += ["## Recommendation", ""] + [f"- **{k}:** {v}" for k, v in rec_lines] + [""]
    md += ["## Accuracy by bit width", "", "![W x A validation accuracy heatmap](figures/heatmap.png)", ""]
    md += ["## Accuracy vs size", "", "![accuracy vs size with the Pareto front](figures/pareto.png)", ""]
    md += ["### Pareto front (validation top-1 vs packed size)", "", _md_table(fheaders, fbody), ""]
    md += section.markdown if section is not None else []
    stopped = _stopped_note(rows)
    md += ["## Every cell", "", _md_table(headers, body), ""] + ([stopped, ""] if stopped else [])
    md += ["## Sweep", "", "```json", json.dumps(meta, indent=2, default=str), "```", ""]
    md += ["## Environment (recorded at sweep time)", "", "```json", json.dumps(env, indent=2, default=str), "```", ""]
    md_path = write_text_atomic(out / "report.md", "\n".join(md))

    def img(name: str, alt: str) -> str:
        return html_img(name, figs[name]["png"], alt)

    rec_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rec_lines)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }}
th {{ background: #f3f3f3; }} #recommendation th {{ text-align: left; }} #recommendation td {{ text-align: left; }}
tr.rec td {{ background: #fff3b0; font-weight: bold; }} tr.total td {{ font-weight: bold; }}
img {{ max-width: 100%; }} pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Recommendation</h2>
<table id="recommendation">{rec_html}</table>
<h2>Accuracy by bit width</h2>
{img("heatmap", "W x A validation accuracy heatmap")}
<h2>Accuracy vs size</h2>
{img("pareto", "accuracy vs size with the Pareto front")}
<h3>Pareto front (validation top-1 vs packed size)</h3>
{_html_table(fheaders, fbody)}
{section.html if section is not None else ""}
<h2>Every cell</h2>
{_html_table(headers, body, highlight)}
{f"<p>{html.escape(stopped)}</p>" if stopped else ""}
<h2>Sweep</h2>
<pre>{html.escape(json.dumps(meta, indent=2, default=str))}</pre>
<h2>Environment (recorded at sweep time)</h2>
<pre>{html.escape(json.dumps(env, indent=2, default=str))}</pre>
</body></html>
"""
    html_path = write_text_atomic(out / "report.html", page)
    return ReportPaths(markdown=md_path, html=html_path, figures=tuple(written), recommendation=rec, search=section)
