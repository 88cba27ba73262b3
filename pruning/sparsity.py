"""What survives pruning: kept heads, kept FFN dimensions and densities, read off the effective weights.

The same functions decide what the packer removes and what the metrics report, so ``heads_removed`` in a run's
metrics is exactly the number of heads the packed model lacks.

A head contributes nothing, and is removed, when its value rows (weights and bias) are all zero - then its context
vector is zero whatever the attention pattern - or when the attention output's columns for it are all zero. This
covers the paper's rule (all query/key/value blocks pruned). An FFN dimension is removed when its row of the first
linear (weights and bias) is all zero and the activation maps 0 to 0 (GELU, ReLU, SiLU, ...), or when its column of
the second linear is all zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .masks import MaskedLinear, TiedColumnMaskedLinear
from .structure import architecture_for, encoder_layers, get_module

__all__ = ["LayerStructure", "SparsityReport", "effective_weight", "layer_structure", "sparsity_report"]


@torch.no_grad()
def effective_weight(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) as the forward pass uses them: masks applied, detached."""
    if isinstance(linear, (MaskedLinear, TiedColumnMaskedLinear)):
        baked = linear.to_linear()
        return baked.weight.detach(), None if baked.bias is None else baked.bias.detach()
    return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()


@dataclass
class LayerStructure:
    heads_kept: torch.Tensor  # bool, one per original head
    ffn_kept: torch.Tensor  # bool, one per original FFN dimension
    head_dim: int
    linear_weights: int  # weights of the six linears before pruning
    linear_kept: int  # of those, nonzero after packing (zeros inside kept heads not counted)


