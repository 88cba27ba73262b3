"""DistilBERT read as BERT: a ``distilbert`` model directory opens as the BERT model that computes the same function.

A DistilBERT layer is a BERT layer under other names: self-attention whose heads are scaled by ``1/sqrt(head
width)``, its output projection, a residual and a LayerNorm, then the two feed-forward linears, a residual and a
LayerNorm (``q_lin``, ``k_lin``, ``v_lin``, ``out_lin``, ``sa_layer_norm``, ``ffn.lin1``, ``ffn.lin2``,
``output_layer_norm``). Its embeddings are words and positions without token types, and its QA head is BERT's
``qa_outputs`` (after a dropout, which eval leaves out). So :func:`bert_config` and :func:`bert_state` give the
``bert`` config and weights of the same model, with token-type embeddings of zeros (two types, as the WordPiece
pair template gives them: the question 0 and the context 1), and the model that
:func:`pruning.checkpoint.load_model` returns for a DistilBERT directory is a ``BertForQuestionAnswering`` whose
logits equal DistilBERT's. Everything that follows (masks, training, packing, export, serving) is BERT's, and the
directories a run writes are ``bert`` ones.

Training it differs from training DistilBERT in two details: the token-type embeddings are trained from zero like
the other weights, and there is no dropout before ``qa_outputs`` (BERT's QA head has none).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from transformers import BertConfig, DistilBertConfig

__all__ = ["MODEL_TYPE", "TOKEN_TYPES", "bert_config", "bert_name", "bert_state", "dropped"]

MODEL_TYPE = "distilbert"
TOKEN_TYPES = 2  # BERT's pair template: question 0, context 1; both embeddings start at zero

# DistilBERT tensor (after its optional "distilbert." prefix) -> BERT tensor
_EMBEDDINGS = {
    "embeddings.word_embeddings.": "bert.embeddings.word_embeddings.",
    "embeddings.position_embeddings.": "bert.embeddings.position_embeddings.",
    "embeddings.LayerNorm.": "bert.embeddings.LayerNorm.",
}
_LAYER_PARTS = {
    "attention.q_lin.": "attention.self.query.",
    "attention.k_lin.": "attention.self.key.",
    "attention.v_lin.": "attention.self.value.",
    "attention.out_lin.": "attention.output.dense.",
    "sa_layer_norm.": "attention.output.LayerNorm.",
    "ffn.lin1.": "intermediate.dense.",
    "ffn.lin2.": "output.dense.",
    "output_layer_norm.": "output.LayerNorm.",
}
_LAYER = re.compile(r"^transformer\.layer\.(\d+)\.(.+)$")
# The heads of other DistilBERT tasks (masked LM, classification) and the position-id buffer some files hold:
# dropped, as transformers drops a pre-training head when it opens an encoder for question answering.
_DROPPED = ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "pre_classifier.", "classifier.",
            "embeddings.position_ids")


def bert_config(config: DistilBertConfig, extra: Mapping[str, Any] | None = None) -> BertConfig:
    """The config of the BERT model that computes what the DistilBERT model of ``config`` computes.

    ``extra``: entries of the DistilBERT ``config.json`` that the BERT config keeps as they are (fineprune's own
    records, say).
    """
    return BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, intermediate_size=config.hidden_dim, hidden_act=config.activation,
        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=TOKEN_TYPES,
        initializer_range=config.initializer_range, layer_norm_eps=1e-12, pad_token_id=config.pad_token_id,
        architectures=["BertForQuestionAnswering"], **dict(extra or {}))


def dropped(name: str) -> bool:
    """Whether a DistilBERT tensor belongs to no part of the question-answering model (another task's head)."""
    return name.removeprefix("distilbert.").startswith(_DROPPED)


def bert_name(name: str) -> str | None:
    """The BERT name of a DistilBERT tensor, or None for one this module does not know."""
    if name.startswith("qa_outputs."):
        return name
    name = name.removeprefix("distilbert.")
    for old, new in _EMBEDDINGS.items():
        if name.startswith(old):
            return new + name[len(old):]
    match = _LAYER.match(name)
    if match:
        index, rest = match.groups()
        for old, new in _LAYER_PARTS.items():
            if rest.startswith(old):
                return f"bert.encoder.layer.{index}.{new}{rest[len(old):]}"
    return None


def bert_state(state: Mapping[str, torch.Tensor], hidden_size: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The BERT weights of a DistilBERT state dict (with or without the ``distilbert.`` prefix of its QA and masked
    LM classes), with token-type embeddings of zeros of its dtype; and the names of the tensors it does not know
    (another architecture's, or a file edited by hand), which the caller refuses.

    Another task's head is left out (:func:`dropped`); a QA head is kept as it is.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if dropped(name):
            continue
        new = bert_name(name)
        if new is None:
            unknown.append(name)
        else:
            converted[new] = tensor
    words = converted.get("bert.embeddings.word_embeddings.weight")
    dtype = words.dtype if words is not None and words.is_floating_point() else torch.float32
    converted["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(TOKEN_TYPES, hidden_size, dtype=dtype)
    return converted, sorted(unknown)
