"""Cross-layer equalization and high-bias absorption (Nagel et al., 2019, "Data-Free Quantization").

Per-channel weight ranges of consecutive convolutions differ by orders of magnitude in
MobileNet-v2 (depthwise convolutions most of all), so a per-tensor or even a per-channel grid
wastes levels on one layer of the pair. For ``conv1 -> ReLU -> conv2`` the rescaling
``W1[i] / s_i``, ``b1[i] / s_i``, ``W2[:, i] * s_i`` leaves the function unchanged because
``ReLU(x / s) = ReLU(x) / s`` for ``s > 0``; choosing ``s_i = sqrt(r1_i / r2_i)`` (``r`` the
channel's weight range in each layer) gives both layers the same range per channel.

**ReLU6.** ``ReLU6`` is not positive-homogeneous: after rescaling, channel ``i`` would need the
bound ``6 / s_i``. bitsweep's integer program, packed file and ONNX export carry one clamp per
tensor, so equalized pairs use ``ReLU`` instead of ``ReLU6`` (as AIMET and the paper do). That
swap is the only change to the float function; it is data-free and depends on the architecture
alone, so a saved model replays it (:func:`relu6_to_relu`) before its quantizers are restored.
The activation quantizer after the ReLU still bounds the range (calibrated, not 6).

**High-bias absorption.** Equalization can leave large biases, which widen activation ranges.
Where channel ``i`` of ``conv1``'s output is at least ``c_i >= 0`` on every calibration image,
``ReLU(x) = ReLU(x - c_i) + c_i``, so ``c_i`` moves from ``b1`` into ``conv2``'s bias
(``b2 += sum W2[:, i] * c_i``). ``c_i`` is the per-channel minimum over the calibration images
(exact on them; the paper's data-free ``beta - 3 gamma`` is a guess at the same number). Only
``conv2`` without padding absorbs, since a padded border would not see the constant.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 2, 1)).eval()
>>> [p.conv2 for p in find_pairs(model)]
['2']
>>> x = torch.randn(8, 3, 5, 5)
>>> ref = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
>>> _ = ref.load_state_dict(model.state_dict())
>>> report = cross_layer_equalization(model, x)
>>> type(model[1]).__name__, report.pairs
('ReLU', 1)
>>> bool((model(x) - ref(x)).abs().max() < 1e-5)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from bitsweep.quant.fold import _set_module, fold_batchnorm
from bitsweep.quant.graph import trace

_PASS = (nn.BatchNorm2d, nn.Identity, nn.Dropout)  # single-input modules a pair may run through unchanged in scale
_ACTS = (nn.ReLU, nn.ReLU6)


@dataclass(frozen=True)
class EqualizationPair:
    """``conv1 -> [BatchNorm] -> act -> conv2``, each output used once, channel i of conv1 feeding channel i."""

    conv1: str
    act: str
    conv2: str


@dataclass(frozen=True)
class EqualizationReport:
    """What :func:`cross_layer_equalization` did (for logs and results files).

    Attributes:
        pairs: how many convolution pairs were equalized.
        sweeps: passes over all pairs until the scales settled.
        range_ratio_before / range_ratio_after: the median over pairs of the mean per-channel
            ``max(r1_i, r2_i) / min(r1_i, r2_i)`` (1.0 = perfectly balanced).
        absorbed: channels whose high bias moved into the next layer.
        relu6_replaced: ReLU6 modules turned into ReLU.
    """

    pairs: int
    sweeps: int
    range_ratio_before: float
    range_ratio_after: float
    absorbed: int
    relu6_replaced: int


def _depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _plain_or_depthwise(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Conv2d) and (m.groups == 1 or _depthwise(m))


def _only_user(node: fx.Node, mods: dict[str, nn.Module]) -> fx.Node | None:
    """The single node using ``node``'s output, looking through BatchNorm/Identity/Dropout modules."""
    while True:
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
        if not (node.op == "call_module" and isinstance(mods.get(str(node.target)), _PASS)):
            return node


