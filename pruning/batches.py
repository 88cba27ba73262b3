"""The order a run trains its windows in, and where it stands in it.

Every epoch trains each training window once, in micro-batches whose order depends on the run's ``seed``, the epoch
and, with ``group_by_length``, the windows' lengths and the batch size (similar lengths batched together, the
batches shuffled). A :class:`DataPosition` says how far a run has come; a checkpoint records it, so that a resumed
run trains exactly what the uninterrupted run would have (:mod:`pruning.resume`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .config import RunConfig

__all__ = ["LENGTH_GROUP", "DataPosition", "position_after", "WindowBatches", "micro_batches"]

LENGTH_GROUP = 50  # batches per length-sorted group of ``group_by_length``


def _batch_order(num: int, batch_size: int, seed: int, epoch: int,
                 lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(num, generator=generator)
    if lengths is None:
        return list(order.split(batch_size))
    batches: list[torch.Tensor] = []
    for group in order.split(batch_size * LENGTH_GROUP):
        ranked = group[torch.argsort(lengths[group], descending=True, stable=True)]
        batches.extend(ranked.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


@dataclass(frozen=True)
class DataPosition:
    """Where a run stands in its training windows: ``window`` windows of epoch ``epoch`` are trained, in the order
    that ``seed``, ``batch_size`` and ``group_by_length`` gave the epoch (those of the run that started it)."""

    epoch: int
    window: int
    seed: int
    batch_size: int
    group_by_length: bool

    @classmethod
    def start(cls, cfg: RunConfig, epoch: int = 0) -> DataPosition:
        return cls(epoch, 0, cfg.seed, cfg.batch_size, cfg.group_by_length)


def _window_lengths(features: dict[str, torch.Tensor]) -> torch.Tensor:
    return features["attention_mask"].sum(dim=1)


def position_after(features: dict[str, torch.Tensor], seed: int, batch_size: int, group_by_length: bool,
                    micro: int) -> DataPosition:
    """The position after ``micro`` micro-batches of a run that has kept these settings from its first step."""
    num = int(features["input_ids"].shape[0])
    epoch, offset = divmod(micro, max(1, math.ceil(num / batch_size)))
    lengths = _window_lengths(features) if group_by_length else None
    window = sum(len(index) for index in _batch_order(num, batch_size, seed, epoch, lengths)[:offset])
    return DataPosition(epoch, window, seed, batch_size, group_by_length)


class WindowBatches(Iterator[torch.Tensor]):
    """Micro-batch index tensors of the training windows, epoch after epoch, and :attr:`position`, where they stand.

    Every epoch trains each window once, in an order that depends on ``seed``, the epoch and, with
    ``group_by_length``, the windows' lengths and the batch size (:func:`_batch_order`). From a ``position`` (a
    resumed run) the epoch it names goes on in the order it was started with, at its next untrained window: in its
    own batches where ``batch_size`` is the one that ordered it (a run resumed with the same settings trains what
    the uninterrupted run does), else cut into batches of ``cfg.batch_size``. The epochs after it take ``cfg``'s
    settings.
    """

    def __init__(self, features: dict[str, torch.Tensor], cfg: RunConfig, position: DataPosition | None = None):
        self._num = int(features["input_ids"].shape[0])
        self._lengths = _window_lengths(features) if cfg.group_by_length or (
            position is not None and position.group_by_length) else None
        self._cfg = cfg
        self.position = position if position is not None else DataPosition.start(cfg)
        self._pending: list[torch.Tensor] = []  # the rest of the position's epoch, last batch first

    def _rest_of_epoch(self, at: DataPosition) -> list[torch.Tensor]:
        lengths = self._lengths if at.group_by_length else None
        batches = _batch_order(self._num, at.batch_size, at.seed, at.epoch, lengths)
        first, skip = 0, at.window
        while first < len(batches) and skip >= len(batches[first]):
            skip -= len(batches[first])
            first += 1
        rest = batches[first:]
        if skip:
            rest[0] = rest[0][skip:]
        if at.batch_size != self._cfg.batch_size and rest:
            rest = list(torch.cat(rest).split(self._cfg.batch_size))
        return rest[::-1]

    def __next__(self) -> torch.Tensor:
        if not self._pending:
            self._pending = self._rest_of_epoch(self.position)
        index = self._pending.pop()
        window = self.position.window + len(index)
        if window < self._num:
            self.position = dataclasses.replace(self.position, window=window)
        else:  # the epoch is done: the next one is ordered by this run's settings
            self.position = DataPosition.start(self._cfg, self.position.epoch + 1)
        return index


def micro_batches(features: dict[str, torch.Tensor], cfg: RunConfig, start_micro: int = 0) -> Iterator[torch.Tensor]:
    """Micro-batch index tensors of ``features`` from ``start_micro`` on, epoch after epoch, for a run that keeps
    ``cfg``'s settings: the same order whether it was resumed or not (it depends on ``seed``, the epoch and, with
    ``group_by_length``, the windows' lengths). A :class:`WindowBatches`, whose ``position`` says where it stands."""
    return WindowBatches(features, cfg, position_after(features, cfg.seed, cfg.batch_size, cfg.group_by_length,
                                                         start_micro))
