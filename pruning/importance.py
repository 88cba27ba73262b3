"""Importance of attention heads and FFN neurons, mask search under a budget, and mask tuning.

One-shot structured pruning after Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers":

1. **Importance.** A mask variable multiplies each head's context (the input columns of the attention output
   projection that belong to the head) and each FFN neuron's activation (the input column of the second FFN
   linear). The diagonal Fisher information of those masks, the squared per-window gradient of the loss summed over
   calibration windows, estimates how much the loss rises when the structure goes. The mask variables carry a batch
   dimension, ``(windows, heads)`` and ``(windows, neurons)``, so one backward pass gives every window's own
   gradient; the weights are frozen, so the backward pass skips the weight gradients.
2. **Search.** With the cost of one head and one neuron (weights for a density target, FLOPs for a FLOP target),
   keep for every possible number of heads the most important heads and fill what is left of the budget with the
   most important neurons; the combination with the largest kept importance wins. The budget is never exceeded.
3. **Rearrangement** (optional). Within each layer, swap kept and removed heads (or neurons) while the layer's
   block of the Fisher matrix says that the loss increase ``z^T F z`` of the removed set ``z`` falls.
4. **Tuning.** Layer by layer, the least-squares scales of the kept heads and neurons that bring each sublayer's
   output (before its LayerNorm) closest to the dense model's, on the pruned model's own inputs; the scales are
   folded into the columns of the output projections. For the FFN the normal matrix is ``(A^T A) * (W^T W)``
   (activations ``A``, output weights ``W``), so no tokens-by-neurons-by-hidden tensor is built.

The result becomes an ordinary masked checkpoint (:func:`apply_structure_`): head-shaped attention blocks and one
score per FFN dimension, kept structures scored +1 and removed ones -1 with a cut-off at 0, and the layers in the
fixed-mask mode of the filled phase. Packing, evaluation and the registry treat it like any other pruned model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import masks as mask_lib
from .squad import NonFiniteLogits, to_device, window_batch
from .structure import architecture_for, encoder_layers, get_module

__all__ = [
    "Importance",
    "LayerTuning",
    "StructureCosts",
    "calibration_index",
    "calibration_and_tuning_index",
    "length_batches",
    "fisher_importance",
    "magnitude_block_importance",
    "structure_costs",
    "search_mask",
    "layer_floor",
    "stage_targets",
    "rearrange_mask",
    "zero_removed_",
    "TUNING_DAMPING",
    "tune_masks_",
    "reconstruction_errors",
    "apply_structure_",
    "warm_start_scores_",
]

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Autocast = Callable[[], ContextManager[Any]]


@dataclass
class Importance:
    """Accumulated squared mask gradients (diagonal Fisher, summed over windows), per layer."""

    heads: torch.Tensor  # (layers, heads), float64
    neurons: torch.Tensor  # (layers, intermediate), float64
    windows: int  # calibration windows summed over
    head_blocks: torch.Tensor | None = None  # (layers, heads, heads): per-layer Fisher blocks, when asked for
    neuron_blocks: torch.Tensor | None = None  # (layers, intermediate, intermediate)


@dataclass
class LayerTuning:
    """Reconstruction error of one layer's two sublayers before and after mask tuning.

    Errors are mean squared differences between the pruned and the dense sublayer output (the sum that enters the
    LayerNorm), per element over the calibration tokens, with the pruned model's own inputs.
    """

    attention_before: float
    attention_after: float
    ffn_before: float
    ffn_after: float


@dataclass(frozen=True)
class StructureCosts:
    """What one head and one FFN neuron cost under a constraint, and the whole encoder's cost."""

    head: int
    neuron: int
    total: int


# ----------------------------------------------------------------------------------------------------------------
# Calibration windows
# ----------------------------------------------------------------------------------------------------------------


