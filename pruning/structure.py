"""Per-architecture table: where the attention projections and the feed-forward pair live.

The trainer, the mask code and the packer never spell module names themselves; they ask this table. Adding an
architecture whose layers look like BERT's (four attention projections, a two-linear feed-forward block) is one
more entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Architecture", "ARCHITECTURES", "architecture_for", "get_module", "set_module", "encoder_layers"]


@dataclass(frozen=True)
class Architecture:
    """Module paths, relative to one encoder layer, plus the path of the layer list."""

    layers: str  # the ModuleList of encoder layers, relative to the QA model
    self_attention: str  # the module holding query/key/value (replaced when a layer loses every head)
    query: str
    key: str
    value: str
    attention_output: str  # projects the concatenated heads back to the hidden size
    ffn_in: str  # hidden -> intermediate; its rows are the FFN dimensions
    ffn_out: str  # intermediate -> hidden; its columns are the FFN dimensions
    attention_norm: str  # the LayerNorm whose input is the attention sublayer's output plus its residual
    ffn_norm: str  # the LayerNorm whose input is the FFN sublayer's output plus its residual

    @property
    def qkv(self) -> tuple[str, str, str]:
        return (self.query, self.key, self.value)

    @property
    def attention_linears(self) -> tuple[str, str, str, str]:
        return (self.query, self.key, self.value, self.attention_output)


BERT = Architecture(
    layers="bert.encoder.layer",
    self_attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_output="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    attention_norm="attention.output.LayerNorm",
    ffn_norm="output.LayerNorm",
)

ARCHITECTURES: dict[str, Architecture] = {"bert": BERT}


def architecture_for(model: nn.Module) -> Architecture:
    """The table entry for a transformers model, by ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {supported})")
    return ARCHITECTURES[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(get_module(model, architecture_for(model).layers))
