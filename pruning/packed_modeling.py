"""Packed question-answering models: the encoder modules at the sizes a packed config records.

A packed model keeps, in every encoder layer, only some attention heads and FFN dimensions, so its layers differ
in width. Its ``config.json`` records them: ``fineprune_heads_kept`` (per layer, the indices of the kept heads
among the original ones) and ``fineprune_ffn_widths`` (per layer, the number of kept FFN dimensions). The classes
here build the stock transformers model of the config and then shrink its modules to those sizes, so that
transformers' ``from_pretrained`` finds a module of the stored shape for every tensor.

A layer that keeps no head gets an :class:`EmptySelfAttention` (its context is empty and the attention output, a
``Linear(0, hidden)``, yields just its bias); a layer that keeps no FFN dimension gets ``Linear(hidden, 0)`` and
``Linear(0, hidden)``.

This file is copied into every packed directory, whose ``config.json`` names its classes in ``auto_map``: it
imports only torch and transformers, so that ``AutoModelForQuestionAnswering.from_pretrained(dir,
trust_remote_code=True)`` opens the directory where fineprune is not installed. fineprune itself packs and loads
with this same code, imported from its own package.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import transformers
from torch import nn

__all__ = [
    "PACKED_FLAG",
    "HEADS_KEPT_KEY",
    "FFN_WIDTHS_KEY",
    "LayerPaths",
    "LAYER_PATHS",
    "EmptySelfAttention",
    "select_linear",
    "head_rows",
    "layer_head_dim",
    "shrink_layer",
    "shrink_to_record",
    "PackedBertForQuestionAnswering",
    "PackedRobertaForQuestionAnswering",
    "PackedXLMRobertaForQuestionAnswering",
    "PackedCamembertForQuestionAnswering",
    "PackedElectraForQuestionAnswering",
    "PACKED_CLASSES",
]

PACKED_FLAG = "fineprune_packed"
HEADS_KEPT_KEY = "fineprune_heads_kept"
FFN_WIDTHS_KEY = "fineprune_ffn_widths"


@dataclass(frozen=True)
class LayerPaths:
    """Where the attention projections and the feed-forward pair live, relative to one encoder layer."""

    self_attention: str  # the module holding query/key/value (replaced when a layer loses every head)
    query: str
    key: str
    value: str
    attention_output: str  # projects the concatenated heads back to the hidden size
    ffn_in: str  # hidden -> intermediate; its rows are the FFN dimensions
    ffn_out: str  # intermediate -> hidden; its columns are the FFN dimensions


# The same in BERT, the RoBERTa family and ELECTRA.
LAYER_PATHS = LayerPaths(
    self_attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_output="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
)


class EmptySelfAttention(nn.Module):
    """Self-attention of a layer that lost every head: an empty context, no computation.

    The query/key/value linears are kept at zero output width so that the module table, the sparsity report and
    the state dict look the same as for any other packed layer.
    """

    def __init__(self, query: nn.Linear, key: nn.Linear, value: nn.Linear, head_dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = query, key, value
        self.num_attention_heads = 0
        self.attention_head_size = head_dim
        self.all_head_size = 0

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def select_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new linear keeping the rows (``dim=0``) or columns (``dim=1``) of ``linear`` listed in ``index``.

    Works on the meta device too, which is how a packed model is built before its stored tensors are assigned.
    """
    weight = linear.weight.detach().index_select(dim, index)
    bias = None
    if linear.bias is not None:
        bias = linear.bias.detach().index_select(0, index) if dim == 0 else linear.bias.detach().clone()
    out_features, in_features = weight.shape
    # Built on meta so that no random init runs; the tensors are assigned right after. Zero-width layers make the
    # (skipped) init warn, which says nothing here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return new


def head_rows(heads: Sequence[int] | torch.Tensor, head_dim: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices of the rows of ``heads`` in a query/key/value weight (and of their columns in the output's)."""
    heads = torch.as_tensor(heads, dtype=torch.long, device=device)
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=device)).flatten()


