"""Peak activation memory of a plan: the largest single quantized activation tensor, per image.

An integer deployment holds activations at their site's bits. The budget the
search offers (``--max-activation-kb``) bounds the *largest single tensor*,
the figure that decides the working buffer of a layer-by-layer runtime on a
microcontroller, rather than a sum over a schedule, which depends on the runtime.

What is counted: every tensor an activation quantizer holds (a site's output,
the network input, an add's re-quantized inputs), for one image (batch 1), as
``ceil(numel * bits / 8)`` bytes. Tensors left in float (the logits) and
weights are not counted. A site covering several quantizers (an add's inputs
and output) takes the largest of them.

The constraint is separable: the plan's peak is the largest of its sites' bytes,
so it is met exactly when every site meets it, and an option over the budget is
removed before solving (:func:`allowed_bits`). Shapes come from one forward pass
of a zero image through the prepared or converted model, with hooks on the
quantizers (values do not change shapes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from bitsweep.artifacts.record import ModelRecord
from bitsweep.errors import BitsweepError
from bitsweep.quant.inspect import activation_quantizers
from bitsweep.quant.output import QuantOutput
from bitsweep.search.layer_bits import activation_key


def tensor_bytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` values at ``bits`` bits, packed (whole bytes, rounded up).

    >>> tensor_bytes(6272, 4), tensor_bytes(5, 3)
    (3136, 2)
    """
    return (numel * bits + 7) // 8


@torch.no_grad()
def activation_numels(model: nn.Module, record: ModelRecord) -> dict[str, int]:
    """Site name (as plans name it) -> values in the largest tensor its quantizers hold, for one image.

    ``model`` is a model prepared by ``quantize_`` or converted; it is left as it was (a converted
    model's fused activations are un-fused for the pass, so every quantizer sees its tensor).
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    image = torch.zeros(1, record.in_channels, *record.image_size, device=device)  # (1, C, H, W)
    numels: dict[str, int] = {}
    hooks = []
    for name, q in activation_quantizers(model):
        key = activation_key(name)

        def hook(_: nn.Module, args: tuple[torch.Tensor, ...], key: str = key) -> None:
            numels[key] = max(numels.get(key, 0), args[0].numel())

        hooks.append(q.register_forward_pre_hook(hook))
    fused = [(m, m.fused) for m in model.modules() if isinstance(m, QuantOutput)]
    was_training = model.training
    try:
        for m, _ in fused:
            m.fused = False  # a fused activation skips calling its quantizer
        model.eval()(image)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in fused:
            m.fused = flag
        model.train(was_training)
    return numels


def site_bytes(numels: Mapping[str, int], bits: Mapping[str, int]) -> dict[str, int]:
    """Site -> bytes of its largest tensor at the site's bits."""
    return {site: tensor_bytes(n, bits[site]) for site, n in numels.items()}


def peak(numels: Mapping[str, int], bits: Mapping[str, int]) -> tuple[int, str]:
    """The plan's peak activation bytes and the site that holds it (the first such site in model order)."""
    sizes = site_bytes(numels, bits)
    site = max(sizes, key=lambda s: sizes[s])  # max keeps the first of equal values
    return sizes[site], site


def allowed_bits(
    numels: Mapping[str, int], candidates: Sequence[int], max_bytes: int | None
) -> dict[str, tuple[int, ...]]:
    """Site -> the candidate bits whose largest tensor fits in ``max_bytes`` (all of them when None).

    Raises:
        BitsweepError: a site with no candidate that fits, naming the smallest reachable peak (every
            site at its lowest candidate) and the site that sets it.
    """
    bits = tuple(sorted(set(candidates)))
    if max_bytes is None:
        return dict.fromkeys(numels, bits)
    out = {site: tuple(b for b in bits if tensor_bytes(n, b) <= max_bytes) for site, n in numels.items()}
    if all(out.values()):
        return out
    floor, site = peak(numels, dict.fromkeys(numels, bits[0]))
    raise BitsweepError(
        f"no plan keeps every activation tensor within {max_bytes:,} bytes; the smallest reachable peak is "
        f"{floor:,} bytes ('{site}', {numels[site]:,} values at {bits[0]} bits): raise the activation-memory "
        f"budget to at least {floor / 1000:g} kB or add lower activation bits"
    )
