"""Activation memory of one inference (batch 1): the sum over all tensors and the peak of live ones.

Weights are only half of a model's memory: on a microcontroller the
activation arena often dominates. This module counts it from the model's
dataflow graph.

Method (documented in docs/measure.md):

1. The model is traced and classified by :mod:`bitsweep.quant.graph` (quantized
   layers, activation quantizers, standard and parameter-free modules are leaves)
   and run once on a zero image of the input size with ``ShapeProp`` to get every
   tensor's shape.
2. Tensors a deployed runtime does not materialise separately are folded
   into the tensor they modify in place: BatchNorm, ReLU/ReLU6/Hardtanh,
   dropout, identity, activation quantizers and view/flatten/reshape, *when
   their input has no other user* (otherwise the input must be kept and the
   output is a new tensor). This is the conv+BN+ReLU6+requantize fusion every
   integer runtime does.
3. Total = sum of the bytes of all remaining tensors, the input image and the
   logits included. Peak = the largest sum of bytes of tensors alive at once
   while executing the graph in order: a tensor is alive from the node that
   produces it until the last node that reads it (the input of an op and its
   output are alive together; the graph output stays alive to the end).

Each tensor costs ``ceil(elements * bits / 8)`` bytes at ``bits`` bits and
``4 * elements`` bytes in FP32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from bitsweep.errors import BitsweepError
from bitsweep.quant.graph import NodeInfo, classify, is_quantized_wrapper, trace, traced_root
from bitsweep.quant.inspect import is_weight_layer
from bitsweep.quant.modules import ActivationQuantizer

# Ops a runtime applies to a tensor in place, or as a view of it (never a copy).
_INPLACE_METHODS = ("view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze")


@dataclass(frozen=True)
class ActivationTensor:
    """One materialised activation tensor."""

    name: str  # fx node name of its producer (modules folded into it are not listed)
    shape: tuple[int, ...]
    elements: int
    bits: int
    fp32_bytes: int
    quant_bytes: int


@dataclass(frozen=True)
class ActivationReport:
    """Activation memory of one batch-1 inference, per tensor and in total."""

    input_shape: tuple[int, ...]
    tensors: tuple[ActivationTensor, ...]
    total_fp32_bytes: int
    total_quant_bytes: int
    peak_fp32_bytes: int
    peak_quant_bytes: int
    peak_fp32_at: str  # node executing when the FP32 peak is reached
    peak_quant_at: str

    @property
    def total_ratio(self) -> float:
        """FP32 activation bytes / quantized activation bytes, summed over all tensors."""
        return self.total_fp32_bytes / max(1, self.total_quant_bytes)

    @property
    def peak_ratio(self) -> float:
        """FP32 peak live bytes / quantized peak live bytes."""
        return self.peak_fp32_bytes / max(1, self.peak_quant_bytes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, ratios included."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["tensors"] = [{**asdict(t), "shape": list(t.shape)} for t in self.tensors]
        d["total_ratio"] = self.total_ratio
        d["peak_ratio"] = self.peak_ratio
        return d


def _is_inplace(node: fx.Node, n: NodeInfo) -> bool:
    """Whether a node's output can live in its input's storage (a fused BN, clamp, quantizer or view)."""
    if node.op == "call_method" and node.target in _INPLACE_METHODS:  # also x.view(x.size(0), -1)
        return True
    if isinstance(n.module, (nn.BatchNorm1d, nn.BatchNorm2d)) or n.kind == "quantizer":
        return True
    if n.kind == "activation":  # clamps (ReLU, ReLU6, Hardtanh; wrapped or not) fold into the producer
        return n.clamp is not None
    if n.kind == "passthrough" and n.ops is not None:  # identity, dropout, flatten, reshape; not max pooling
        return all(op[0] == "flatten" or (op[0] == "method" and op[1] in _INPLACE_METHODS) for op in n.ops)
    return False


def _quantizer_bits(n: NodeInfo) -> int | None:
    m = n.module
    if m is None:
        return None
    if n.kind == "quantizer":
        return int(cast(ActivationQuantizer, m).spec.bits)  # classify: an activation quantizer
    out_q = getattr(m, "output_quantizer", None) if is_weight_layer(m) or is_quantized_wrapper(m) else None
    return int(out_q.spec.bits) if out_q is not None else None


def activation_memory(model: nn.Module, input_shape: tuple[int, ...], bits: int | None = None) -> ActivationReport:
    """Count the activation memory of one inference of ``model`` on a batch of one.

    Args:
        model: a float or quantized model (left unchanged; run once in eval mode on zeros).
        input_shape: ``(C, H, W)`` of one image; batch 1 is prepended.
        bits: store every activation at this width. ``None`` uses the width of the
            activation quantizer folded into each tensor and 32 bits for tensors
            without one (as a float runtime would).

    Raises:
        BitsweepError: when the model cannot be traced by ``torch.fx`` or ``bits`` is out of 1..32.
    """
    if bits is not None and not 1 <= bits <= 32:
        raise BitsweepError(f"activation bits must be from 1 to 32, got {bits}")
    graph = trace(model, "counting activations")
    assert graph is not None
    gm = fx.GraphModule(traced_root(model), graph)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros((1, *input_shape), device=device)
    was_training = model.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    finally:
        model.train(was_training)

    info = classify(model, gm.graph)
    nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr",)]
    index = {n: i for i, n in enumerate(nodes)}
    owner: dict[fx.Node, fx.Node] = {}  # node -> node whose storage it shares
    group_bits: dict[fx.Node, int | None] = {}
    for n in nodes:
        if n.op == "output":
            continue
        meta = n.meta.get("tensor_meta")
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if src is not None and src in owner and _is_inplace(n, info.nodes[n]) and len(src.users) == 1:
            root = owner[src]
            owner[n] = root
            qb = _quantizer_bits(info.nodes[n])
            if qb is not None:
                group_bits[root] = qb
        elif meta is not None and hasattr(meta, "shape"):
            owner[n] = n
            group_bits[n] = _quantizer_bits(info.nodes[n])
            if n.op == "placeholder":  # the image is quantized by its consumer's input quantizer
                for u in n.users:
                    in_q = getattr(info.nodes[u].module, "input_quantizer", None)
                    if in_q is not None:
                        group_bits[n] = int(in_q.spec.bits)
    # Last use of each group: the latest node reading any member; the output keeps its tensor to the end.
    last_use: dict[fx.Node, int] = {root: index[root] for root in group_bits}
    for n in nodes:
        for inp in n.all_input_nodes:
            group = owner.get(inp)
            if group is not None:
                last_use[group] = max(last_use[group], index[n])

    tensors: list[ActivationTensor] = []
    sizes: dict[fx.Node, tuple[int, int]] = {}
    for root, qbits in group_bits.items():
        shape = tuple(int(s) for s in root.meta["tensor_meta"].shape)
        elements = 1
        for s in shape:
            elements *= s
        b = bits if bits is not None else (qbits if qbits is not None else 32)
        t = ActivationTensor(str(root.name), shape, elements, b, 4 * elements, (elements * b + 7) // 8)
        tensors.append(t)
        sizes[root] = (t.fp32_bytes, t.quant_bytes)

    peak = [0, 0]
    peak_at = ["", ""]
    for i, n in enumerate(nodes):
        live = [r for r in group_bits if index[r] <= i <= last_use[r]]
        for k in (0, 1):
            s = sum(sizes[r][k] for r in live)
            if s > peak[k]:
                peak[k], peak_at[k] = s, str(n.name)
    return ActivationReport(
        input_shape=tuple(x.shape),
        tensors=tuple(tensors),
        total_fp32_bytes=sum(t.fp32_bytes for t in tensors),
        total_quant_bytes=sum(t.quant_bytes for t in tensors),
        peak_fp32_bytes=peak[0],
        peak_quant_bytes=peak[1],
        peak_fp32_at=peak_at[0],
        peak_quant_at=peak_at[1],
    )
