"""DistillationLoss: the formula, a teacher that never learns, and its place outside the parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitsweep.qat import DistillationLoss


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5))


def test_the_loss_is_weighted_kl_at_temperature_plus_cross_entropy() -> None:
    teacher = _teacher()
    images, labels = torch.randn(6, 3, 2, 2), torch.randint(0, 5, (6,))
    student = torch.randn(6, 5)
    loss = DistillationLoss(teacher, temperature=3.0, weight=0.75)(student, labels, images)
    t = teacher(images).detach()
    p = F.softmax(t / 3.0, dim=1)
    kl = (p * (p.log() - F.log_softmax(student / 3.0, dim=1))).sum(1).mean() * 9.0
    want = 0.75 * kl + 0.25 * F.cross_entropy(student, labels)
    torch.testing.assert_close(loss, want)


def test_a_student_equal_to_its_teacher_has_no_distillation_loss() -> None:
    teacher = _teacher()
    images = torch.randn(4, 3, 2, 2)
    loss = DistillationLoss(teacher, weight=1.0)(teacher(images).detach(), torch.zeros(4, dtype=torch.long), images)
    assert abs(float(loss)) < 1e-6


def test_the_teacher_gets_no_gradient_and_is_not_a_parameter() -> None:
    teacher = _teacher()
    loss_fn = DistillationLoss(teacher)
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}
    student = torch.randn(4, 5, requires_grad=True)
    loss_fn(student, torch.zeros(4, dtype=torch.long), torch.randn(4, 3, 2, 2)).backward()
    assert student.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