def layer_head_dim(layer: nn.Module, config: Any, paths: Any = LAYER_PATHS) -> int:
    """The width of one attention head of ``layer``."""
    attention = _get(layer, paths.self_attention)
    return int(getattr(attention, "attention_head_size", config.hidden_size // config.num_attention_heads))


def shrink_layer(layer: nn.Module, heads: Sequence[int], ffn: Sequence[int], head_dim: int,
                 paths: Any = LAYER_PATHS) -> None:
    """Keep heads ``heads`` (indices into the layer's present heads) and FFN dimensions ``ffn``, in place.

    ``paths`` names the layer's modules (a :class:`LayerPaths` or anything with its attributes).
    """
    heads, ffn = list(heads), list(ffn)
    attention = _get(layer, paths.self_attention)
    value = _get(layer, paths.value)
    device = value.weight.device
    qkv = (paths.query, paths.key, paths.value)
    present_heads = int(getattr(attention, "num_attention_heads", value.out_features // head_dim))
    if len(heads) != present_heads:
        rows = head_rows(heads, head_dim, device)
        if heads:
            for path in qkv:
                _set(layer, path, select_linear(_get(layer, path), rows, 0))
            attention.num_attention_heads = len(heads)
            attention.all_head_size = len(heads) * head_dim
        else:
            # The stock module reshapes with view(..., -1, head_dim), which is undefined for zero heads.
            empty = EmptySelfAttention(*(select_linear(_get(layer, p), rows, 0) for p in qkv), head_dim)
            _set(layer, paths.self_attention, empty)
        _set(layer, paths.attention_output, select_linear(_get(layer, paths.attention_output), rows, 1))
    first = _get(layer, paths.ffn_in)
    if len(ffn) != first.out_features:
        index = torch.tensor(ffn, dtype=torch.long, device=device)
        _set(layer, paths.ffn_in, select_linear(first, index, 0))
        _set(layer, paths.ffn_out, select_linear(_get(layer, paths.ffn_out), index, 1))


def shrink_to_record(model: nn.Module, layers: Sequence[nn.Module] | None = None,
                     paths: Any = LAYER_PATHS) -> nn.Module:
    """Shrink the encoder layers of a stock model to the sizes its packed config records, in place.

    Every layer keeps its first heads and FFN dimensions: what matters is their number, the stored tensors are
    assigned afterwards (by ``from_pretrained`` or ``load_state_dict``).

    Args:
        model: a stock question-answering model built from a packed config (on the meta device, typically).
        layers: its encoder layers; default: ``<base model>.encoder.layer``.
        paths: where the linears of a layer live.

    Returns:
        ``model``.

    Raises:
        ValueError: the config records no kept heads and FFN widths for each layer.
    """
    config = model.config
    heads = getattr(config, HEADS_KEPT_KEY, None)
    widths = getattr(config, FFN_WIDTHS_KEY, None)
    if layers is None:
        layers = getattr(model, model.base_model_prefix).encoder.layer
    if (not isinstance(heads, list) or not isinstance(widths, list) or len(heads) != len(layers)
            or len(widths) != len(layers)):
        raise ValueError(f"config: '{HEADS_KEPT_KEY}' and '{FFN_WIDTHS_KEY}' must describe all {len(layers)} "
                         f"layers of a packed model")
    for layer, kept, width in zip(layers, heads, widths):
        shrink_layer(layer, range(len(kept)), range(width), layer_head_dim(layer, config, paths), paths)
    return model


class PackedBertForQuestionAnswering(transformers.BertForQuestionAnswering):
    """``BertForQuestionAnswering`` at the packed sizes of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        shrink_to_record(self)


class PackedRobertaForQuestionAnswering(transformers.RobertaForQuestionAnswering):
    """``RobertaForQuestionAnswering`` at the packed sizes of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        shrink_to_record(self)


class PackedXLMRobertaForQuestionAnswering(transformers.XLMRobertaForQuestionAnswering):
    """``XLMRobertaForQuestionAnswering`` at the packed sizes of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        shrink_to_record(self)


class PackedCamembertForQuestionAnswering(transformers.CamembertForQuestionAnswering):
    """``CamembertForQuestionAnswering`` at the packed sizes of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        shrink_to_record(self)


class PackedElectraForQuestionAnswering(transformers.ElectraForQuestionAnswering):
    """``ElectraForQuestionAnswering`` at the packed sizes of its config."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        shrink_to_record(self)


# The packed class of each model_type a packed directory can hold.
PACKED_CLASSES: dict[str, type] = {
    "bert": PackedBertForQuestionAnswering,
    "roberta": PackedRobertaForQuestionAnswering,
    "xlm-roberta": PackedXLMRobertaForQuestionAnswering,
    "camembert": PackedCamembertForQuestionAnswering,
    "electra": PackedElectraForQuestionAnswering,
}
