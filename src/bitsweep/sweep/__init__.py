"""Sweeps over bit widths: grid expansion, a resumable parallel runner, the Pareto front and a recommendation."""

from bitsweep.sweep.grid import AXES, Cell, baseline_cell, expand_grid
from bitsweep.sweep.pareto import Recommendation, pareto_front, recommend
from bitsweep.sweep.results import SweepResults, make_header, read_results
from bitsweep.sweep.runner import ExecutorConfig, SweepRun, run_sweep

__all__ = [
    "AXES",
    "Cell",
    "ExecutorConfig",
    "Recommendation",
    "SweepResults",
    "SweepRun",
    "baseline_cell",
    "expand_grid",
    "make_header",
    "pareto_front",
    "read_results",
    "recommend",
    "run_sweep",
]
