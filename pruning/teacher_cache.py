"""The teacher's logits of every training window, computed once and reused every time the window comes round.

A distilled step runs the teacher's forward on its batch. Over several epochs of the same windows that forward
repeats: the teacher is frozen and in eval mode, so a window's logits never change. :class:`TeacherLogits` runs
the teacher on a window the first time a batch holds it and keeps the start and end logits (two floats a token,
on the CPU: about 3 KB a window of 384 tokens), so a run pays one teacher forward per distinct window instead of
one per window per step. Hidden states are not kept (they would cost ``layers x hidden`` floats a token), so the
cache serves the logit loss only (``alpha_hidden: 0``).

Windows are run at their full stored width (``max_seq_length``), so the logits of any batch's padded width are a
prefix of what is kept: a padded position attends to the real tokens only, so its logits do not depend on how
many pads follow it.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

__all__ = ["TeacherLogits"]

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TeacherLogits:
    """Start and end logits of ``teacher`` for the windows of ``features``, each computed on first use.

    Args:
        teacher: the frozen teacher (eval mode), on ``device``.
        features: the training windows (``input_ids``, ``attention_mask``, ``token_type_ids``, on the CPU).
        device: where the teacher runs.
        batch_size: most windows per teacher forward.
        autocast: a context manager factory for the teacher's forward (the run's precision); default none.
    """

    def __init__(self, teacher: nn.Module, features: dict[str, torch.Tensor], device: torch.device,
                 batch_size: int, autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.teacher = teacher
        self.features = {k: features[k] for k in _INPUTS}
        self.device = device
        self.batch_size = batch_size
        self.autocast = autocast or contextlib.nullcontext
        num, width = features["input_ids"].shape
        self.start = torch.zeros(num, width)
        self.end = torch.zeros(num, width)
        self.known = torch.zeros(num, dtype=torch.bool)
        self.forwards = 0  # windows the teacher has run on

    def __call__(self, index: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (start, end) logits of windows ``index``, the first ``width`` positions, on the device."""
        index = index.cpu()
        missing = index[~self.known[index]].unique()
        for chunk in missing.split(self.batch_size) if missing.numel() else ():
            batch = {k: v[chunk].to(self.device) for k, v in self.features.items()}
            with torch.no_grad(), self.autocast():
                out = self.teacher(**batch)
            self.start[chunk] = out.start_logits.float().cpu()
            self.end[chunk] = out.end_logits.float().cpu()
            self.known[chunk] = True
            self.forwards += int(chunk.numel())
        return (self.start[index, :width].to(self.device, non_blocking=True),
                self.end[index, :width].to(self.device, non_blocking=True))