def find_pairs(model: nn.Module) -> list[EqualizationPair]:
    """Every ``conv1 -> act -> conv2`` pair in ``model`` that equalization may rescale (data-free).

    Both convolutions are plain (``groups == 1``) or depthwise; the activation is an ``nn.ReLU``
    or ``nn.ReLU6`` module; nothing else reads ``conv1``'s or the activation's output. BatchNorm
    between ``conv1`` and the activation is allowed (it is folded first), so the pairs of a model
    before and after folding are the same. An untraceable model has no pairs.
    """
    graph = trace(model)
    if graph is None:
        return []
    mods = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _plain_or_depthwise(mods.get(str(node.target))):
            continue
        act = _only_user(node, mods)
        if act is None or act.op != "call_module" or not isinstance(mods.get(str(act.target)), _ACTS):
            continue
        nxt = _only_user(act, mods)
        if nxt is None or nxt.op != "call_module" or not _plain_or_depthwise(mods.get(str(nxt.target))):
            continue
        conv1, conv2 = mods[str(node.target)], mods[str(nxt.target)]
        assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
        if conv1.out_channels == conv2.in_channels:
            pairs.append(EqualizationPair(str(node.target), str(act.target), str(nxt.target)))
    return pairs


def relu6_to_relu(model: nn.Module, pairs: list[EqualizationPair] | None = None) -> int:
    """Replace the ReLU6 of every pair with ReLU (in place); returns how many were replaced.

    The structural half of equalization: it needs no data, so loading a model saved with the
    ``cle`` method repeats it on the freshly built architecture before restoring the quantizers.
    """
    replaced = 0
    for pair in find_pairs(model) if pairs is None else pairs:
        if isinstance(model.get_submodule(pair.act), nn.ReLU6):
            _set_module(model, pair.act, nn.ReLU())
            replaced += 1
    return replaced


def _out_ranges(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).amax(dim=1)  # (C_out,)


def _in_ranges(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach().abs()
    return w.flatten(1).amax(dim=1) if _depthwise(conv) else w.transpose(0, 1).flatten(1).amax(dim=1)  # (C_in,)


def _median_imbalance(model: nn.Module, pairs: list[EqualizationPair]) -> float:
    """The median over pairs of :func:`_imbalance` (1.0 without pairs)."""
    values = []
    for pair in pairs:
        conv1, conv2 = model.get_submodule(pair.conv1), model.get_submodule(pair.conv2)
        assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
        values.append(_imbalance(_out_ranges(conv1), _in_ranges(conv2)))
    return float(torch.tensor(values).median()) if values else 1.0


def _imbalance(r1: torch.Tensor, r2: torch.Tensor) -> float:
    ok = (r1 > 0) & (r2 > 0)
    if not ok.any():
        return 1.0
    hi, lo = torch.maximum(r1[ok], r2[ok]), torch.minimum(r1[ok], r2[ok])
    return float((hi / lo).mean())


@torch.no_grad()
def _rescale(conv1: nn.Conv2d, conv2: nn.Conv2d, s: torch.Tensor) -> None:
    """conv1's output channel i divided by s_i, conv2's input channel i multiplied by it."""
    shape1 = (-1,) + (1,) * (conv1.weight.dim() - 1)
    conv1.weight.div_(s.reshape(shape1).to(conv1.weight.dtype))
    if conv1.bias is not None:
        conv1.bias.div_(s.to(conv1.bias.dtype))
    if _depthwise(conv2):
        conv2.weight.mul_(s.reshape(shape1).to(conv2.weight.dtype))
    else:
        conv2.weight.mul_(s.reshape(1, -1, 1, 1).to(conv2.weight.dtype))


@torch.no_grad()
def equalize(model: nn.Module, pairs: list[EqualizationPair], max_sweeps: int = 20, tol: float = 1e-4) -> int:
    """Balance every pair's per-channel weight ranges in place (BatchNorm already folded, ReLU activations).

    A layer between two pairs (a depthwise convolution) is rescaled from both sides, so passes over
    all pairs repeat until no scale moves by more than ``tol`` (relative), at most ``max_sweeps`` times.

    Returns:
        The number of passes made.
    """
    for sweep in range(1, max_sweeps + 1):
        moved = 0.0
        for pair in pairs:
            conv1, conv2 = model.get_submodule(pair.conv1), model.get_submodule(pair.conv2)
            assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
            r1, r2 = _out_ranges(conv1).double(), _in_ranges(conv2).double()
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-300)), torch.ones_like(r1))
            moved = max(moved, float((s - 1).abs().max()))
            _rescale(conv1, conv2, s)
        if moved < tol:
            return sweep
    return max_sweeps


