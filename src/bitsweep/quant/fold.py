"""BatchNorm folding: merge each BatchNorm2d into the Conv2d that feeds it.

An integer deployment never runs BatchNorm: its affine transform is folded
into the preceding convolution (``w' = w * gamma / sqrt(var + eps)``,
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``), so the weights that get
quantized are the folded ones, and evaluation runs one op fewer per layer.
Pairs are found in the fx graph of :func:`bitsweep.quant.graph.trace` (a conv whose only user is a BN) or, when
the model cannot be traced, by module order inside ``nn.Sequential``.
Folding uses the running statistics, so it is exact for a model in eval mode.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from bitsweep.quant.graph import trace


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` in place (weights and a new bias keep their device and dtype)."""
    w = conv.weight
    var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features, device=w.device)
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features, device=w.device)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(var)
    factor = gamma.float() / torch.sqrt(var.float() + bn.eps)  # (C_out,)
    bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(factor)
    conv.weight.copy_((w.float() * factor.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    new_bias = ((bias - mean.float()) * factor + beta.float()).to(w.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    graph = trace(model)  # None: untraceable, use the module-order fallback
    if graph is None:
        return None
    mods = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(src.target), nn.Conv2d)
            and len(src.users) == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        children = list(mod.named_children())
        for (a, ma), (b, mb) in zip(children, children[1:], strict=False):
            if isinstance(ma, nn.Conv2d) and isinstance(mb, nn.BatchNorm2d):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every Conv2d -> BatchNorm2d pair in place; the BN becomes ``nn.Identity``.

    Returns:
        The (conv name, bn name) pairs folded, so callers can report them.
    """
    pairs = _pairs_fx(model)
    if pairs is None:
        pairs = _pairs_sequential(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or conv.out_channels != bn.num_features:
            continue
        fold_conv_bn(conv, bn)
        _set_module(model, bn_name, nn.Identity())
    return pairs
