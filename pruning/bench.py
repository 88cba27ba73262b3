"""Latency and FLOP measurements shared by the benchmark scripts and the sweep's ``speedup`` metric.

Two models are always timed interleaved (a, b, a, b, ...) on the same random input, so that slow drifts of the
machine (frequency scaling, other load) hit both alike; medians are reported because single runs on a busy CPU
have a long tail. The FLOP count covers the encoder's matrix products only, which is what packing removes, so the
FLOP ratio of a dense and a packed model is the speed-up one can hope for.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from typing import Iterator, Mapping

import torch
from torch import nn

from .precision import autocast
from .spread import NOISY_SPREAD, spread
from .structure import architecture_for, encoder_layers, get_module, max_positions

logger = logging.getLogger(__name__)

__all__ = ["eval_mode", "random_inputs", "latency", "compare_latency", "interleaved_latency", "spread",
           "linear_flops", "flop_ratio", "NOISY_SPREAD"]


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without this the clock would stop before the work is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Time the inference path (no dropout) and give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_shape(model: nn.Module, batch_size: int, seq_len: int, repeats: int, warmup: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    limit = max_positions(model.config)
    if seq_len > limit:
        raise ValueError(f"seq_len {seq_len} exceeds the {limit} positions the model takes")


def random_inputs(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (no padding) on the model's device, reproducible through ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator)
    device = _device(model)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "token_type_ids": torch.zeros_like(ids).to(device),
    }


def _time_forward(model: nn.Module, inputs: dict[str, torch.Tensor], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    model(**inputs)
    _synchronize(device)
    return time.perf_counter() - start


def latency(model: nn.Module, batch_size: int = 1, seq_len: int = 384, repeats: int = 10, warmup: int = 2,
            seed: int = 0, precision: str = "fp32") -> list[float]:
    """Wall-clock seconds of ``repeats`` forward passes, after ``warmup`` untimed ones.

    Args:
        model: a transformers model taking ``input_ids``/``attention_mask``/``token_type_ids``; any device, any dtype.
        batch_size, seq_len: shape of the random input.
        repeats: timed forward passes.
        warmup: untimed passes first (allocator and kernel caches).
        seed: seed of the random token ids.
        precision: ``fp32`` or ``bf16`` (already resolved, see :func:`pruning.precision.resolve_precision`).

    Raises:
        ValueError: a non-positive size or count, or ``seq_len`` beyond the model's position embeddings.
    """
    _check_shape(model, batch_size, seq_len, repeats, warmup)
    inputs = random_inputs(model, batch_size, seq_len, seed)
    device = _device(model)
    times = []
    with eval_mode(model), torch.inference_mode(), autocast(precision, device):
        for _ in range(warmup):
            _time_forward(model, inputs, device)
        for _ in range(repeats):
            times.append(_time_forward(model, inputs, device))
    return times


def compare_latency(model_a: nn.Module, model_b: nn.Module, batch_size: int = 1, seq_len: int = 384,
                    repeats: int = 10, warmup: int = 2, seed: int = 0,
                    precision: str = "fp32") -> dict[str, float | int | list[float] | str]:
    """Time two models interleaved on the same random input and compare their median latencies.

    Both run in ``precision`` (``fp32`` or ``bf16``, already resolved for their device).

    Returns:
        ``median_a_s``, ``median_b_s`` (seconds), ``ratio`` (= median a / median b, so the speed-up of b over a
        when a is the dense model), the raw ``times_a_s``/``times_b_s`` and the input shape and repeat count.

    Raises:
        ValueError: as for :func:`latency`, for either model.
    """
    for model in (model_a, model_b):
        _check_shape(model, batch_size, seq_len, repeats, warmup)
    # Same token ids for both models, each copy on its own model's device.
    inputs_a = random_inputs(model_a, batch_size, seq_len, seed)
    inputs_b = random_inputs(model_b, batch_size, seq_len, seed)
    device_a, device_b = _device(model_a), _device(model_b)
    times_a: list[float] = []
    times_b: list[float] = []
    with eval_mode(model_a), eval_mode(model_b), torch.inference_mode():
        for i in range(warmup + repeats):
            with autocast(precision, device_a):
                elapsed_a = _time_forward(model_a, inputs_a, device_a)
            with autocast(precision, device_b):
                elapsed_b = _time_forward(model_b, inputs_b, device_b)
            if i >= warmup:
                times_a.append(elapsed_a)
                times_b.append(elapsed_b)
    median_a, median_b = statistics.median(times_a), statistics.median(times_b)
    logger.debug("timed passes at batch %d, sequence %d (ms): a %s; b %s", batch_size, seq_len,
                 " ".join(f"{t * 1e3:.2f}" for t in times_a), " ".join(f"{t * 1e3:.2f}" for t in times_b))
    return {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "repeats": repeats,
        "precision": precision,
        "median_a_s": median_a,
        "median_b_s": median_b,
        "ratio": median_a / median_b if median_b > 0 else float("inf"),
        "times_a_s": times_a,
        "times_b_s": times_b,
    }


def interleaved_latency(models: Mapping[str, nn.Module], batch_size: int = 1, seq_len: int = 384, repeats: int = 10,
                        warmup: int = 2, seed: int = 0, precision: str = "fp32") -> dict[str, list[float]]:
    """Time several models round-robin (a, b, c, a, b, c, ...) on the same random input.

    The many-model form of :func:`compare_latency`, for choosing among several models on one machine: every
    round times each model once, so a change of load hits all of them alike.

    Args:
        models: name -> model; any devices.
        batch_size, seq_len, repeats, warmup, seed, precision: as for :func:`latency`.

    Returns:
        name -> the ``repeats`` wall-clock seconds of its timed passes.

    Raises:
        ValueError: as for :func:`latency`, for any model.
    """
    for model in models.values():
        _check_shape(model, batch_size, seq_len, repeats, warmup)
    inputs = {name: random_inputs(model, batch_size, seq_len, seed) for name, model in models.items()}
    devices = {name: _device(model) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(eval_mode(model))
        stack.enter_context(torch.inference_mode())
        for round_ in range(warmup + repeats):
            for name, model in models.items():
                with autocast(precision, devices[name]):
                    elapsed = _time_forward(model, inputs[name], devices[name])
                if round_ >= warmup:
                    times[name].append(elapsed)
    return times


def linear_flops(model: nn.Module, seq_len: int, batch_size: int = 1) -> int:
    """Matrix-product FLOPs (2 per multiply-add) of the encoder for one forward pass.

    Counts the six linears of every layer at their present shapes (a masked model counts as dense) and the two
    attention products, ``Q K^T`` and ``softmax(.) V``, whose cost scales with the number of heads left. Embedding
    look-ups, layer norms, softmax and the task head are left out: they are the same before and after packing.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1 (got {seq_len}, {batch_size})")
    arch = architecture_for(model)
    tokens = seq_len * batch_size
    total = 0
    for layer in encoder_layers(model):
        for path in (*arch.attention_linears, arch.ffn_in, arch.ffn_out):
            linear = get_module(layer, path)
            total += 2 * tokens * linear.in_features * linear.out_features
        query_width = get_module(layer, arch.query).out_features
        value_width = get_module(layer, arch.value).out_features
        total += 2 * tokens * seq_len * (query_width + value_width)
    return total


def flop_ratio(dense: nn.Module, packed: nn.Module, seq_len: int = 384) -> float:
    """``linear_flops(dense) / linear_flops(packed)``: the speed-up limit of the packed model (inf if it has none)."""
    packed_flops = linear_flops(packed, seq_len)
    return linear_flops(dense, seq_len) / packed_flops if packed_flops else float("inf")
