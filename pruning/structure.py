"""Per-architecture table: where the attention projections and the feed-forward pair live.

The trainer, the mask code and the packer never spell module names themselves; they ask this table. Adding an
architecture whose layers look like BERT's (four attention projections, a two-linear feed-forward block) is one
more entry.

Supported ``model_type`` values: ``bert``; the RoBERTa family (``roberta``, ``xlm-roberta``, ``camembert``),
whose encoder is BERT's under the prefix ``roberta`` but whose position ids count the non-padding tokens from
``pad_token_id + 1`` (:func:`position_ids`), so that ``pad_token_id + 1`` of its position embeddings are never
used by a window (:func:`max_positions`); and ``electra``, BERT's encoder under the prefix ``electra`` whose
embeddings may be narrower than the layers (``embedding_size``), projected to the hidden size by
``embeddings_project``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import transformers
from torch import nn

from .packed_modeling import LAYER_PATHS, LayerPaths

__all__ = ["Architecture", "ARCHITECTURES", "DEFAULT_MODEL_TYPE", "architecture_for", "architecture_of_type",
           "qa_model_class", "config_class", "scratch_config", "max_positions", "position_ids", "get_module",
           "set_module", "encoder_layers"]

DEFAULT_MODEL_TYPE = "bert"  # what a config.json without ``model_type`` is taken for


@dataclass(frozen=True)
class Architecture(LayerPaths):
    """Module paths, relative to one encoder layer (the linears' as :class:`~pruning.packed_modeling.LayerPaths`
    gives them, and the norms'), plus the path of the layer list and how positions are counted."""

    qa_class: str  # the transformers question-answering class of this model_type
    base: str  # the encoder model (embeddings, layers), relative to the QA model
    layers: str  # the ModuleList of encoder layers, relative to the QA model
    ffn_activation: str  # the module whose ``intermediate_act_fn`` follows ffn_in
    attention_norm: str  # the LayerNorm whose input is the attention sublayer's output plus its residual
    ffn_norm: str  # the LayerNorm whose input is the FFN sublayer's output plus its residual
    # RoBERTa: a token's position is pad_token_id + its rank among the window's non-padding tokens, padding tokens
    # sit at pad_token_id; BERT: a token's position is its index.
    positions_after_padding: bool = False

    @property
    def qkv(self) -> tuple[str, str, str]:
        return (self.query, self.key, self.value)

    @property
    def attention_linears(self) -> tuple[str, str, str, str]:
        return (self.query, self.key, self.value, self.attention_output)


_LAYER = dict(
    **dataclasses.asdict(LAYER_PATHS),  # the linears, where the packed models of packed_modeling.py find them
    ffn_activation="intermediate",
    attention_norm="attention.output.LayerNorm",
    ffn_norm="output.LayerNorm",
)  # the modules of one encoder layer, the same in BERT, the RoBERTa family and ELECTRA

BERT = Architecture(qa_class="BertForQuestionAnswering", base="bert", layers="bert.encoder.layer", **_LAYER)


def _roberta_family(qa_class: str) -> Architecture:
    return Architecture(qa_class=qa_class, base="roberta", layers="roberta.encoder.layer",
                        positions_after_padding=True, **_LAYER)


ARCHITECTURES: dict[str, Architecture] = {
    "bert": BERT,
    "roberta": _roberta_family("RobertaForQuestionAnswering"),
    "xlm-roberta": _roberta_family("XLMRobertaForQuestionAnswering"),
    "camembert": _roberta_family("CamembertForQuestionAnswering"),
    "electra": Architecture(qa_class="ElectraForQuestionAnswering", base="electra", layers="electra.encoder.layer",
                            **_LAYER),
}


def architecture_of_type(model_type: str | None) -> Architecture:
    """The table entry of a ``model_type``.

    Raises:
        ValueError: one line naming the type and the supported ones.
    """
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {supported})")
    return ARCHITECTURES[model_type]


def architecture_for(model: nn.Module) -> Architecture:
    """The table entry for a transformers model, by ``config.model_type``."""
    return architecture_of_type(getattr(getattr(model, "config", None), "model_type", None))


def qa_model_class(model_type: str) -> type:
    """The transformers question-answering class of a supported ``model_type``."""
    return getattr(transformers, architecture_of_type(model_type).qa_class)


def config_class(model_type: str) -> type:
    """The transformers config class of a supported ``model_type``."""
    architecture_of_type(model_type)
    return transformers.CONFIG_MAPPING[model_type]


def scratch_config(values: Mapping[str, Any], tokenizer) -> transformers.PretrainedConfig:
    """The config of a model built from scratch (a run's ``model_config``: config kwargs, ``model_type`` bert unless
    given) for ``tokenizer``: its vocabulary size and pad id unless ``values`` give them. A RoBERTa-family model
    counts positions from its pad id, which must be the id the windows are padded with."""
    values = {"vocab_size": tokenizer.vocab_size, **values}
    if tokenizer.pad_token_id is not None:
        values.setdefault("pad_token_id", tokenizer.pad_token_id)
    return config_class(values.pop("model_type", DEFAULT_MODEL_TYPE))(**values)


def max_positions(config) -> int:
    """The longest window a model with this config takes: its position embeddings, less those a RoBERTa-family
    model never gives a token (``0 .. pad_token_id``)."""
    limit = int(config.max_position_embeddings)
    if architecture_of_type(getattr(config, "model_type", None)).positions_after_padding:
        limit -= int(config.pad_token_id) + 1
    return limit


def position_ids(config, input_ids: torch.Tensor) -> torch.Tensor:
    """The position ids the model of ``config`` gives ``input_ids`` (``(B, T)``), as its embeddings compute them.

    BERT: ``0 .. T-1``. RoBERTa family: ``pad_token_id + k`` for the ``k``-th non-padding token of a window,
    ``pad_token_id`` for a padding token.
    """
    seq = input_ids.shape[1]
    if not architecture_of_type(getattr(config, "model_type", None)).positions_after_padding:
        return torch.arange(seq, device=input_ids.device).unsqueeze(0)
    pad = int(config.pad_token_id)
    # The casts of transformers' RoBERTa embeddings: the same graph when traced, which ORT's fusions recognise.
    real = input_ids.ne(pad).int()
    return (torch.cumsum(real, dim=1).type_as(real) * real).long() + pad


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(get_module(model, architecture_for(model).layers))
