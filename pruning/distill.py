"""Distillation and question-answering losses: logit KL, layer-wise hidden-state MSE, the span cross-entropy."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "hidden_mse", "qa_ce_loss"]


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


def hidden_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Layer-wise hidden-state distillation: the mean over layers of the per-element squared error.

    ``mean_l sum_{t real} |s_l[t] - h_l[t]|^2 / (tokens * hidden)``, with padded tokens (``attention_mask == 0``)
    left out. Zero when every student layer reproduces the teacher's.
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"hidden_mse: {len(student_hidden)} student layers against {len(teacher_hidden)} "
                         "teacher layers")
    losses = []
    for student, teacher in zip(student_hidden, teacher_hidden):
        squared = (student.float() - teacher.detach().float()).pow(2).mean(dim=-1)  # (batch, tokens)
        if attention_mask is None:
            losses.append(squared.mean())
        else:
            weight = attention_mask.to(squared.dtype)
            losses.append((squared * weight).sum() / weight.sum().clamp(min=1))
    return torch.stack(losses).mean()


def qa_ce_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
               end_positions: torch.Tensor) -> torch.Tensor:
    """Mean of the start and end cross-entropies (the standard SQuAD span loss)."""
    return (F.cross_entropy(start_logits, start_positions) + F.cross_entropy(end_logits, end_positions)) / 2
