"""Answering free-form questions with any extractive QA model (dense, masked or packed).

The windows, the span search and the scores are those of evaluation (:mod:`pruning.squad`), so an answer here is
exactly what the model would be scored on for the same question and context.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .squad import Answer, Example, predict_spans

__all__ = ["Answer", "answer", "answer_batch"]


def _check_text(name: str, value: Any, index: int | None = None) -> None:
    where = name if index is None else f"{name} {index}"
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where} is empty")


def answer_batch(model: nn.Module, tokenizer: Any, questions: Sequence[str], contexts: Sequence[str],
                 max_seq_length: int = 384, doc_stride: int = 128, max_answer_length: int = 30, n_best: int = 20,
                 batch_size: int = 64, device: str | torch.device | None = None) -> list[Answer]:
    """Answer each question from its context.

    Args:
        model: a QA model called with ``input_ids``/``attention_mask``/``token_type_ids`` that returns
            ``.start_logits`` and ``.end_logits``.
        tokenizer: the model's fast tokenizer.
        questions, contexts: one context per question.
        max_seq_length, doc_stride: the windows a long context is split into.
        max_answer_length, n_best: the span search (see :func:`pruning.squad.postprocess_predictions`).
        batch_size: windows per forward pass.
        device: where to run; default: the model's device.

    Returns:
        One :class:`Answer` per question, in order, with ``context[answer.start:answer.end] == answer.text``.

    Raises:
        ValueError: a question or context is empty or not a string, or the two lists differ in length.
    """
    if isinstance(questions, str) or isinstance(contexts, str):
        raise ValueError("questions and contexts must be lists of strings (use answer() for a single question)")
    if len(questions) != len(contexts):
        raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
    for i, (question, context) in enumerate(zip(questions, contexts)):
        _check_text("question", question, i)
        _check_text("context", context, i)
    examples = [Example(id=str(i), title="", context=context, question=question)
                for i, (question, context) in enumerate(zip(questions, contexts))]
    spans = predict_spans(model, tokenizer, examples, max_seq_length=max_seq_length, doc_stride=doc_stride,
                          batch_size=batch_size, max_answer_length=max_answer_length, n_best=n_best, device=device,
                          progress=False)
    return [spans[ex.id] for ex in examples]


def answer(model: nn.Module, tokenizer: Any, question: str, context: str, max_seq_length: int = 384,
           doc_stride: int = 128, max_answer_length: int = 30, n_best: int = 20,
           device: str | torch.device | None = None) -> Answer:
    """Answer one question from its context; see :func:`answer_batch`.

    Returns:
        The best span: its text, score (start logit + end logit) and character offsets ``[start, end)`` in
        ``context``.

    Raises:
        ValueError: the question or context is empty or not a string.
    """
    _check_text("question", question)
    _check_text("context", context)
    return answer_batch(model, tokenizer, [question], [context], max_seq_length=max_seq_length,
                        doc_stride=doc_stride, max_answer_length=max_answer_length, n_best=n_best, device=device)[0]
