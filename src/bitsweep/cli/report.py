"""``bitsweep report RESULTS [--search DIR ...]``: rebuild report.md and report.html from results files alone."""

from __future__ import annotations

import argparse
from pathlib import Path

from bitsweep.cli.common import add_command, check_writable
from bitsweep.report import build_report


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``report`` command."""
    p = add_command(
        subparsers,
        "report",
        help="build report.md and a self-contained report.html from a sweep's results.jsonl",
        description="Build report.md, report.html (images embedded, no external resources) and PNG/SVG figures "
        "from a sweep's results file alone: W x A accuracy heatmap, accuracy vs size with the Pareto front, "
        "every cell, the recommended configuration and the environment recorded at sweep time. With --search, "
        "also the mixed-precision section: the searched per-layer plans (and their QAT fine-tuning) against the "
        "uniform grid, and each plan's bits and bytes per layer.\n\n"
        "example: bitsweep report runs/fm/sweep/results.jsonl --search runs/fm/search",
    )
    p.add_argument("results", help="results.jsonl written by 'bitsweep sweep' (or its directory)")
    p.add_argument("--output", default=None, help="directory for the report; default: beside the results file")
    p.add_argument(
        "--max-drop",
        type=float,
        default=None,
        help="accuracy budget (points of validation top-1) for the recommendation; default: the sweep's own",
    )
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="a 'bitsweep search' output folder (or its search.json) of the swept checkpoint: adds the "
                   "mixed-precision section; repeatable (searches at several budgets form a front)")  # fmt: skip
    p.add_argument("--search-metric", choices=("test", "val"), default="test",
                   help="top-1 of every point in the mixed-precision section: test (the same images for the sweep "
                   "and the search, never used to choose) or val (the images the search chose on)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the report and print where it is."""
    results = Path(args.results)
    check_writable(args.output or (results if results.is_dir() else results.parent), "--output")
    paths = build_report(args.results, args.output, args.max_drop, args.search, args.search_metric)
    if paths.recommendation is not None:
        print(f"recommended: {paths.recommendation.summary()}")
    if paths.search is not None:
        for note in paths.search.notes:
            print(f"note: {note}")
        print(f"mixed-precision section: {len(args.search)} search(es), {paths.search.metric} top-1")
    print(f"report: {paths.html}")
    print(f"markdown: {paths.markdown}")
    return 0
