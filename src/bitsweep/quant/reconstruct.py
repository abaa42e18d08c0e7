"""Reconstruction: learned rounding (AdaRound) per layer or per block, with learned activation steps and QDrop.

Rounding every weight to its nearest level is optimal per weight, not per
layer: the errors of a row add up in each output. AdaRound (Nagel et al.,
2020) chooses, for every weight, floor or ceiling of ``w / scale`` so that the
output on calibration images stays close to the float network's. The choice
is relaxed to a soft value ``h(V)`` in [0, 1] (a rectified sigmoid), optimised
with Adam, and pushed to 0 or 1 by an annealed regulariser
``sum(1 - |2h - 1|^beta)``; at the end each weight gets ``floor + (h >= 0.5)``.

Units are reconstructed one after another in execution order, each fed the
inputs of the already-reconstructed quantized network (so later units absorb
earlier errors) and fitted to the float network's output:

* ``unit="layer"``: each weight layer alone, pre-activation output (AdaRound).
* ``unit="block"``: each block (a child of an ``nn.Sequential``/``ModuleList``
  holding weight layers: MobileNet-v2's inverted residuals, ResNet's basic
  blocks; weight layers outside any block are their own unit), all its
  roundings at once against the float block output (BRECQ, Li et al., 2021).
  With ``learn_activations`` the step sizes of the block's activation
  quantizers are learned too (LSQ, Esser et al., 2020).
* ``drop_prob > 0``: during reconstruction each activation element keeps its
  float value with that probability instead of being quantized (QDrop, Wei et
  al., 2022), which flattens the loss surface the rounding is fitted on.

Only integers and activation scales change, so every result lowers to the
same integer program.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from bitsweep.errors import BitsweepError
from bitsweep.quant.capture import WeightLayer, execution_order, float_mode, module_inputs
from bitsweep.quant.modules import ActivationQuantizer
from bitsweep.quant.output import QuantOutput

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid, so h reaches exactly 0 and 1
UNITS = ("layer", "block")


@dataclass(frozen=True)
class ReconstructConfig:
    """Settings of the reconstruction.

    Attributes:
        unit: ``layer`` (AdaRound) or ``block`` (BRECQ).
        iterations: Adam steps per unit.
        batch_size: calibration images per step.
        lr: Adam learning rate of the rounding variables.
        act_lr: Adam learning rate of the activation step sizes (``learn_activations``). 1e-2 was chosen on
            validation images at W4A4 (Fashion-MNIST recipe model, 500 steps): 4e-4, 4e-3, 1e-2 and 2e-2 gave
            89.02, 90.36, 90.96 and 90.78 %; with few steps a small rate leaves the min-max ranges of 4-bit
            activations almost where calibration put them.
        reg_weight: weight of the rounding regulariser against the reconstruction error.
        beta_start / beta_end: annealing of the regulariser's exponent (sharp at the end).
        warmup: fraction of the steps with no regulariser (pure reconstruction).
        learn_activations: learn the step size of the unit's activation quantizers (LSQ).
        drop_prob: QDrop: probability that an activation element stays float during reconstruction.
        seed: randomness of batch choice and QDrop.
    """

    unit: str = "layer"
    iterations: int = 500
    batch_size: int = 32
    lr: float = 1e-2
    act_lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    learn_activations: bool = False
    drop_prob: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"reconstruction unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("reconstruction iterations and batch size must be positive whole numbers")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {self.drop_prob}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")


@dataclass(frozen=True)
class UnitResult:
    """Reconstruction error of one unit before (nearest rounding) and after, and the integers changed."""

    name: str
    nearest_mse: float
    learned_mse: float
    flipped: float  # fraction of the unit's weight integers that differ from nearest rounding


def soft_rounding(v: torch.Tensor) -> torch.Tensor:
    """The rectified sigmoid h(V) in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(rest: torch.Tensor) -> torch.Tensor:
    """V with h(V) equal to the fractional part ``rest`` (so optimisation starts at the float weight)."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def beta_at(step: int, cfg: ReconstructConfig) -> float | None:
    """The regulariser's exponent at ``step`` (None during warm-up): cosine from beta_start to beta_end."""
    start = int(cfg.warmup * cfg.iterations)
    if step < start:
        return None
    t = (step - start) / max(1, cfg.iterations - start)
    return cfg.beta_end + 0.5 * (cfg.beta_start - cfg.beta_end) * (1 + math.cos(t * math.pi))


