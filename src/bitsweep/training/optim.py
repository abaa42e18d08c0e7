"""Optimizer and learning-rate schedule of the training recipes.

SGD with Nesterov momentum and decoupled parameter groups: weight decay
pulls BatchNorm scales towards zero and biases towards nothing useful, which
costs accuracy on small networks, so both are excluded from decay (the
standard practice since Goyal et al., 2017). The schedule is a per-step
linear warm-up followed by a cosine decay to zero; stepping per batch
rather than per epoch matters for short runs (a 3-epoch run would otherwise
see only three learning rates).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from bitsweep.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Split trainable parameters into a decayed group (conv/linear weights) and an undecayed one.

    A parameter with fewer than two dimensions is a bias or a normalization
    scale/shift; those go into the group without weight decay.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum and weight decay on weights only, from a recipe."""
    return torch.optim.SGD(
        parameter_groups(model, config.weight_decay),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
    )


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Rises linearly from 1/warmup_steps to 1 over the warm-up (never exactly 0,
    so the first step already learns), then follows half a cosine to 0 at
    ``total_steps``.

    >>> [round(warmup_cosine_factor(s, 2, 6), 3) for s in range(7)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LRScheduler):
    """Per-step linear warm-up, then cosine decay to zero; call ``step()`` after every optimizer step.

    Its ``state_dict`` holds the step count and the schedule lengths, so a
    resumed run continues on exactly the same curve.

    Args:
        optimizer: The optimizer whose groups' ``lr`` this sets.
        warmup_steps: Steps of linear warm-up (0 for none).
        total_steps: Steps of the whole run; the learning rate is 0 from here on.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps], got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float | torch.Tensor]:
        factor = warmup_cosine_factor(self.last_epoch, self.warmup_steps, self.total_steps)
        return [base * factor for base in self.base_lrs]


def build_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> WarmupCosineLR:
    """The recipe's warm-up/cosine schedule for ``steps_per_epoch`` optimizer steps per epoch."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(total, int(round(config.warmup_epochs * steps_per_epoch)))
    return WarmupCosineLR(optimizer, warmup, total)