def calibration_index(num_windows: int, count: int, seed: int) -> torch.Tensor:
    """``min(count, num_windows)`` window indices drawn without replacement, reproducibly from ``seed``."""
    if count < 1:
        raise ValueError(f"calibration_samples: must be a positive integer, got {count}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_windows, generator=generator)[: min(count, num_windows)]


def calibration_and_tuning_index(num_windows: int, calibration: int, tuning: int,
                                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of the Fisher calibration and of the mask tuning after it: prefixes of one seeded permutation
    (:func:`calibration_index`), so the tuning reuses the calibration's windows and draws fresh ones when it asks
    for more than the calibration used. Each is capped at ``num_windows``; ``tuning`` may be 0."""
    index = calibration_index(num_windows, max(calibration, tuning, 1), seed)
    return index[:calibration], index[:tuning]


def length_batches(features: Batch, index: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``index`` cut into batches of windows of similar length (sorted, stable), so padding costs little."""
    lengths = features["attention_mask"][index].sum(dim=1)
    ordered = index[torch.argsort(lengths, stable=True)]
    return list(ordered.split(batch_size))


def _inputs(batch: Batch) -> Batch:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


# ----------------------------------------------------------------------------------------------------------------
# Hooks on the structure of a BERT-like encoder
# ----------------------------------------------------------------------------------------------------------------


def _shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(layers, heads, head_dim, intermediate) of an unpacked model."""
    config = model.config
    heads = config.num_attention_heads
    return config.num_hidden_layers, heads, config.hidden_size // heads, config.intermediate_size


@contextlib.contextmanager
def _frozen(*models: nn.Module) -> Iterator[None]:
    """No parameter of ``models`` requires a gradient inside; the previous flags come back afterwards."""
    params = [p for m in models for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    modes = [m.training for m in models]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in models:
            m.eval()
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, mode in zip(models, modes):
            m.train(mode)


@contextlib.contextmanager
def _hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _MaskVariables:
    """Per-window multipliers on every head's context and every FFN neuron's activation, via forward pre-hooks.

    ``heads[i]`` is ``(batch, heads)`` and ``neurons[i]`` ``(batch, intermediate)``; the hooks multiply the input
    of layer ``i``'s attention output projection and of its second FFN linear by them.
    """

    def __init__(self, model: nn.Module) -> None:
        self.arch = architecture_for(model)
        self.layers = encoder_layers(model)
        _, self.num_heads, self.head_dim, _ = _shape(model)
        self.heads: list[torch.Tensor | None] = [None] * len(self.layers)
        self.neurons: list[torch.Tensor | None] = [None] * len(self.layers)

    def install(self) -> ContextManager[None]:
        handles = []
        for i, layer in enumerate(self.layers):
            handles.append(get_module(layer, self.arch.attention_output).register_forward_pre_hook(self._head_hook(i)))
            handles.append(get_module(layer, self.arch.ffn_out).register_forward_pre_hook(self._neuron_hook(i)))
        return _hooks(handles)

    def _head_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            mask = self.heads[i]
            if mask is None:
                return None
            per_column = mask.repeat_interleave(self.head_dim, dim=-1)[:, None, :].to(args[0].dtype)
            return (args[0] * per_column, *args[1:])

        return hook

    def _neuron_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            mask = self.neurons[i]
            if mask is None:
                return None
            return (args[0] * mask[:, None, :].to(args[0].dtype), *args[1:])

        return hook


# ----------------------------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------------------------


def _window_draws(seed: int, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponential draws ``(n, width)`` for the start and for the end position of each window ``rows``, each from a
    stream of its own, seeded by ``seed`` and the window's index: a window's sampled span depends on neither the batch
    it comes in nor how far that batch is padded (windows are padded on the right, so their tokens take the first
    draws of the stream). One stream for all windows in batch order made the sampled labels, and so the importance
    and the mask, change with the batch size."""
    draws = np.empty((2, len(rows), width), dtype=np.float32)
    for i, window in enumerate(rows.tolist()):
        for j in range(2):
            draws[j, i] = np.random.default_rng([seed, window, j]).standard_exponential(width, dtype=np.float32)
    return torch.from_numpy(draws[0]), torch.from_numpy(draws[1])


def _sampled_positions(logits: torch.Tensor, attention_mask: torch.Tensor,
                       draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One position per window drawn from ``softmax(logits)`` over its real (unpadded) tokens, and whether every
    probability was finite (a tensor where the logits are).

    The position of the largest ``p / q`` for exponential ``draws`` ``q`` (made on the CPU, :func:`_window_draws`)
    is a draw from the probabilities ``p``: the draws go to the logits' device instead of the probabilities coming
    back to the host, which on a GPU would wait for the whole forward pass every batch.
    """
    masked = logits.float().masked_fill(attention_mask == 0, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    return torch.argmax(probs / to_device(draws, probs.device), dim=-1), torch.isfinite(probs).all()


def fisher_importance(model: nn.Module, features: Batch, index: torch.Tensor, batch_size: int = 16, *,
                      labels: str = "gold", teacher: nn.Module | None = None, block_diagonal: bool = False,
                      seed: int = 0, device: torch.device | None = None,
                      autocast: Autocast = contextlib.nullcontext) -> Importance:
    """The diagonal Fisher information of head and neuron masks over the windows ``index`` of ``features``.

    ``importance[l, h] = sum over windows w of (d loss_w / d mask_{l,h})^2`` at mask = 1, where ``loss_w`` is the
    window's span loss ``(CE(start) + CE(end)) / 2``.

    Args:
        model: an unpacked QA model (dense, or masked with every structure kept); its weights are not changed.
        features: training windows (``input_ids``, ``attention_mask``, ``token_type_ids``, ``start_positions``,
            ``end_positions``).
        index: the calibration windows.
        batch_size: windows per pass (batches are formed from windows of similar length).
        labels: ``gold``: the annotated spans; ``sampled``: spans drawn from the teacher's distribution (the
            model's own when ``teacher`` is None), which estimates the true rather than the empirical Fisher.
        teacher: the model whose distribution the ``sampled`` labels come from.
        block_diagonal: also accumulate each layer's full head-by-head and neuron-by-neuron Fisher blocks.
        seed: seed of the label sampling.
        device: where to compute (default: the model's device).
        autocast: a context-manager factory wrapped around the forward pass (mixed precision).

    Returns:
        The accumulated :class:`Importance`, on the CPU.
    """
    if labels not in ("gold", "sampled"):
        raise ValueError(f"labels must be gold or sampled, got {labels!r}")
    device = device or next(model.parameters()).device
    num_layers, num_heads, _, inter = _shape(model)
    # Sums stay on the device until the end (no host synchronisation per batch).
    heads = torch.zeros(num_layers, num_heads, dtype=torch.float64, device=device)
    neurons = torch.zeros(num_layers, inter, dtype=torch.float64, device=device)
    head_blocks = (torch.zeros(num_layers, num_heads, num_heads, dtype=torch.float64, device=device)
                   if block_diagonal else None)
    neuron_blocks = (torch.zeros(num_layers, inter, inter, dtype=torch.float32, device=device)
                     if block_diagonal else None)
    finite = torch.ones((), dtype=torch.bool, device=device)  # every sampled distribution, checked at the end
    variables = _MaskVariables(model)
    others = [teacher] if teacher is not None and teacher is not model else []
    with _frozen(model, *others), variables.install():
        for rows in length_batches(features, index, batch_size):
            batch = window_batch(features, rows, device)
            n = batch["input_ids"].shape[0]
            variables.heads = [torch.ones(n, num_heads, device=device, requires_grad=True) for _ in range(num_layers)]
            variables.neurons = [torch.ones(n, inter, device=device, requires_grad=True) for _ in range(num_layers)]
            with autocast():
                out = model(**_inputs(batch))
            # Padded positions leave the softmax: a window's loss must not depend on the batch it is padded in.
            padding = batch["attention_mask"] == 0
            start = out.start_logits.float().masked_fill(padding, float("-inf"))
            end = out.end_logits.float().masked_fill(padding, float("-inf"))
            if labels == "gold":
                start_pos, end_pos = batch["start_positions"], batch["end_positions"]
            else:
                if others:
                    with torch.no_grad(), autocast():
                        t_out = teacher(**_inputs(batch))
                    t_start, t_end = t_out.start_logits, t_out.end_logits
                else:
                    t_start, t_end = start.detach(), end.detach()
                start_draws, end_draws = _window_draws(seed, rows, int(batch["attention_mask"].shape[1]))
                start_pos, start_finite = _sampled_positions(t_start, batch["attention_mask"], start_draws)
                end_pos, end_finite = _sampled_positions(t_end, batch["attention_mask"], end_draws)
                finite = finite & start_finite & end_finite
            # A sum over windows, so that each window's gradient is its own loss's.
            loss = (F.cross_entropy(start, start_pos, reduction="sum")
                    + F.cross_entropy(end, end_pos, reduction="sum")) / 2
            grads = torch.autograd.grad(loss, [*variables.heads, *variables.neurons])
            for i in range(num_layers):
                g_head = grads[i].detach().double()
                g_neuron = grads[num_layers + i].detach()
                heads[i] += g_head.pow(2).sum(dim=0)
                neurons[i] += g_neuron.double().pow(2).sum(dim=0)
                if head_blocks is not None:
                    head_blocks[i] += g_head.T @ g_head
                    neuron_blocks[i] += g_neuron.float().T @ g_neuron.float()
        variables.heads = [None] * num_layers
        variables.neurons = [None] * num_layers
    if labels == "sampled" and not bool(finite):
        raise NonFiniteLogits("the model gave NaN or infinite start/end logits on a calibration window of the Fisher "
                              "pass, so no span can be sampled from its distribution")
    return Importance(heads.cpu(), neurons.cpu(), int(index.numel()),
                      None if head_blocks is None else head_blocks.cpu(),
                      None if neuron_blocks is None else neuron_blocks.cpu())


@torch.no_grad()
def magnitude_block_importance(module: mask_lib.MaskedLinear) -> torch.Tensor:
    """Mean absolute weight of every score block of ``module``; an FFN row also counts its tied output column."""
    br, bc = module.block
    rows, cols = module.mask_scores.shape
    weight = module.weight.detach().abs().float()
    per_block = weight.reshape(rows, br, cols, bc).mean(dim=(1, 3))
    return per_block


# ----------------------------------------------------------------------------------------------------------------
# Mask search
# ----------------------------------------------------------------------------------------------------------------


def structure_costs(config: Any, constraint: str = "density", seq_len: int = 384) -> StructureCosts:
    """Cost of one head, of one FFN neuron and of the whole encoder.

    ``density``: linear weights (a head holds ``4 * hidden * head_dim``, a neuron ``2 * hidden``), as in
    :mod:`pruning.sparsity`. ``flops``: matrix-product FLOPs of one window of ``seq_len`` tokens as counted by
    :func:`pruning.bench.linear_flops` (a head ``4 * 2 * seq_len * hidden * head_dim`` in its four projections plus
    ``2 * 2 * seq_len^2 * head_dim`` in its two attention products; a neuron ``2 * 2 * seq_len * hidden``).
    """
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim, inter, layers = hidden // heads, config.intermediate_size, config.num_hidden_layers
    if constraint == "density":
        head, neuron = 4 * hidden * head_dim, 2 * hidden
    elif constraint == "flops":
        head = 8 * seq_len * hidden * head_dim + 4 * seq_len * seq_len * head_dim
        neuron = 4 * seq_len * hidden
    else:
        raise ValueError(f"unknown constraint {constraint!r} (density or flops)")
    return StructureCosts(head, neuron, layers * (heads * head + inter * neuron))


def _descending(values: torch.Tensor) -> torch.Tensor:
    """Indices from the largest value down; equal values keep index order (deterministic ties)."""
    return torch.argsort(-values.flatten(), stable=True)


def _allowed_first(order: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``order`` with the allowed positions first (each part keeping its order)."""
    if allowed is None:
        return order
    flags = allowed.flatten()[order]
    return torch.cat([order[flags], order[~flags]])


def layer_floor(importance: torch.Tensor, fraction: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The structures every layer keeps whatever the search: the ``ceil(fraction * n)`` most important of each
    layer's ``n`` (among the allowed ones, at most all of them). Ties go to the lower index.

    Args:
        importance: (layers, structures).
        fraction: in [0, 1]; 0 forces nothing.
        allowed: boolean (layers, structures) mask of what may be kept; default: all.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    forced = torch.zeros(importance.shape, dtype=torch.bool)
    count = math.ceil(fraction * importance.shape[1] - 1e-9)
    for layer in range(importance.shape[0]):
        order = _allowed_first(_descending(importance[layer]), None if allowed is None else allowed[layer])
        limit = count if allowed is None else min(count, int(allowed[layer].sum()))
        forced[layer, order[:limit]] = True
    return forced


def stage_targets(target: float, stages: int) -> list[float]:
    """What each stage of a staged cut keeps: ``target ** (i / stages)`` for ``i = 1 .. stages``.

    Every stage removes the same fraction of what the previous one kept, and the last one keeps exactly ``target``.
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    return [target if i == stages else target ** (i / stages) for i in range(1, stages + 1)]


def search_mask(head_importance: torch.Tensor, neuron_importance: torch.Tensor, costs: StructureCosts,
                budget: int, allowed_heads: torch.Tensor | None = None,
                allowed_neurons: torch.Tensor | None = None,
                floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads and neurons to keep: the largest total importance whose cost fits in ``budget``.

    For every number ``k`` of kept heads (the ``k`` most important), the remaining budget takes as many of the most
    important neurons as fit; the ``k`` with the largest kept importance wins (the smallest such ``k`` on a tie).
    Equal importances are ordered by position (layer, then index), so the result is deterministic.

    Args:
        head_importance: (layers, heads).
        neuron_importance: (layers, intermediate).
        costs: from :func:`structure_costs`.
        budget: the most the kept structures may cost (same unit as ``costs``).
        allowed_heads, allowed_neurons: boolean masks of the structures that may be kept (a later stage of a
            staged cut keeps a subset of what the last one kept); default: all.
        floor: every layer keeps at least this fraction of its heads and of its neurons (:func:`layer_floor`);
            the rest of the budget is searched as above.

    Returns:
        Boolean ``(head_keep, neuron_keep)`` shaped like the importances.

    Raises:
        ValueError: the floor alone costs more than the budget.
    """
    head_order = _allowed_first(_descending(head_importance), allowed_heads)
    neuron_order = _allowed_first(_descending(neuron_importance), allowed_neurons)
    min_heads = min_neurons = 0
    if floor > 0:
        forced_heads = layer_floor(head_importance, floor, allowed_heads)
        forced_neurons = layer_floor(neuron_importance, floor, allowed_neurons)
        # The forced structures lead the orders, so every prefix long enough holds them all.
        head_order = _allowed_first(head_order, forced_heads)
        neuron_order = _allowed_first(neuron_order, forced_neurons)
        min_heads, min_neurons = int(forced_heads.sum()), int(forced_neurons.sum())
        if min_heads * costs.head + min_neurons * costs.neuron > budget:
            raise ValueError(f"a layer floor of {floor} costs {min_heads * costs.head + min_neurons * costs.neuron} "
                             f"of a budget of {budget}")
    max_heads = head_importance.numel() if allowed_heads is None else int(allowed_heads.sum())
    head_cum = torch.cat([torch.zeros(1, dtype=torch.float64),
                          torch.cumsum(head_importance.flatten()[head_order].double(), 0)])
    neuron_cum = torch.cat([torch.zeros(1, dtype=torch.float64),
                            torch.cumsum(neuron_importance.flatten()[neuron_order].double(), 0)])
    num_neurons = neuron_importance.numel()
    max_neurons = num_neurons if allowed_neurons is None else int(allowed_neurons.sum())
    best_k, best_n, best_value = min_heads, min_neurons, -math.inf
    for k in range(min_heads, max_heads + 1):
        left = budget - k * costs.head
        n = min(max_neurons, left // costs.neuron)
        if n < min_neurons:
            break
        value = float(head_cum[k] + neuron_cum[n])
        if value > best_value:
            best_k, best_n, best_value = k, n, value
    head_keep = torch.zeros(head_importance.numel(), dtype=torch.bool)
    head_keep[head_order[:best_k]] = True
    neuron_keep = torch.zeros(num_neurons, dtype=torch.bool)
    neuron_keep[neuron_order[:best_n]] = True
    return head_keep.view_as(head_importance), neuron_keep.view_as(neuron_importance)


def rearrange_mask(keep: torch.Tensor, blocks: torch.Tensor, max_swaps: int | None = None) -> torch.Tensor:
    """Re-choose each layer's kept structures, same count per layer, with the layer's Fisher block.

    Removing the set ``z`` (a 0/1 vector) raises the loss by about ``z^T F z / 2``; starting from ``keep``, the
    best swap of one kept and one removed structure is made while it lowers ``z^T F z``.

    Args:
        keep: (layers, n) boolean.
        blocks: (layers, n, n) per-layer Fisher blocks (sums of ``g g^T``).
        max_swaps: per layer (default ``n``).

    Returns:
        The new boolean mask, with the same number kept in every layer.
    """
    out = keep.clone()
    for layer in range(keep.shape[0]):
        fisher = blocks[layer].double()
        removed = (~out[layer]).double()
        fz = fisher @ removed
        diag = fisher.diagonal()
        for _ in range(max_swaps if max_swaps is not None else keep.shape[1]):
            off = (~out[layer]).nonzero().flatten()  # removed, may come back
            on = out[layer].nonzero().flatten()  # kept, may go
            if not len(off) or not len(on):
                break
            # Swapping i (removed -> kept) for j (kept -> removed): z' = z - e_i + e_j.
            delta = (2 * (fz[on][None, :] - fz[off][:, None]) + diag[off][:, None] + diag[on][None, :]
                     - 2 * fisher[off][:, on])
            best = int(torch.argmin(delta))
            if float(delta.flatten()[best]) >= -1e-12 * max(1.0, float(diag.abs().max())):
                break
            i, j = int(off[best // len(on)]), int(on[best % len(on)])
            out[layer, i], out[layer, j] = True, False
            fz += fisher[:, j] - fisher[:, i]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Zeroing, tuning and the masked representation
# ----------------------------------------------------------------------------------------------------------------


def _head_columns(head_keep: torch.Tensor, head_dim: int) -> torch.Tensor:
    return head_keep.repeat_interleave(head_dim)


@torch.no_grad()
def zero_removed_(model: nn.Module, head_keep: torch.Tensor, neuron_keep: torch.Tensor) -> None:
    """Zero the weights of removed heads and neurons of a plain (unmasked) model, in place.

    The model then computes what the masked model with this structure computes: a removed head's query/key/value
    rows and biases and its output-projection columns are zero (and the output projection's bias too when a layer
    keeps no head, as its mask does); a removed neuron's row and bias of the first FFN linear and column of the
    second are zero.
    """
    arch = architecture_for(model)
    _, _, head_dim, _ = _shape(model)
    for layer, heads, neurons in zip(encoder_layers(model), head_keep, neuron_keep):
        rows = ~_head_columns(heads.cpu(), head_dim)
        for path in arch.qkv:
            linear = get_module(layer, path)
            linear.weight[rows.to(linear.weight.device)] = 0
            if linear.bias is not None:
                linear.bias[rows.to(linear.bias.device)] = 0
        out = get_module(layer, arch.attention_output)
        out.weight[:, rows.to(out.weight.device)] = 0
        if not bool(heads.any()) and out.bias is not None:
            out.bias.zero_()
        drop = ~neurons.cpu()
        first, second = get_module(layer, arch.ffn_in), get_module(layer, arch.ffn_out)
        first.weight[drop.to(first.weight.device)] = 0
        if first.bias is not None:
            first.bias[drop.to(first.bias.device)] = 0
        second.weight[:, drop.to(second.weight.device)] = 0


class _Capture:
    """Records the inputs of chosen modules (forward pre-hooks) during one call."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.values: dict[str, torch.Tensor] = {}

    def install(self) -> ContextManager[None]:
        handles = []
        for name, module in self.modules.items():
            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                self.values[name] = args[0]
            handles.append(module.register_forward_pre_hook(hook))
        return _hooks(handles)


def _norm_paths(model: nn.Module) -> tuple[str, str]:
    arch = architecture_for(model)
    return arch.attention_norm, arch.ffn_norm


def _layer_call(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, tuple, dict]:
    """Run the embeddings and capture what the encoder hands its first layer: (hidden, other args, kwargs)."""
    first = encoder_layers(model)[0]
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, dict(kwargs)
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**_inputs(batch))
    except _Stop:
        pass
    finally:
        handle.remove()
    args = captured["args"]
    return args[0], tuple(args[1:]), captured["kwargs"]


class _Stop(Exception):
    """Ends a forward pass early, once what is needed of it has been captured."""


@contextlib.contextmanager
def _stop_after(module: nn.Module) -> Iterator[None]:
    """Raise :class:`_Stop` when ``module`` is about to run (its input is captured by hooks registered before)."""
    def hook(mod: nn.Module, args: tuple) -> None:
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _token_rows(features: Batch, rows: torch.Tensor, batch: Batch, device: torch.device) -> torch.Tensor:
    """The real tokens of ``batch`` (the windows ``rows`` of ``features``), as positions in its windows flattened
    to ``(windows * width)``, on ``device``.

    They are found in the host's attention mask and copied over: selecting them on the device with a boolean mask
    would make the host wait for the GPU to count them, every batch.
    """
    mask = features["attention_mask"][rows][:, :batch["attention_mask"].shape[1]]
    return to_device(mask.reshape(-1).nonzero().flatten(), device)


def _kept(keep: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The positions of ``keep``'s True entries, found on the host, on ``device``."""
    return to_device(keep.cpu().nonzero().flatten(), device)


# The default relative ridge weight of each tuning mode.
TUNING_DAMPING = {"scales": 1e-3, "weights": 1e-2}


@torch.no_grad()
def tune_masks_(model: nn.Module, dense: nn.Module, features: Batch, index: torch.Tensor,
                head_keep: torch.Tensor, neuron_keep: torch.Tensor, batch_size: int = 16,
                damping: float | None = None, device: torch.device | None = None,
                mode: str = "scales") -> list[LayerTuning]:
    """Least-squares fits of the kept heads and neurons (a scale each, or their output weights), layer by layer.

    ``model`` is the plain pruned model (removed structures zeroed by :func:`zero_removed_`), ``dense`` the model
    before pruning. For layer ``l``, with the pruned model's input ``x'`` (after the layers already tuned) and the
    dense model's input ``x``, the attention sublayer's head scales ``m`` minimise
    ``|| x' + b + sum_h m_h A_h(x') - (x + b + sum_h A_h(x)) ||^2`` over the calibration tokens (``A_h`` is head
    ``h``'s contribution through the output projection); then the FFN scales do the same for the FFN sublayer on
    the tuned attention output. A ridge term ``damping * mean(diag G) * |m - 1|^2`` keeps the scales near 1, so the
    error never rises above its value at ``m = 1``. Scales multiply the output projection's columns of each head and
    the second FFN linear's column of each neuron.

    With ``mode="weights"`` the same systems are solved for the whole kept part of each sublayer's output linear
    instead of one scale per structure: the attention output projection's columns of the kept heads and its bias,
    and the second FFN linear's columns of the kept neurons and its bias, minimising the same error (the ridge now
    keeps the change of the weights small). A scale per structure is the special case of a change within each
    structure's columns, so, on the same input and without the ridge, the weights fit at least as closely.

    Both modes accumulate the same normal equations of each output linear's kept input columns (and a constant for
    the bias) against the error of the sum; the scales' system follows from them and the linear's weights.

    Args:
        model: the pruned plain model; changed in place.
        dense: the model before pruning (not changed).
        features, index: the calibration windows.
        head_keep, neuron_keep: the structure (boolean, (layers, heads) and (layers, intermediate)).
        batch_size: windows per pass.
        damping: relative ridge weight (default: the mode's, :data:`TUNING_DAMPING`).
        device: where to compute (default: the model's device).
        mode: ``"scales"`` (one scale per kept head and neuron) or ``"weights"`` (the kept columns and the bias).

    Returns:
        One :class:`LayerTuning` per layer.
    """
    if mode not in TUNING_DAMPING:
        raise ValueError(f"mask tuning mode must be 'scales' or 'weights', got {mode!r}")
    damping = TUNING_DAMPING[mode] if damping is None else damping
    device = device or next(model.parameters()).device
    arch = architecture_for(model)
    _, _, head_dim, _ = _shape(model)
    att_norm, ffn_norm = _norm_paths(model)
    results: list[LayerTuning] = []
    with _frozen(model, dense):
        # Layer inputs of both models for every batch, and the layer call's other arguments (attention mask).
        student_x, teacher_x, calls, token_rows = [], [], [], []
        for rows in length_batches(features, index, batch_size):
            batch = window_batch(features, rows, device)
            hidden, args, kwargs = _layer_call(model, batch)
            student_x.append(hidden)
            teacher_x.append(_layer_call(dense, batch)[0])
            calls.append((args, kwargs))
            token_rows.append(_token_rows(features, rows, batch, device))
        for layer_index, (layer, dense_layer) in enumerate(zip(encoder_layers(model), encoder_layers(dense))):
            kept_neurons = _kept(neuron_keep[layer_index], device)
            columns = _kept(_head_columns(head_keep[layer_index].cpu(), head_dim), device)
            out_proj = get_module(layer, arch.attention_output)
            second = get_module(layer, arch.ffn_out)
            att_sum, ffn_sum = get_module(layer, att_norm), get_module(layer, ffn_norm)
            student_cap = _Capture({"ctx": out_proj, "att_sum": att_sum, "act": second, "ffn_sum": ffn_sum})
            teacher_cap = _Capture({"att_sum": get_module(dense_layer, att_norm),
                                    "ffn_sum": get_module(dense_layer, ffn_norm)})

            # Pass 1: the dense layer's sums and output; the pruned attention sublayer (stopped at its LayerNorm)
            # gives the attention system.
            # A layer without heads loses its attention output's bias with them (masks.MaskedLinear.bias_mask,
            # zero_removed_): there is nothing of that sublayer left to fit.
            attention = _NormalEquations(out_proj, columns, head_dim, bias=len(columns) > 0)
            ffn_targets = []
            for b, (args, kwargs) in enumerate(calls):
                with teacher_cap.install():
                    teacher_x[b] = _output(dense_layer(teacher_x[b], *args, **kwargs))
                ffn_targets.append(teacher_cap.values["ffn_sum"])
                with student_cap.install(), _stop_after(att_sum):
                    try:
                        layer(student_x[b], *args, **kwargs)
                    except _Stop:
                        pass
                rows = token_rows[b]
                attention.add(student_cap.values["ctx"].flatten(0, 1)[rows][:, columns],
                              (teacher_cap.values["att_sum"] - student_cap.values["att_sum"]).flatten(0, 1)[rows])
            att_fit = attention.solve_(mode, damping)

            # Pass 2: the whole pruned layer with the tuned attention gives the FFN system; its activations and
            # sums are kept, so the tuned layer's output follows without running it again.
            ffn, activations, sums = _NormalEquations(second, kept_neurons, 1), [], []
            for b, (args, kwargs) in enumerate(calls):
                with student_cap.install():
                    layer(student_x[b], *args, **kwargs)
                activations.append(student_cap.values["act"][..., kept_neurons])
                sums.append(student_cap.values["ffn_sum"])
                rows = token_rows[b]
                ffn.add(activations[-1].flatten(0, 1)[rows], (ffn_targets[b] - sums[-1]).flatten(0, 1)[rows])
            ffn_fit = ffn.solve_(mode, damping)
            # The next layer's input: the pruned layer's FFN sum moved by the change, through its LayerNorm.
            for b in range(len(calls)):
                student_x[b] = ffn_sum(sums[b] + ffn_fit.output_change(activations[b]))
            del activations, sums, ffn_targets
            count = max(1, attention.tokens * out_proj.weight.shape[0])
            results.append(LayerTuning(
                attention_before=attention.error / count, attention_after=att_fit.error / count,
                ffn_before=ffn.error / count, ffn_after=ffn_fit.error / count))
            logger.info("mask tuning (%s) layer %d: attention error %.3g -> %.3g, FFN error %.3g -> %.3g", mode,
                        layer_index, results[-1].attention_before, results[-1].attention_after,
                        results[-1].ffn_before, results[-1].ffn_after)
    return results


@dataclass
class _Fit:
    """A solved change of one linear's kept columns (``weight``: (columns, out), the transposed change; ``bias``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    error: float  # squared error of the sum after the change, over the calibration tokens

    def output_change(self, x: torch.Tensor) -> torch.Tensor:
        """How the linear's output moves for inputs ``x`` (..., columns) of its kept columns."""
        change = x @ self.weight.to(x.dtype)
        return change + self.bias.to(x.dtype) if self.bias is not None else change


class _NormalEquations:
    """The least-squares system of a change to ``linear``'s kept input ``columns`` against the error of its sum.

    ``add`` accumulates ``X^T X``, ``X^T E`` and ``|E|^2`` in float64 over the calibration tokens (``X``: the kept
    columns' inputs, with a constant when the linear has a bias; ``E``: the dense sum minus the pruned one), on the
    linear's device: the host reads them when it solves, not every batch. The columns come in structures of
    ``group`` consecutive ones (a head's ``head_dim`` columns, one FFN neuron). ``bias``: whether the change may move
    the linear's bias too (where it has one).
    """

    def __init__(self, linear: nn.Linear, columns: torch.Tensor, group: int, bias: bool = True) -> None:
        self.linear, self.columns, self.group = linear, columns, group
        self.bias = bias and linear.bias is not None
        size, out = len(columns) + int(self.bias), linear.weight.shape[0]
        device = linear.weight.device
        self.xtx = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.xte = torch.zeros(size, out, dtype=torch.float64, device=device)
        self.squared_error = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = 0

    @property
    def error(self) -> float:
        """The squared error of the sum over the calibration tokens, before the change."""
        return float(self.squared_error)

    def add(self, x: torch.Tensor, error: torch.Tensor) -> None:
        x, error = x.double(), error.double()
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        self.xtx += x.T @ x
        self.xte += x.T @ error
        self.squared_error += error.pow(2).sum()
        self.tokens += int(x.shape[0])

    def solve_(self, mode: str, damping: float) -> _Fit:
        """Solve for the change (ridge ``damping`` relative to the system's mean diagonal) and apply it in place."""
        n = len(self.columns)
        if mode == "weights":
            delta = _ridge(self.xtx, self.xte, damping)
            gram, rhs, unknowns = self.xtx, self.xte, delta
            change, bias = delta[:n], (delta[n] if self.bias else None)
        else:
            # One scale m_k per structure: the change of column j of structure k is m_k w_j, so the system is the
            # columns' one weighted by w_i . w_j and summed within each pair of structures.
            k = n // self.group
            weight = self.linear.weight[:, self.columns].double()  # (out, n)
            gram = (self.xtx[:n, :n] * (weight.T @ weight)).reshape(k, self.group, k, self.group).sum(dim=(1, 3))
            rhs = (self.xte[:n] * weight.T).sum(dim=1).reshape(k, self.group).sum(dim=1)
            unknowns = _ridge(gram, rhs, damping)
            change, bias = unknowns.repeat_interleave(self.group)[:, None] * weight.T, None
        after = self.error - 2 * float((unknowns * rhs).sum()) + float((unknowns * (gram @ unknowns)).sum())
        self.linear.weight[:, self.columns] += change.T.to(self.linear.weight.dtype)
        if bias is not None:
            self.linear.bias += bias.to(self.linear.bias.dtype)
        return _Fit(change.to(self.linear.weight.dtype), None if bias is None else bias.to(self.linear.weight.dtype),
                    max(after, 0.0))


def _output(value: Any) -> torch.Tensor:
    """A layer's hidden states, whether it returns a tensor or a tuple."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _ridge(gram: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """``argmin_d d^T G d - 2 d^T r + lambda |d|^2`` with ``lambda = damping * mean(diag G)``."""
    if gram.numel() == 0:
        return rhs.new_zeros(rhs.shape)
    scale = float(gram.diagonal().mean())
    if scale <= 0:
        return rhs.new_zeros(rhs.shape)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + damping * scale * eye, rhs)


@torch.no_grad()
def reconstruction_errors(model: nn.Module, dense: nn.Module, features: Batch, index: torch.Tensor,
                          batch_size: int = 16, device: torch.device | None = None) -> list[tuple[float, float]]:
    """Per layer, the mean squared difference between ``model``'s and ``dense``'s sublayer sums.

    Each model runs on its own inputs; the sums are what enters the attention and the FFN LayerNorms. Returns
    ``(attention, ffn)`` per layer, per element over the real tokens of the windows ``index``. The squared
    differences add up on ``device`` and are read back once, at the end.
    """
    device = device or next(model.parameters()).device
    att_norm, ffn_norm = _norm_paths(model)
    num_layers = len(encoder_layers(model))
    sums = torch.zeros(num_layers, 2, dtype=torch.float64, device=device)
    elements = 0
    captures = []
    for m in (model, dense):
        modules = {}
        for i, layer in enumerate(encoder_layers(m)):
            modules[f"att{i}"] = get_module(layer, att_norm)
            modules[f"ffn{i}"] = get_module(layer, ffn_norm)
        captures.append(_Capture(modules))
    with _frozen(model, dense), captures[0].install(), captures[1].install():
        for rows in length_batches(features, index, batch_size):
            batch = window_batch(features, rows, device)
            model(**_inputs(batch))
            dense(**_inputs(batch))
            keep = _token_rows(features, rows, batch, device)
            for i in range(num_layers):
                for j, key in enumerate((f"att{i}", f"ffn{i}")):
                    a = captures[0].values[key].reshape(-1, captures[0].values[key].shape[-1])[keep]
                    b = captures[1].values[key].reshape(-1, a.shape[-1])[keep]
                    sums[i, j] += (a.double() - b.double()).pow(2).sum()
            elements += int(keep.numel()) * int(captures[0].values["att0"].shape[-1])
    return [(a / max(1, elements), f / max(1, elements)) for a, f in sums.tolist()]


@torch.no_grad()
def apply_structure_(model: nn.Module, head_keep: torch.Tensor, neuron_keep: torch.Tensor) -> nn.Module:
    """Turn a plain model into a masked one whose fixed masks keep exactly ``head_keep``/``neuron_keep``, in place.

    Attention blocks are one head (``[head_dim, hidden]``; the output projection's transposed), FFN blocks one
    row. Kept structures score +1 and removed ones -1; the layers are first put in the ``cutoff`` mode at 0 (so the
    scores alone give the structure back when a checkpoint is loaded), then fixed with :func:`masks.fix_masks_`,
    as at the start of a filled phase.
    """
    _, _, head_dim, _ = _shape(model)
    arch = architecture_for(model)
    hidden = model.config.hidden_size
    mask_lib.apply_masks_(model, "sigmoid_threshold", (head_dim, hidden))
    for layer, heads, neurons in zip(encoder_layers(model), head_keep, neuron_keep):
        head_scores = heads.float() * 2 - 1
        for path in arch.attention_linears:
            module = get_module(layer, path)
            shape = module.mask_scores.shape
            module.mask_scores.copy_(head_scores.reshape(shape).to(module.mask_scores.device))
        first = get_module(layer, arch.ffn_in)
        first.mask_scores.copy_((neurons.float() * 2 - 1).reshape(first.mask_scores.shape).to(first.mask_scores.device))
    for _, module in mask_lib.masked_modules(model):
        module.set_cutoff(0.0)
    model.fineprune_fill_from = ("cutoff", 0.0)
    mask_lib.fix_masks_(model, [h.cpu() for h in head_keep], [n.cpu() for n in neuron_keep])
    return model


# ----------------------------------------------------------------------------------------------------------------
# Warm starts for movement pruning
# ----------------------------------------------------------------------------------------------------------------


def _weighted_quantiles(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mid-point quantile of every value in the weighted population; equal values get equal quantiles."""
    unique, inverse = torch.unique(values, sorted=True, return_inverse=True)
    mass = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, weights.double())
    below = torch.cumsum(mass, 0) - mass
    mid = (below + mass / 2) / mass.sum()
    return mid[inverse]


@torch.no_grad()
def warm_start_scores_(model: nn.Module, source: str, scale: float = 1.0,
                       importance: Importance | None = None) -> None:
    """Set the scores of a masked (topk or sigmoid_threshold) model from an importance estimate, in place.

    Every score block gets an importance per weight: ``fisher``: its head's (or FFN neuron's) Fisher importance
    divided by the weights that structure holds (a block spanning several heads takes their mean); ``magnitude``:
    the block's mean absolute weight (an FFN score: its row of the first linear and column of the second). The
    score is then ``scale * (2 q - 1)``, with ``q`` the block's quantile among all blocks weighted by their sizes, so
    a global cut at density ``d`` on the initial scores keeps the most important ``d`` of the weights.

    Args:
        model: a masked model.
        source: ``fisher`` or ``magnitude``.
        scale: half the spread of the scores.
        importance: from :func:`fisher_importance` (required for ``fisher``).
    """
    if source not in ("fisher", "magnitude"):
        raise ValueError(f"unknown warm start {source!r} (fisher or magnitude)")
    if source == "fisher" and importance is None:
        raise ValueError("a fisher warm start needs the importance")
    arch = architecture_for(model)
    _, num_heads, head_dim, _ = _shape(model)
    hidden = model.config.hidden_size
    modules, values, weights = [], [], []
    for i, layer in enumerate(encoder_layers(model)):
        if source == "fisher":
            per_weight_head = importance.heads[i].float() / (4 * hidden * head_dim)
            per_weight_neuron = importance.neurons[i].float() / (2 * hidden)
        for path in (*arch.attention_linears, arch.ffn_in):
            module = get_module(layer, path)
            if not isinstance(module, mask_lib.MaskedLinear):
                continue
            br, bc = module.block
            rows, cols = module.mask_scores.shape
            if source == "magnitude":
                value = magnitude_block_importance(module)
                if path == arch.ffn_in:
                    second = get_module(layer, arch.ffn_out).weight.detach().abs().float().mean(dim=0)
                    value = (value.flatten() + second).reshape(rows, cols) / 2
            elif path == arch.ffn_in:
                value = per_weight_neuron.reshape(rows, cols)
            else:
                # Heads run along the rows of query/key/value and along the columns of the output projection.
                along_rows = path != arch.attention_output
                count, size = (rows, br) if along_rows else (cols, bc)
                position = torch.arange(count * size) // head_dim  # the head of every row (or column)
                per_block = per_weight_head[position].reshape(count, size).mean(dim=1)
                value = per_block[:, None].expand(rows, cols) if along_rows else per_block[None, :].expand(rows, cols)
            size = module.weights_per_score
            modules.append(module)
            values.append(value.reshape(-1).float().cpu())
            weights.append(torch.full((value.numel(),), float(size)))
    quantiles = _weighted_quantiles(torch.cat(values), torch.cat(weights))
    offset = 0
    for module in modules:
        n = module.mask_scores.numel()
        q = quantiles[offset:offset + n].reshape(module.mask_scores.shape)
        module.mask_scores.copy_((scale * (2 * q - 1)).to(module.mask_scores.dtype))
        offset += n
