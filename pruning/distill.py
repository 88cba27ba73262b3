"""Distillation and question-answering losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "qa_ce_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target loss ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over rows.

    The ``T^2`` factor keeps the gradient scale independent of the temperature (Hinton et al., 2015). The loss is
    exactly zero when the student's logits equal the teacher's.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def qa_ce_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
               end_positions: torch.Tensor) -> torch.Tensor:
    """Mean of the start and end cross-entropies (the standard SQuAD span loss)."""
    return (F.cross_entropy(start_logits, start_positions) + F.cross_entropy(end_logits, end_positions)) / 2
