"""Numeric precision of matrix work: fp32, or bf16 autocast where the hardware has bf16 matrix units.

``precision`` is one of ``fp32``, ``bf16`` and ``auto``. bf16 runs the matrix products (linears, attention) under
``torch.autocast``; parameters, mask scores, their gradients, the losses and the optimizer state stay fp32. On a
CPU, bf16 is used only where the processor has bf16 matrix instructions (AVX512-BF16 or AMX), detected at run
time: elsewhere autocast would emulate bf16 and run slower than fp32. On CUDA, only where the GPU has bf16
tensor cores (compute capability 8.0 on, Ampere and later): a V100 or T4 would emulate it too. ``auto`` picks
bf16 where it is supported and fp32 elsewhere; asking for ``bf16`` where it is not supported is an error.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn

from .config import ConfigError

__all__ = ["PRECISIONS", "PrecisionError", "cpu_supports_bf16", "bf16_supported", "resolve_precision", "autocast",
           "Bf16Inference", "check_device", "check_available"]

PRECISIONS = ("fp32", "bf16", "auto")


class PrecisionError(ConfigError):
    """The requested precision cannot run on this device; the message says why in one line."""


def cpu_supports_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX tiles), as torch's kernels see them."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check: Callable[[], bool] | None = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


def bf16_supported(device: torch.device | str, cpu_check: Callable[[], bool] | None = None) -> bool:
    """Whether bf16 autocast is worth running on ``device``.

    CUDA: the GPU ``device`` names (the current one for plain ``cuda``) has bf16 tensor cores, compute capability
    8.0 or above (``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated). CPU:
    ``cpu_check()``, by default :func:`cpu_supports_bf16`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        if torch.version.hip:  # every ROCm GPU torch runs on computes bf16
            return True
        index = torch.cuda.current_device() if device.index is None else device.index
        return index < torch.cuda.device_count() and torch.cuda.get_device_capability(index)[0] >= 8
    if device.type == "cpu":
        return (cpu_check or cpu_supports_bf16)()
    return False


def resolve_precision(precision: str, device: torch.device | str,
                      cpu_check: Callable[[], bool] | None = None) -> str:
    """``fp32`` or ``bf16``: what ``precision`` means on ``device``.

    Args:
        precision: ``fp32``, ``bf16`` or ``auto``.
        device: where the model runs.
        cpu_check: the CPU capability probe (default :func:`cpu_supports_bf16`).

    Raises:
        PrecisionError: ``bf16`` on a device without bf16 support, or an unknown value.
    """
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision: unknown value {precision!r} (allowed: {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return "fp32"
    supported = bf16_supported(device, cpu_check)
    if precision == "auto":
        return "bf16" if supported else "fp32"
    if not supported:
        device = torch.device(device)
        what = ("this CPU has no bf16 matrix instructions (avx512_bf16 or AMX)" if device.type == "cpu"
                else f"device {device} has no bf16 tensor cores (compute capability 8.0 or above)")
        raise PrecisionError(f"precision: bf16 asked for, but {what}; use fp32 or auto")
    return "bf16"


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """The autocast region for a resolved precision (``fp32``: no autocast)."""
    device = torch.device(device)
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Bf16Inference(nn.Module):
    """A model for inference only that runs under bf16 autocast with its linear layers stored in bf16.

    Autocast casts each fp32 weight to bf16 on every call (its cast cache holds only tensors that require grad, and
    only within one autocast region). Stored in bf16 once, the weights are used as they are: the outputs are bitwise
    those of autocast over the fp32 model, without the casts. LayerNorm and the embeddings stay fp32, as autocast
    runs them.

    The wrapped model's linear layers are converted in place: wrap a model that only serves, never one that trains.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for module in model.modules():
            if type(module) is nn.Linear:  # not subclasses: a masked linear recomputes its weight every call
                module.to(torch.bfloat16)
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(self, *args, **kwargs):
        # The autocast device follows the model's parameters, wherever ``.to(...)`` has moved them.
        parameter = next(self.model.parameters(), None)
        device_type = parameter.device.type if parameter is not None else "cpu"
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            return self.model(*args, **kwargs)


def check_device(name: str | torch.device | None, what: str = "device") -> None:
    """Refuse, before any work, a device this machine cannot run on (None and ``auto`` always pass).

    Raises:
        ConfigError: one line, ``what`` (the flag or config key that gave ``name``) first.
    """
    if name is None or name == "auto":
        return
    name = str(name)  # a torch.device, as a library caller gives it
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{what} {name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {name}: CUDA is not available on this machine (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"{what} {name!r}: only cpu and cuda devices are supported")


def check_available(device: str | int | torch.device | None) -> None:
    """Refuse, before any work, a device given to a library function (``answer``, ``compute_logits``,
    ``load_packed``) that is no device, or a CUDA device this machine lacks: a pinned-memory error mid-way, or a
    weights file blamed, otherwise. Other devices (``mps``, ``meta``) are torch's to run or refuse.

    Raises:
        ConfigError: one line naming the device.
    """
    if device is None:
        return
    try:
        resolved = torch.device(device)  # an index is the accelerator's device of that index, as in torch
    except (RuntimeError, ValueError, TypeError):
        if isinstance(device, int) and not isinstance(device, bool):
            raise ConfigError(f"device {device}: a GPU's index, and this machine has no GPU (use cpu)") from None
        raise ConfigError(f"device {device!r}: not a device (cpu, cuda, cuda:N or another torch device)") from None
    if resolved.type == "cuda":
        check_device(str(resolved))
