"""Reports rebuilt from a sweep's results file alone: Markdown, self-contained HTML, PNG and SVG figures."""

from bitsweep.report.build import ReportPaths, build_report

__all__ = ["ReportPaths", "build_report"]
