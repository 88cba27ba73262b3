"""An exponential moving average of a model's trained weights, for evaluation and the saved model.

``WeightAverage(model, decay)`` keeps a shadow copy of every trainable floating-point parameter. After each
optimizer step, ``update(model)`` moves the shadow towards the live weights with the decay
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the first steps of a fresh average follow the weights
closely instead of holding on to where they started. ``applied(model)`` swaps the average in for an evaluation and
swaps the live weights back; ``copy_to(model)`` puts it in for good (the final model). ``tensors()`` and ``load``
carry the average through a training checkpoint, so a resumed run averages exactly as an uninterrupted one.

The trainer averages only while the structure is fixed (a dense run, the filled phase, the recovery after a fisher
cut): averaging weights whose masks still move would mix different models.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .checkpoint import OPTIMIZER, CheckpointError

__all__ = ["WeightAverage", "PREFIX", "holds_average"]

PREFIX = "average."  # the shadow's names in a checkpoint's tensors file
_COUNT = PREFIX + "_updates"


def holds_average(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` is a training checkpoint that carries a weight average beside its live weights: the
    run's evaluations at that step, and its final model, are of the average, while loading the directory gives the
    live weights. Reads only the header of the checkpoint's optimizer file; False for any other directory."""
    path = Path(model_dir) / OPTIMIZER
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return _COUNT in handle.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False  # an unreadable optimizer file is the resume's concern, not the model's


def _averaged(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}


class WeightAverage:
    """Exponential moving average of the trainable parameters of one model (see the module docstring)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {name: p.detach().clone() for name, p in _averaged(model).items()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, p in _averaged(model).items():
            self.shadow[name].lerp_(p.detach(), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = _averaged(model)
        if params.keys() != self.shadow.keys():
            raise ValueError("the model's trainable parameters are not the ones this average was started on")
        for name, p in params.items():
            p.copy_(self.shadow[name])

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the averaged weights in place; the live weights come back on exit, even on an error."""
        live = {name: p.detach().clone() for name, p in _averaged(model).items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in _averaged(model).items():
                    p.copy_(live[name])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {PREFIX + name: t.detach().cpu() for name, t in self.shadow.items()}
        out[_COUNT] = torch.tensor(self.updates, dtype=torch.int64)
        return out

    def load(self, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Restore from :meth:`tensors` (as read back from ``source``); a checkpoint of another model is an error."""
        names = {k[len(PREFIX):] for k in tensors if k.startswith(PREFIX) and k != _COUNT}
        if names != self.shadow.keys() or _COUNT not in tensors or tensors[_COUNT].numel() != 1:
            raise CheckpointError(f"{source}: the weight average does not match the model's trainable parameters")
        for name, t in self.shadow.items():
            # A tensor that broadcasts (one value) would fill the parameter's average without an error.
            stored = tuple(tensors[PREFIX + name].shape)
            if stored != tuple(t.shape):
                raise CheckpointError(f"{source}: {PREFIX}{name} has shape {stored}, but the trained parameter has "
                                      f"shape {tuple(t.shape)}")
        for name, t in self.shadow.items():
            t.copy_(tensors[PREFIX + name].to(t.device, t.dtype))
        self.updates = int(tensors[_COUNT])
