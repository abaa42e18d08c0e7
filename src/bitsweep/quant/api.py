"""quantize_ / calibrate / convert: post-training quantization in three calls.

>>> import torch
>>> from torch import nn
>>> from bitsweep.quant import QuantConfig, quantize_, calibrate, convert
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
>>> summary = quantize_(model, QuantConfig.from_bits(4, 8))
>>> summary.weight_count, summary.activation_count
(2, 2)
>>> stats = calibrate(model, [torch.randn(8, 1, 8, 8) for _ in range(2)], num_batches=2)
>>> model = convert(model)
>>> model[0].weight_quantizer.int_weight().abs().max().item() <= 7
True

The statistics returned by :func:`calibrate` do not depend on bit widths:
pass them to ``convert(other_prepared_model, stats)`` to reuse one
calibration for any other config of the same float model.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from bitsweep.errors import BitsweepError
from bitsweep.quant.config import QuantConfig
from bitsweep.quant.fold import _set_module, fold_batchnorm
from bitsweep.quant.graph import GraphInfo, classify, module_kind, trace
from bitsweep.quant.modules import ActivationQuantizer, QuantConv2d, QuantLinear
from bitsweep.quant.observers import ActivationStats
from bitsweep.quant.output import QuantOutput

FilterFn = Callable[[nn.Module, str], bool]
CalibrationStats = dict[str, ActivationStats]  # activation quantizer name -> statistics


@dataclass(frozen=True)
class QuantSummary:
    """What ``quantize_`` did: quantizers by name with their bits, and what stayed in floating point."""

    weight_quantizers: tuple[tuple[str, int], ...]
    activation_quantizers: tuple[tuple[str, str, int], ...]  # (name, site, bits)
    left_in_fp: tuple[str, ...]
    folded_bn: int = 0
    traced: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def weight_count(self) -> int:
        """Number of quantized weight layers."""
        return len(self.weight_quantizers)

    @property
    def activation_count(self) -> int:
        """Number of activation quantizers."""
        return len(self.activation_quantizers)

    def describe(self) -> str:
        """A few human-readable lines (used by the CLI)."""

        def by_bits(items: Iterable[int]) -> str:
            counts: dict[int, int] = {}
            for b in items:
                counts[b] = counts.get(b, 0) + 1
            return ", ".join(f"{n} at {b} bits" for b, n in sorted(counts.items())) or "none"

        sites: dict[str, int] = {}
        for _, site, _ in self.activation_quantizers:
            sites[site] = sites.get(site, 0) + 1
        lines = [
            f"weight quantizers: {self.weight_count} ({by_bits(b for _, b in self.weight_quantizers)})",
            f"activation quantizers: {self.activation_count} ({by_bits(b for _, _, b in self.activation_quantizers)};"
            f" sites: {', '.join(f'{k} {v}' for k, v in sorted(sites.items()))})",
            f"BatchNorm layers folded: {self.folded_bn}",
            f"left in floating point: {', '.join(self.left_in_fp) if self.left_in_fp else 'none'}",
        ]
        return "\n".join(lines + list(self.notes))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON records."""
        return {
            "weight_quantizers": [list(w) for w in self.weight_quantizers],
            "activation_quantizers": [list(a) for a in self.activation_quantizers],
            "left_in_fp": list(self.left_in_fp),
            "folded_bn": self.folded_bn,
            "traced": self.traced,
        }


def _swap_weights(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None) -> list[str]:
    left = []
    for name, m in list(model.named_modules()):
        if isinstance(m, (QuantConv2d, QuantLinear)):
            continue
        if type(m) in (nn.Conv2d, nn.Linear):
            spec = config.spec_for(name)
            if spec is None or (filter_fn is not None and not filter_fn(m, name)):
                left.append(name)
                continue
            cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
            _set_module(model, name, cls.from_float(m, spec, config.weight_observer))
        elif list(m.parameters(recurse=False)) or isinstance(m, nn.modules.batchnorm._BatchNorm):
            left.append(name)  # unfolded BatchNorm, Conv1d, LayerNorm, PReLU, ...: computed in floating point
    return left


def _new_quantizer(config: QuantConfig, name: str, site: str, inplace: bool = False) -> ActivationQuantizer | None:
    spec = config.activation_spec_for(name)
    return None if spec is None else ActivationQuantizer(spec, config.activation_observer, site, inplace)