@torch.no_grad()
def absorb_high_bias(model: nn.Module, pairs: list[EqualizationPair], images: torch.Tensor) -> int:
    """Move each channel's guaranteed positive offset from conv1's bias into conv2's (see the module docstring).

    Returns:
        The number of channels that absorbed a non-zero offset.
    """
    eligible = [p for p in pairs if all(int(v) == 0 for v in _padding(model.get_submodule(p.conv2)))]
    if not eligible or len(images) == 0:
        return 0
    lows: dict[str, torch.Tensor] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(_: nn.Module, __: object, out: torch.Tensor) -> None:
            low = out.detach().transpose(0, 1).flatten(1).amin(dim=1)  # (C,)
            lows[name] = torch.minimum(lows[name], low) if name in lows else low

        return record

    handles = [model.get_submodule(p.conv1).register_forward_hook(hook(p.conv1)) for p in eligible]
    try:
        for batch in torch.split(images, 256):
            model(batch)
    finally:
        for h in handles:
            h.remove()
    absorbed = 0
    for pair in eligible:
        conv1, conv2 = model.get_submodule(pair.conv1), model.get_submodule(pair.conv2)
        assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
        c = lows[pair.conv1].clamp_min(0)
        if conv1.bias is None or not bool((c > 0).any()):
            continue
        w2 = conv2.weight.detach()
        shift = (w2.flatten(1).sum(dim=1) * c) if _depthwise(conv2) else w2.sum(dim=(2, 3)) @ c  # (C_out2,)
        if conv2.bias is None:
            conv2.bias = nn.Parameter(torch.zeros(conv2.out_channels, dtype=w2.dtype, device=w2.device))
        conv1.bias.sub_(c.to(conv1.bias.dtype))
        conv2.bias.add_(shift.to(conv2.bias.dtype))
        absorbed += int((c > 0).sum())
    return absorbed


def _padding(conv: nn.Module) -> tuple[int, ...]:
    assert isinstance(conv, nn.Conv2d)
    if isinstance(conv.padding, str):
        return (0,) if conv.padding == "valid" else (1,)
    return tuple(conv.padding)


@torch.no_grad()
def cross_layer_equalization(
    model: nn.Module, images: torch.Tensor | None = None, *, absorb: bool = True
) -> EqualizationReport:
    """Fold BatchNorm, turn the pairs' ReLU6 into ReLU, equalize, and absorb high biases, in place.

    Args:
        model: a float model in eval mode.
        images: calibration images (N, C, H, W) for high-bias absorption; None skips absorption.
        absorb: whether to absorb high biases at all.
    """
    fold_batchnorm(model)
    pairs = find_pairs(model)
    replaced = relu6_to_relu(model, pairs)
    before = _median_imbalance(model, pairs)
    sweeps = equalize(model, pairs) if pairs else 0
    after = _median_imbalance(model, pairs)
    absorbed = absorb_high_bias(model, pairs, images) if absorb and images is not None else 0
    return EqualizationReport(
        len(pairs),
        sweeps,
        before,
        after,
        absorbed,
        replaced,
    )
