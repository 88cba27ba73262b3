"""ALBERT read as ELECTRA: an ``albert`` model directory opens as the ELECTRA model that computes the same function.

An ALBERT model is BERT's encoder with two changes. Its embeddings are narrower than its layers
(``embedding_size``) and projected to the hidden size (``embedding_hidden_mapping_in``), as ELECTRA's are
(``embeddings_project``). And its layers share their weights: ``num_hidden_groups`` groups of ``inner_group_num``
layers each, the ``i``-th of the ``num_hidden_layers`` steps running group ``i * groups // num_hidden_layers``. Each
layer is a BERT layer under other names (``attention.query``, ``.key``, ``.value``, ``.dense``, ``.LayerNorm``,
``ffn``, ``ffn_output``, ``full_layer_layer_norm``), and the QA head is BERT's ``qa_outputs``. So
:func:`electra_config` and :func:`electra_state` give the ``electra`` config and weights of the same model with its
layers unrolled: ``num_hidden_layers * inner_group_num`` layers, each its own copy of the shared weights it runs.
Everything that follows (masks, training, packing, export, serving) is ELECTRA's, and the directories a run writes
are ``electra`` ones.

Pruning needs the layers unshared: each layer keeps its own heads and FFN neurons. The compute falls with the
density, as for any model, but the weights on disk do not fall below the shared model's until the density is below
``1 / (num_hidden_layers * inner_group_num / num_hidden_groups)`` (1/12 for ALBERT-base): a pruned ALBERT is faster,
not smaller, than the ALBERT it came from.

ELECTRA has no projection where the embeddings are as wide as the layers, where ALBERT always has one: such a model
cannot be read (:class:`ValueError`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from transformers import AlbertConfig, ElectraConfig

__all__ = ["MODEL_TYPE", "electra_config", "electra_name", "electra_state", "dropped", "unrolled_groups"]

MODEL_TYPE = "albert"

_EMBEDDINGS = {
    "embeddings.word_embeddings.": "electra.embeddings.word_embeddings.",
    "embeddings.position_embeddings.": "electra.embeddings.position_embeddings.",
    "embeddings.token_type_embeddings.": "electra.embeddings.token_type_embeddings.",
    "embeddings.LayerNorm.": "electra.embeddings.LayerNorm.",
    "encoder.embedding_hidden_mapping_in.": "electra.embeddings_project.",
}
_LAYER_PARTS = {
    "attention.query.": "attention.self.query.",
    "attention.key.": "attention.self.key.",
    "attention.value.": "attention.self.value.",
    "attention.dense.": "attention.output.dense.",
    "attention.LayerNorm.": "attention.output.LayerNorm.",
    "ffn.": "intermediate.dense.",
    "ffn_output.": "output.dense.",
    "full_layer_layer_norm.": "output.LayerNorm.",
}
_LAYER = re.compile(r"^encoder\.albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\.(.+)$")
# The heads of other ALBERT tasks (pre-training, classification), the pooler and the buffers some files hold: dropped,
# as transformers drops them when it opens an encoder for question answering.
_DROPPED = ("pooler.", "predictions.", "sop_classifier.", "classifier.", "embeddings.position_ids",
            "embeddings.token_type_ids")


def unrolled_groups(config: AlbertConfig) -> list[tuple[int, int]]:
    """``(group, layer in the group)`` of each layer of the unrolled model, in order."""
    layers, groups = int(config.num_hidden_layers), int(config.num_hidden_groups)
    return [(int(step / (layers / groups)), inner) for step in range(layers)
            for inner in range(int(config.inner_group_num))]


def electra_config(config: AlbertConfig, extra: Mapping[str, Any] | None = None) -> ElectraConfig:
    """The config of the ELECTRA model that computes what the ALBERT model of ``config`` computes.

    ``extra``: entries of the ALBERT ``config.json`` that the ELECTRA config keeps as they are (fineprune's own
    records, say).

    Raises:
        ValueError: the embeddings are as wide as the layers (ELECTRA then has no projection to hold ALBERT's).
    """
    if config.embedding_size == config.hidden_size:
        raise ValueError(f"embedding_size equals hidden_size ({config.hidden_size}): an ALBERT model is read as "
                         "ELECTRA, which projects its embeddings only where they are narrower than its layers")
    return ElectraConfig(
        vocab_size=config.vocab_size, embedding_size=config.embedding_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers * config.inner_group_num,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act, hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range, layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id, architectures=["ElectraForQuestionAnswering"], **dict(extra or {}))


def dropped(name: str) -> bool:
    """Whether an ALBERT tensor belongs to no part of the question-answering model (another task's head, a buffer)."""
    return name.removeprefix("albert.").startswith(_DROPPED)


def electra_name(name: str, layers: Mapping[tuple[int, int], list[int]]) -> list[str] | None:
    """The ELECTRA names of an ALBERT tensor: one, or for a shared layer's tensor one per layer it runs as (``layers``:
    ``(group, layer in the group)`` -> those layers); None for a tensor this module does not know (or of a layer the
    config does not have)."""
    if name.startswith("qa_outputs."):
        return [name]
    name = name.removeprefix("albert.")
    for old, new in _EMBEDDINGS.items():
        if name.startswith(old):
            return [new + name[len(old):]]
    match = _LAYER.match(name)
    if match:
        group, inner, rest = match.groups()
        runs_as = layers.get((int(group), int(inner)))
        for old, new in _LAYER_PARTS.items():
            if runs_as is not None and rest.startswith(old):
                return [f"electra.encoder.layer.{index}.{new}{rest[len(old):]}" for index in runs_as]
    return None


def electra_state(state: Mapping[str, torch.Tensor],
                  config: AlbertConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ELECTRA weights of an ALBERT state dict (with or without the ``albert.`` prefix of its task classes), each
    shared layer copied to every layer it runs as; and the names of the tensors it does not know (another
    architecture's, or a file edited by hand), which the caller refuses.

    Another task's head is left out (:func:`dropped`); a QA head is kept as it is.
    """
    layers: dict[tuple[int, int], list[int]] = {}
    for index, place in enumerate(unrolled_groups(config)):
        layers.setdefault(place, []).append(index)
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if dropped(name):
            continue
        names = electra_name(name, layers)
        if names is None:
            unknown.append(name)
        for new in names or []:
            converted[new] = tensor  # loading copies it into each layer's own parameter
    return converted, sorted(unknown)