class SoftWeight:
    """The learnable rounding of one converted layer: ``w_soft = clamp(floor(w/s) + h(V), lo, hi) * s``."""

    def __init__(self, layer: WeightLayer) -> None:
        self.layer = layer
        wq = layer.weight_quantizer
        w = layer.weight.detach().float()
        shape = [-1] + [1] * (w.dim() - 1) if wq.spec.per_channel else [1] * w.dim()
        self.scale = wq.scale.float().reshape(shape)
        self.zp = wq.zero_point.float().reshape(shape)
        self.base = torch.floor(w / self.scale)  # same shape as w
        rest = w / self.scale - self.base
        self.free = rest > 0  # weights already on a level have no floor/ceiling choice: they keep it
        self.lo, self.hi = wq.spec.qmin - self.zp, wq.spec.qmax - self.zp
        self.v = nn.Parameter(initial_v(rest))

    def h(self) -> torch.Tensor:
        """Soft rounding, zero where there is no choice."""
        return soft_rounding(self.v) * self.free

    def weight(self) -> torch.Tensor:
        """The soft-rounded weight (differentiable in V)."""
        return torch.clamp(self.base + self.h(), self.lo, self.hi) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2h - 1|^beta)`` over the weights with a choice."""
        return ((1 - (2 * soft_rounding(self.v) - 1).abs().pow(beta)) * self.free).sum()

    @torch.no_grad()
    def commit(self) -> float:
        """Store the hard rounding as the layer's integers; returns the fraction changed from nearest."""
        wq = self.layer.weight_quantizer
        hard = (soft_rounding(self.v) >= 0.5) & self.free
        q = (torch.clamp(self.base + hard.float(), self.lo, self.hi) + self.zp).to(torch.int32)
        flipped = float((q != wq.q).float().mean())
        self.layer.set_integers(q, wq.scale, wq.zero_point)
        return flipped


class DroppedQuantizer:
    """An activation quantizer's forward during reconstruction: learned step (LSQ) and QDrop.

    With ``learn`` the quantizer's scale becomes a trainable parameter (LSQ gradient, see
    :meth:`ActivationQuantizer.make_trainable`); with ``drop_prob`` each element keeps its float
    value with that probability instead of being quantized.
    """

    def __init__(self, quantizer: ActivationQuantizer, learn: bool, drop_prob: float, generator: torch.Generator):
        self.q = quantizer
        self.initial_scale = quantizer.scale.detach().clone()
        self.forward = quantizer.forward  # the class's forward, bound: called under the patch
        self.scale = quantizer.make_trainable(grad_scale=True) if learn else None
        self.drop_prob = drop_prob
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward(x)
        if self.drop_prob > 0 and torch.is_grad_enabled():
            keep_float = torch.rand(x.shape, generator=self.generator) < self.drop_prob
            y = torch.where(keep_float.to(x.device), x, y)
        return y

    @torch.no_grad()
    def commit(self) -> None:
        """Keep the learned step size as the quantizer's frozen scale."""
        if self.scale is not None:
            self.scale.data.abs_().clamp_(min=1e-12)
            self.q.freeze()


def units(model: nn.Module, example: torch.Tensor, unit: str) -> list[tuple[str, nn.Module, list[WeightLayer]]]:
    """(name, module, its weight layers) of every reconstruction unit, in execution order."""
    order = execution_order(model, example)
    if unit == "layer":
        return [(n, m, [m]) for n, m in order]
    parents = {n: m for n, m in model.named_modules()}
    blocks: dict[str, nn.Module] = {}
    for name in parents:
        parent_name = name.rpartition(".")[0] if "." in name else ""
        parent = parents.get(parent_name) if name else None
        under_block = any(name.startswith(b + ".") for b in blocks)
        if name and isinstance(parent, (nn.Sequential, nn.ModuleList)) and not under_block:
            blocks[name] = parents[name]
    result: list[tuple[str, nn.Module, list[WeightLayer]]] = []
    for name, layer in order:
        owner = next((b for b in blocks if name == b or name.startswith(b + ".")), None)
        key, module = (owner, blocks[owner]) if owner is not None else (name, layer)
        if result and result[-1][0] == key:
            result[-1][2].append(layer)
        else:
            result.append((key, module, [layer]))
    return result


def reconstruct(
    model: nn.Module,
    images: torch.Tensor,
    cfg: ReconstructConfig = ReconstructConfig(),
    progress: bool = True,
) -> list[UnitResult]:
    """Learn the rounding (and optionally activation steps) of a converted ``model`` in place, unit by unit.

    Binary (1-bit) layers keep sign rounding (there is no floor/ceiling choice to learn).

    Args:
        model: a model after ``convert``.
        images: calibration images (N, C, H, W) on the model's device, from the training split.
        cfg: what to reconstruct and how long.
        progress: a progress bar per unit with its error and ETA.

    Returns:
        One :class:`UnitResult` per unit, in order.

    Raises:
        BitsweepError: the model has no quantized weight layer.
    """
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    todo = units(model, images[:1], cfg.unit)
    if not todo:
        raise BitsweepError(
            "the model has no quantized weight layer to reconstruct (all were skipped or left in floating point); "
            "quantize its weights or use --method rtn"
        )
    results: list[UnitResult] = []
    bar = tqdm(todo, desc=f"reconstruct ({cfg.unit})", unit=cfg.unit, disable=not progress, leave=False)
    for name, module, layers in bar:
        learnable = [layer for layer in layers if not layer.weight_quantizer.spec.binary]
        with float_mode(model):
            x_float = module_inputs(model, module, images)
            with torch.no_grad():
                target = torch.cat([module(x_float[i : i + 256]) for i in range(0, len(x_float), 256)])
        x_quant = module_inputs(model, module, images)
        res = _fit_unit(module, learnable, x_quant, x_float, target, cfg, gen)
        results.append(UnitResult(name, *res))
        bar.set_postfix_str(f"{name} mse {res[0]:.3g}->{res[1]:.3g}")
    for m in model.modules():
        if isinstance(m, QuantOutput):
            m.try_fuse()
    return results


