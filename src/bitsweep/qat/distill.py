"""Knowledge distillation from the float model: the loss quantization-aware training minimises by default.

A quantized student learns faster from the float teacher's full output distribution than from
one-hot labels alone (Hinton et al., 2015; used for low-bit QAT by PROFIT and others): the
teacher's soft targets say which wrong classes are nearly right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DistillationLoss(nn.Module):
    """``w * T^2 * KL(teacher_T || student_T) + (1 - w) * CE(student, labels)``.

    The ``T^2`` factor keeps the soft term's gradient size independent of the temperature. The
    teacher runs in eval mode without gradients on the same (augmented) images as the student; it
    is held outside ``parameters()`` so optimizers and DDP never see it.

    Args:
        teacher: the float model, on the student's device.
        temperature: softmax temperature ``T`` of both distributions in the soft term.
        weight: ``w``, the soft term's share.
        label_smoothing: of the cross-entropy term.
    """

    def __init__(
        self, teacher: nn.Module, temperature: float = 2.0, weight: float = 0.9, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self._teacher = [teacher.eval()]  # a list: not a registered submodule (no parameters, no state_dict)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.temperature = temperature
        self.weight = weight
        self.label_smoothing = label_smoothing

    @property
    def teacher(self) -> nn.Module:
        """The float model the student learns from."""
        return self._teacher[0]

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        # logits: (N, classes) of the student; images: (N, C, H, W), what the student saw.
        t = self.temperature
        with torch.no_grad():
            soft = F.log_softmax(self.teacher(images).float() / t, dim=1)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean", log_target=True) * (t * t)
        if self.weight >= 1.0:
            return kd
        ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return self.weight * kd + (1.0 - self.weight) * ce