def _rows_zero(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    zero = (weight == 0).all(dim=1)
    return zero if bias is None else zero & (bias == 0)


def _maps_zero_to_zero(module: nn.Module) -> bool:
    """Whether the FFN activation of ``module`` (its ``intermediate_act_fn``) maps 0 to 0."""
    act = module.intermediate_act_fn
    return bool((act(torch.zeros(1)) == 0).all())


@torch.no_grad()
def layer_structure(layer: nn.Module, arch, num_heads: int) -> LayerStructure:
    """Which heads and FFN dimensions of one encoder layer survive, and how many linear weights remain."""
    wq, bq = effective_weight(get_module(layer, arch.query))
    wk, bk = effective_weight(get_module(layer, arch.key))
    wv, bv = effective_weight(get_module(layer, arch.value))
    wo, _ = effective_weight(get_module(layer, arch.attention_output))
    w1, b1 = effective_weight(get_module(layer, arch.ffn_in))
    w2, _ = effective_weight(get_module(layer, arch.ffn_out))
    head_dim = wv.shape[0] // num_heads if num_heads else 0
    if num_heads:
        v_zero = _rows_zero(wv, bv).reshape(num_heads, head_dim).all(dim=1)
        o_zero = (wo == 0).all(dim=0).reshape(num_heads, head_dim).all(dim=1)
        heads_kept = ~(v_zero | o_zero)
    else:
        heads_kept = torch.zeros(0, dtype=torch.bool)
    # A dimension whose input is always 0 still adds activation(0) times its column of the second linear to the
    # output unless the activation maps 0 to 0 (a sigmoid gives 0.5).
    inert = _rows_zero(w1, b1) if _maps_zero_to_zero(get_module(layer, arch.ffn_activation)) else False
    ffn_kept = ~(inert | (w2 == 0).all(dim=0))

    rows = heads_kept.repeat_interleave(head_dim) if num_heads else torch.zeros(0, dtype=torch.bool)
    kept = 0
    for w in (wq, wk, wv):
        kept += int((w[rows] != 0).sum())
    kept += int((wo[:, rows] != 0).sum())
    kept += int((w1[ffn_kept] != 0).sum()) + int((w2[:, ffn_kept] != 0).sum())
    total = sum(w.numel() for w in (wq, wk, wv, wo, w1, w2))
    return LayerStructure(heads_kept.cpu(), ffn_kept.cpu(), head_dim, total, kept)


@dataclass
class SparsityReport:
    linear_density: float  # kept fraction of the encoder's attention + FFN weights
    total_density: float  # kept fraction of all parameters (embeddings and the rest counted as kept; the biases
    #                        of removed heads and FFN dimensions as removed)
    heads_removed: int
    heads_total: int
    heads_removed_per_layer: list[int] = field(default_factory=list)
    heads_kept_per_layer: list[int] = field(default_factory=list)
    ffn_kept_per_layer: list[int] = field(default_factory=list)
    ffn_dims_total: int = 0
    layers: list[LayerStructure] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        """Flat metric names, as logged everywhere; counts stay integers (as ``pack`` reports them)."""
        out: dict[str, float] = {
            "linear_density": self.linear_density,
            "total_density": self.total_density,
            "heads_removed": int(self.heads_removed),
        }
        for i, (removed, ffn) in enumerate(zip(self.heads_removed_per_layer, self.ffn_kept_per_layer)):
            out[f"heads_removed_layer_{i}"] = int(removed)
            out[f"ffn_kept_layer_{i}"] = int(ffn)
        return out


def _num_heads(layer: nn.Module, arch, default: int) -> int:
    attention = get_module(layer, arch.self_attention)
    return int(getattr(attention, "num_attention_heads", default))


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Densities and surviving structure of a (masked, packed or dense) model, relative to its original shape.

    For a packed model the original sizes come from the config (``hidden_size``, ``num_attention_heads``,
    ``intermediate_size``), so the numbers match those of the masked model it came from.
    """
    arch = architecture_for(model)
    config = model.config
    original_heads = config.num_attention_heads
    head_dim = config.hidden_size // original_heads
    hidden, inter = config.hidden_size, config.intermediate_size
    per_layer_total = 4 * hidden * hidden + 2 * hidden * inter
    layers = []
    removed, kept_heads, ffn_kept = [], [], []
    linear_kept = 0
    # Biases of the masked linears: those of kept heads and FFN dimensions survive packing, the rest go with them.
    bias_total = bias_kept = 0
    present = 0  # weights and biases of the masked linears as they stand (smaller in a packed model)
    for layer in encoder_layers(model):
        n = _num_heads(layer, arch, original_heads)
        s = layer_structure(layer, arch, n)
        layers.append(s)
        kept = int(s.heads_kept.sum())
        removed.append(original_heads - kept)
        kept_heads.append(kept)
        ffn_kept.append(int(s.ffn_kept.sum()))
        linear_kept += s.linear_kept
        bias_sizes = {path: (hidden, head_dim * kept) for path in arch.qkv}  # (original, surviving)
        bias_sizes[arch.attention_output] = (hidden, hidden)
        bias_sizes[arch.ffn_in] = (inter, ffn_kept[-1])
        bias_sizes[arch.ffn_out] = (hidden, hidden)
        for path, (original, surviving) in bias_sizes.items():
            linear = get_module(layer, path)
            present += linear.weight.numel()
            if linear.bias is not None:
                bias_total += original
                bias_kept += surviving
                present += linear.bias.numel()
    num_layers = len(layers)
    linear_total = per_layer_total * num_layers
    # Parameters outside the masked linears count as kept; scores are training state, not model weights.
    other = 0
    for name, p in model.named_parameters():
        if name.endswith("mask_scores"):
            continue
        other += p.numel()
    other -= present
    total_original = other + linear_total + bias_total
    return SparsityReport(
        linear_density=linear_kept / linear_total if linear_total else 1.0,
        total_density=(other + linear_kept + bias_kept) / total_original if total_original else 1.0,
        heads_removed=sum(removed),
        heads_total=original_heads * num_layers,
        heads_removed_per_layer=removed,
        heads_kept_per_layer=kept_heads,
        ffn_kept_per_layer=ffn_kept,
        ffn_dims_total=inter * num_layers,
        layers=layers,
    )