def _fit_unit(
    module: nn.Module,
    layers: list[WeightLayer],
    x_quant: torch.Tensor,
    x_float: torch.Tensor,
    target: torch.Tensor,
    cfg: ReconstructConfig,
    gen: torch.Generator,
) -> tuple[float, float, float]:
    """Optimise one unit; returns (nearest mse, learned mse, fraction of integers flipped).

    A unit whose learned result reconstructs worse than where it started (possible with few steps: the
    annealed regulariser forces hard rounding at the end) keeps its starting integers and scales, so
    reconstruction never makes a unit worse on the calibration images.
    """

    def mse() -> float:
        with torch.no_grad():
            out = torch.cat([module(x_quant[i : i + 256]) for i in range(0, len(x_quant), 256)])
            return float((out - target).pow(2).mean())

    nearest = mse()
    start = [(layer, layer.weight_quantizer.q.clone()) for layer in layers]
    soft = [SoftWeight(layer) for layer in layers]
    quantizers = (
        [m for m in module.modules() if isinstance(m, ActivationQuantizer) and m.mode == "quantize"]
        if (cfg.learn_activations or cfg.drop_prob > 0)
        else []
    )
    steps = [DroppedQuantizer(q, cfg.learn_activations, cfg.drop_prob, gen) for q in quantizers]
    restore = _patch(module, soft, steps)
    try:
        groups = [{"params": [s.v for s in soft], "lr": cfg.lr}]
        scales = [st.scale for st in steps if st.scale is not None]
        if scales:
            groups.append({"params": scales, "lr": cfg.act_lr})
        opt = torch.optim.Adam(groups)
        n = x_quant.shape[0]
        with torch.enable_grad():
            for step in range(cfg.iterations if soft or steps else 0):
                idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen)
                xb = x_quant[idx]
                if cfg.drop_prob > 0:
                    keep_float = torch.rand(xb.shape, generator=gen) < cfg.drop_prob
                    xb = torch.where(keep_float.to(xb.device), x_float[idx], xb)
                out = module(xb)
                loss = (out - target[idx]).pow(2).flatten(1).sum(1).mean()
                beta = beta_at(step, cfg)
                if beta is not None and soft:
                    loss = loss + cfg.reg_weight * sum((s.regularizer(beta) for s in soft), torch.zeros(()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        restore()
    flipped = [s.commit() for s in soft]
    for st in steps:
        st.commit()
    for m in module.modules():
        if isinstance(m, QuantOutput):
            m.try_fuse()
    total = sum(s.layer.weight.numel() for s in soft) or 1
    changed = sum(f * s.layer.weight.numel() for f, s in zip(flipped, soft, strict=True))
    learned = mse()
    if learned > nearest:  # keep the starting point (see the docstring)
        for layer, q in start:
            layer.set_integers(q, layer.weight_quantizer.scale, layer.weight_quantizer.zero_point)
        for st in steps:
            st.q.set_qparams(st.q.spec, st.initial_scale, st.q.zero_point)
        for m in module.modules():
            if isinstance(m, QuantOutput):
                m.try_fuse()
        return nearest, mse(), 0.0
    return nearest, learned, changed / total


def _patch(module: nn.Module, soft: list[SoftWeight], steps: list[DroppedQuantizer]) -> Callable[[], None]:
    """Route the unit's weights through their soft rounding and its activation quantizers through QDrop/LSQ."""
    undo: list[Callable[[], None]] = []
    for s in soft:
        layer = s.layer
        layer._current_weight = s.weight  # type: ignore[method-assign]
        undo.append(functools.partial(delattr, layer, "_current_weight"))
    for st in steps:
        st.q.forward = st  # type: ignore[method-assign]
        undo.append(functools.partial(delattr, st.q, "forward"))
    fused = [m for m in module.modules() if isinstance(m, QuantOutput) and m.fused]
    for m in fused:
        m.fused = False  # the fused fast path bypasses the quantizer's forward

    def restore() -> None:
        for u in undo:
            u()
        for m in fused:
            m.fused = True

    return restore


def layer_results(results: list[UnitResult]) -> str:
    """One line per unit for logs: name, error before and after."""
    return "\n".join(f"{r.name}: {r.nearest_mse:.4g} -> {r.learned_mse:.4g} ({r.flipped:.1%} flipped)" for r in results)


__all__ = [
    "ReconstructConfig",
    "UnitResult",
    "beta_at",
    "initial_v",
    "layer_results",
    "reconstruct",
    "soft_rounding",
    "units",
]