def _insert_activation_quantizers(model: nn.Module, config: QuantConfig, info: GraphInfo, notes: list[str]) -> None:
    """Attach quantizers to every site of the classified graph (module swaps; fx rewrite for functions)."""
    graph = info.graph
    mods = dict(model.named_modules())
    uses: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            uses[str(n.target)] = uses.get(str(n.target), 0) + 1
    quantized: set[fx.Node] = set()  # nodes whose output sits on a grid
    graph_sites: list[tuple[fx.Node, str, fx.Node | None]] = []  # (node, site, consumer for input edges)
    wrapped: dict[str, QuantOutput] = {}

    for node in list(graph.nodes):
        kind = info.kind(node)
        target = str(node.target)
        own_module = node.op == "call_module" and uses[target] == 1
        if kind == "input" and node.users:
            users = list(node.users)
            user_mod = mods.get(str(users[0].target)) if len(users) == 1 and users[0].op == "call_module" else None
            if isinstance(user_mod, (QuantConv2d, QuantLinear)) and uses[str(users[0].target)] == 1:
                user_mod.input_quantizer = _new_quantizer(config, str(users[0].target), "input")
            else:
                graph_sites.append((node, "input", None))
            quantized.add(node)
        elif kind == "passthrough":
            if _node_inputs_quantized(node, quantized, info):
                quantized.add(node)
        elif kind == "weight" and own_module:
            m = mods[target]
            users = _consumers(node, info)
            fused = users and all(info.kind(u) == "activation" for u in users)
            to_output = all(u.op == "output" for u in users)
            if isinstance(m, (QuantConv2d, QuantLinear)) and not fused and not to_output:
                m.output_quantizer = _new_quantizer(config, target, "output", inplace=True)
                quantized.add(node)
        elif kind in ("activation", "pool", "add"):
            inputs = [a for a in (node.args[:2] if kind == "add" else ()) if isinstance(a, fx.Node)]
            edge = [None if a in quantized else a for a in inputs]
            if own_module:
                in_q = [None if e is None else _new_quantizer(config, target, "add_input") for e in edge]
                out_q = _new_quantizer(config, target, kind, inplace=True)
                wrapped[target] = QuantOutput(mods[target], out_q, in_q if any(q is not None for q in in_q) else None)
            else:
                graph_sites.append((node, kind, None))
                graph_sites.extend((e, "add_input", node) for e in edge if e is not None)
            quantized.add(node)

    for target, wrapper in wrapped.items():
        _set_module(model, target, wrapper)
    if graph_sites:
        _rewrite_graph(model, graph, config, graph_sites)
        notes.append(f"{len(graph_sites)} activation quantizers inserted in the traced forward (functional ops)")


def _consumers(node: fx.Node, info: GraphInfo) -> list[fx.Node]:
    """Users of ``node``, looking through passthrough nodes (a folded BN's Identity, Dropout, Flatten)."""
    out: list[fx.Node] = []
    for u in node.users:
        out.extend(_consumers(u, info) if info.kind(u) == "passthrough" and u.users else [u])
    return out


def _node_inputs_quantized(node: fx.Node, quantized: set[fx.Node], info: GraphInfo) -> bool:
    tensors = [a for a in node.all_input_nodes if info.is_tensor(a)]
    return bool(tensors) and all(a in quantized for a in tensors)


def _rewrite_graph(
    model: nn.Module, graph: fx.Graph, config: QuantConfig, sites: list[tuple[fx.Node, str, fx.Node | None]]
) -> None:
    """Insert quantizer calls after function nodes (or on input edges) and bind the new forward to ``model``."""
    for node, site, consumer in sites:
        name = f"quant_{site}_{node.name}" if consumer is None else f"quant_{site}_{node.name}_to_{consumer.name}"
        q = _new_quantizer(config, name, site)
        if q is None:
            continue
        model.add_module(name, q)
        with graph.inserting_after(node):
            new = graph.call_module(name, (node,))
        if consumer is None:
            node.replace_all_uses_with(new, delete_user_cb=functools.partial(operator.is_not, new))  # not new itself
        else:
            consumer.replace_input_with(node, new)
    graph.lint()
    gm = fx.GraphModule(model, graph)
    model.forward = gm.forward


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> QuantSummary:
    """Prepare ``model`` for quantization in place and say what was done.

    Folds BatchNorm (``config.fold_bn``), swaps Conv2d/Linear for
    :class:`QuantConv2d`/:class:`QuantLinear` (same device, dtype and
    parameters) and attaches :class:`ActivationQuantizer` modules at every
    site an integer deployment holds (see :mod:`bitsweep.quant.graph`).
    Until :func:`convert`, the model computes exactly what the float model did.

    Args:
        model: any ``nn.Module`` made of standard layers (eval mode for BN folding).
        config: the recipe.
        filter_fn: ``filter_fn(module, name)`` False keeps that weight layer in floating point.

    Raises:
        BitsweepError: if the model has no Conv2d or Linear layer to quantize.
    """
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()):
        raise BitsweepError(
            "the model has no Conv2d or Linear layer to quantize; pass a model built from standard layers"
        )
    folded = fold_batchnorm(model) if config.fold_bn else []
    left = _swap_weights(model, config, filter_fn) if config.weight is not None or config.overrides else []
    if config.weight is None:
        left = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    notes: list[str] = []
    graph = trace(model)
    if config.activation is not None:
        if graph is not None:
            _insert_activation_quantizers(model, config, classify(model, graph), notes)
        else:
            notes.append("model could not be traced by torch.fx: activation sites found by module only")
            _insert_fallback(model, config)
    weights = tuple(
        (n, m.weight_quantizer.spec.bits) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))
    )
    acts = tuple((n, m.site, m.spec.bits) for n, m in model.named_modules() if isinstance(m, ActivationQuantizer))
    if not weights and not acts:
        raise BitsweepError("nothing was quantized: every layer was skipped by overrides or filter_fn; loosen them")
    return QuantSummary(weights, acts, tuple(left), len(folded), graph is not None, tuple(notes))


