"""Mixed precision under a size budget: per-layer bit plans, exact packed sizes, an exact solver, sensitivity.

See docs/search.md. The layers, in the order data flows: :mod:`layer_bits` (the plan and its YAML file),
:mod:`cost` (the packed file's exact size), :mod:`activation_memory` (the peak activation tensor),
:mod:`sensitivity` (measured per-layer and per-site drops), :mod:`hessian` (the HAWQ-V2 estimate from
Hutchinson traces, a second way to rank layers under a size budget),
:mod:`solver` (the integer program), :mod:`api` (``search``, all of them in one call),
:mod:`validate` (``search_validated``: the chosen plan measured integer-exact, re-solved on a miss).
"""

from bitsweep.search.api import SearchResult, search
from bitsweep.search.cost import ByteTable, PackedLayout, PackedSize, byte_table, layout_of, packed_size
from bitsweep.search.hessian import HessianConfig, HessianSensitivity, HessianTraces, measure_hessian
from bitsweep.search.layer_bits import LayerBits, LayerNames, layer_names, load_layer_bits, save_layer_bits
from bitsweep.search.sensitivity import Sensitivity, Trial, measure_activation_sensitivity, measure_sensitivity
from bitsweep.search.solver import Choice, Group, Option, Problem, min_bytes, min_drop
from bitsweep.search.validate import Round, ValidatedPlan, search_validated

__all__ = [
    "ByteTable",
    "Choice",
    "Group",
    "HessianConfig",
    "HessianSensitivity",
    "HessianTraces",
    "LayerBits",
    "LayerNames",
    "Option",
    "PackedLayout",
    "PackedSize",
    "Problem",
    "Round",
    "SearchResult",
    "Sensitivity",
    "Trial",
    "ValidatedPlan",
    "byte_table",
    "layer_names",
    "layout_of",
    "load_layer_bits",
    "measure_activation_sensitivity",
    "measure_hessian",
    "measure_sensitivity",
    "min_bytes",
    "min_drop",
    "packed_size",
    "save_layer_bits",
    "search",
    "search_validated",
]
