"""The teacher's outputs on every training window, computed once and reused every time the window comes round.

A distilled step runs the teacher's forward on its batch. Over several epochs of the same windows that forward
repeats: the teacher is frozen and in eval mode, so a window's outputs never change. :class:`TeacherCache` runs
the teacher on a window the first time a batch holds it and keeps the start and end logits (two floats a token,
on the CPU: about 3 KB a window of 384 tokens), so a run pays one teacher forward per distinct window instead of
one per window per step. With ``hidden`` it keeps every layer's output as well, for the hidden-state MSE
(``alpha_hidden``), in bf16: ``layers x hidden x 2`` bytes a token, 2.7 GB for MiniLM's 6 x 384 on 3,072
windows of 192 tokens.

Windows are run at their full stored width (``max_seq_length``), so the outputs at any batch's padded width are a
prefix of what is kept: a padded position attends to the real tokens only, so a real token's outputs do not
depend on how many pads follow it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, NamedTuple

import torch
from torch import nn

from .config import ConfigError
from .memory import available_memory
from .squad import to_device

__all__ = ["TeacherCache", "TeacherOutputs"]

logger = logging.getLogger(__name__)

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HIDDEN_DTYPE = torch.bfloat16  # the kept hidden states: half the memory of fp32, targets of an MSE


def _check_hidden_fits(num: int, layers: int, width: int, hidden: int) -> int:
    """The bytes the kept hidden states take; a :class:`ConfigError` when they exceed the memory available, before
    any is taken (an allocation past it stops the run in a traceback, or lets the kernel kill it later as the cache
    fills)."""
    needed = num * layers * width * hidden * torch.finfo(HIDDEN_DTYPE).bits // 8
    available = available_memory()
    if available is not None and needed > available:
        raise ConfigError(f"teacher_cache: the teacher's hidden states that alpha_hidden distils, {layers} layers x "
                          f"{hidden} values x {width} tokens for each of {num:,} training windows, take "
                          f"{needed / 1e9:.1f} GB, more than the {available / 1e9:.1f} GB of memory available; set "
                          f"teacher_cache false (the teacher then runs every step), or train on fewer or shorter "
                          f"windows (train_limit, max_seq_length)")
    return needed


class TeacherOutputs(NamedTuple):
    """What a distillation step needs of the teacher for one batch."""

    start_logits: torch.Tensor
    end_logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None  # each layer's output (not the embeddings), or None


class TeacherCache:
    """Start and end logits (and, with ``hidden``, layer outputs) of ``teacher`` for the windows of ``features``.

    Args:
        teacher: the frozen teacher (eval mode), on ``device``.
        features: the training windows (``input_ids``, ``attention_mask``, ``token_type_ids``, on the CPU).
        device: where the teacher runs.
        batch_size: most windows per teacher forward.
        autocast: a context manager factory for the teacher's forward (the run's precision); default none.
        hidden: keep each layer's output too (bf16, on the CPU).
    """

    def __init__(self, teacher: nn.Module, features: dict[str, torch.Tensor], device: torch.device,
                 batch_size: int, autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 hidden: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.teacher = teacher
        self.features = {k: features[k] for k in _INPUTS}
        self.device = device
        self.batch_size = batch_size
        self.autocast = autocast or contextlib.nullcontext
        num, width = features["input_ids"].shape
        self.hidden = None
        if hidden:
            layers, size = teacher.config.num_hidden_layers, teacher.config.hidden_size
            needed = _check_hidden_fits(num, layers, width, size)
            logger.info("teacher cache: %.2f GB for the hidden states of %d windows", needed / 1e9, num)
            self.hidden = torch.empty(num, layers, width, size, dtype=HIDDEN_DTYPE)
        self.start = torch.zeros(num, width)
        self.end = torch.zeros(num, width)
        self.known = torch.zeros(num, dtype=torch.bool)
        self.forwards = 0  # windows the teacher has run on

    def __call__(self, index: torch.Tensor, width: int) -> TeacherOutputs:
        """The teacher's outputs on windows ``index``, the first ``width`` positions, on the device."""
        index = index.cpu()
        missing = index[~self.known[index]].unique()
        for chunk in missing.split(self.batch_size) if missing.numel() else ():
            batch = {k: to_device(v[chunk], self.device).long() for k, v in self.features.items()}
            with torch.no_grad(), self.autocast():
                out = self.teacher(**batch, output_hidden_states=self.hidden is not None)
            self.start[chunk] = out.start_logits.float().cpu()
            self.end[chunk] = out.end_logits.float().cpu()
            if self.hidden is not None:
                self.hidden[chunk] = torch.stack(out.hidden_states[1:], dim=1).to(HIDDEN_DTYPE).cpu()
            self.known[chunk] = True
            self.forwards += int(chunk.numel())
        # Through pinned memory to a GPU: a copy from ordinary memory would hold the host until the GPU took it.
        hidden = None
        if self.hidden is not None:
            hidden = to_device(self.hidden[index, :, :width], self.device).unbind(dim=1)
        return TeacherOutputs(to_device(self.start[index, :width], self.device),
                              to_device(self.end[index, :width], self.device), hidden)