def _insert_fallback(model: nn.Module, config: QuantConfig) -> None:
    """Module-order fallback for untraceable models: wrap activation, pooling and add modules."""
    first = next((m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))), None)
    if first is not None:
        first.input_quantizer = _new_quantizer(config, "input", "input")
    for name, m in list(model.named_modules()):
        if name and not list(m.children()):
            kind = module_kind(m)
            if kind in ("activation", "pool", "add"):
                _set_module(model, name, QuantOutput(m, _new_quantizer(config, name, kind)))


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """Every activation quantizer of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ActivationQuantizer)}


@contextlib.contextmanager
def calibration(model: nn.Module) -> Iterator[None]:
    """Observe activations with float weights, in eval mode and without gradients; restore afterwards."""
    was_training = model.training
    quantizers = activation_quantizers(model).values()
    old = [(q, q.mode) for q in quantizers]
    weight_modes = [(m, m.weight_mode) for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    model.eval()
    for q in quantizers:
        q.mode, q.stats = "observe", ActivationStats()
    for m, _ in weight_modes:
        m.weight_mode = "off"
    try:
        with torch.no_grad():
            yield
    finally:
        for q, mode in old:
            q.mode = "off" if mode == "observe" else mode
        for m, mode in weight_modes:
            m.weight_mode = mode
        model.train(was_training)


def calibrate(model: nn.Module, loader: Iterable[Any], num_batches: int | None = None) -> CalibrationStats:
    """Run up to ``num_batches`` batches through a prepared model and return the activation statistics.

    ``loader`` yields tensors or ``(images, labels)`` pairs already on the model's device.

    Raises:
        BitsweepError: if the loader yields no batch or ``num_batches`` is not positive.
    """
    if num_batches is not None and num_batches <= 0:
        raise BitsweepError(f"calibration batches must be a positive whole number, got {num_batches}")
    seen = 0
    with calibration(model):
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            seen += 1
            if num_batches is not None and seen >= num_batches:
                break
    if seen == 0:
        raise BitsweepError("the calibration set is empty; give a loader with at least one batch of images")
    return {n: q.stats for n, q in activation_quantizers(model).items() if q.stats is not None}


def convert(model: nn.Module, stats: CalibrationStats | None = None) -> nn.Module:
    """Freeze qparams and quantize weights once; returns ``model`` (changed in place).

    Args:
        model: a model prepared by :func:`quantize_`.
        stats: statistics from :func:`calibrate` on this or an identically prepared model
            (default: the ones each quantizer collected).

    Raises:
        BitsweepError: if an activation quantizer has no statistics (calibrate first).
    """
    for name, q in activation_quantizers(model).items():
        st = stats.get(name) if stats is not None else q.stats
        if st is None or st.batches == 0:
            raise BitsweepError(
                f"activation quantizer '{name}' has no calibration statistics; run calibrate(model, loader, n) first"
            )
        spec = st.effective_spec(q.requested_spec)
        scale, zero_point = st.qparams(spec, q.observer)
        q.set_qparams(spec, scale, zero_point)
    for m in model.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.convert_weight()
        elif isinstance(m, QuantOutput):
            m.try_fuse()
    return model
