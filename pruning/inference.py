"""Answering free-form questions with any extractive QA model (dense, masked, packed, or another runtime).

The windows, the span search and the scores are those of evaluation (:mod:`pruning.squad`), so an answer here is
exactly what the model would be scored on for the same question and context.

Answering a list of records takes three steps, none of which depends on what runs the model:

1. :func:`check_records` checks every record before any model work: the question and the context are non-empty
   strings (without a lone surrogate), and the context fits in ``max_windows`` windows (a question is cut to
   ``max_query_length`` tokens, as in evaluation). Windows are counted with the tokenizer alone, on a prefix of the
   text just long enough to decide, so an oversized context costs little. A bad record raises a
   :class:`RecordError` naming the record's index and the field.
2. :func:`run_windows` stacks the windows of all records, sorts them by length and runs them in batches of up to
   ``batch_size`` windows of similar length through a :data:`WindowRunner`, a function from one batch of windows
   to its start and end logits (:func:`torch_runner` builds one for a PyTorch model; another runtime brings its
   own).
3. The post-processing of evaluation picks each record's span; the answers keep the records' order.

:func:`answer_records` does all three; :func:`answer_batch` and :func:`answer` are its PyTorch front ends.
A fast tokenizer is not safe to share between threads (each call sets its truncation and padding): give every thread
its own copy.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .bench import eval_mode
from .precision import check_available
from .tokenizer import check_tokenizer_ids
from .squad import (Answer, EvalFeatures, Example, HostLogits, cut_question, length_sorted_batches, lone_surrogate,
                    longest_question, model_windows, postprocess_predictions, prepare_eval_features, text_prefix,
                    to_device, tokenize_text, whole_word_tokens)

__all__ = ["Answer", "RecordError", "WindowRunner", "check_records", "count_windows", "torch_runner", "run_windows",
           "answer_records", "answer_batch", "answer"]

WindowRunner = Callable[[dict[str, torch.Tensor]], tuple[Any, Any]]
"""One batch of windows -> (start logits, end logits).

The batch holds int64 tensors ``input_ids``, ``attention_mask`` and ``token_type_ids`` of shape ``(B, T)``, cut to
its longest window; the runner returns two float arrays of shape ``(B, T)``: numpy arrays, or torch tensors on any
device (:func:`run_windows` copies those to the host together, not batch by batch).
"""

# Characters of a long text tokenized first, per token of the cap (English averages under 5 characters a token);
# the prefix then doubles until it decides.
_CHARS_PER_TOKEN = 8


class RecordError(ValueError):
    """One record is invalid. ``index`` is its position in the request (None for a single question) and ``field``
    the offending field; the one-line message names both."""

    def __init__(self, index: int | None, field: str, problem: str) -> None:
        self.index = index
        self.field = field
        self.problem = problem
        where = field if index is None else f"record {index}: {field}"
        super().__init__(f"{where} {problem}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_text(field: str, value: Any, index: int | None) -> None:
    if not isinstance(value, str):
        raise RecordError(index, field, f"must be a string, got {_kind(value)}")
    if not value.strip():
        raise RecordError(index, field, "is empty")
    bad = lone_surrogate(value)
    if bad is not None:  # the tokenizer would stop with a TypeError
        raise RecordError(index, field, f"holds a lone surrogate {bad}, which is not a character (half of a "
                                        "surrogate pair, or a byte that is not UTF-8)")


def _count_tokens(tokenizer: Any, text: str, cap: int | None) -> int:
    """Tokens of ``text`` (without special tokens) when there are at most ``cap``, otherwise some number above ``cap``.

    A long text is tokenized only up to a prefix that already holds more than ``cap`` of its tokens
    (:func:`pruning.squad.text_prefix`; a prefix cut inside a word counts the tokens before that word), so a context
    of megabytes costs what its first ``cap`` tokens do (a run of letters without spaces is one word to a byte-level
    BPE or SentencePiece tokenizer, tokenized whole). ``cap=None`` counts every token.
    """
    size = len(text) if cap is None else _CHARS_PER_TOKEN * (cap + 1)
    while True:
        prefix, whole = text_prefix(text, size)
        encoding = tokenize_text(tokenizer, prefix, add_special_tokens=False)
        if len(prefix) == len(text):
            return len(encoding["input_ids"])
        tokens = len(encoding["input_ids"]) if whole else whole_word_tokens(encoding)
        if tokens > cap:
            return tokens
        size = 2 * max(size, len(prefix))


def count_windows(tokenizer: Any, question: str, context: str, max_seq_length: int = 384, doc_stride: int = 128,
                  max_windows: int | None = None, index: int | None = None, max_query_length: int = 64) -> int:
    """Windows :func:`pruning.squad.prepare_eval_features` makes of one record, counted with the tokenizer only.

    A window holds the special tokens, the question (cut to ``max_query_length`` tokens) and
    ``max_seq_length - specials - question`` context tokens; each next window starts ``doc_stride`` tokens before
    the previous one ends.

    Args:
        tokenizer: the model's fast tokenizer.
        question, context: the record (non-empty strings).
        max_seq_length, doc_stride: the windows.
        max_windows: refuse a context needing more windows; only as much of it is tokenized as it takes to tell.
        index: the record's position, for the error message.
        max_query_length: the most question tokens a window takes (a longer question is cut).

    Returns:
        The number of windows (at least 1).

    Raises:
        RecordError: the (cut) question leaves no more than ``doc_stride`` tokens for the context, the question or the
            context has no tokens, or the context needs more than ``max_windows`` windows.
        ValueError: the windows leave no room for a question.
    """
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    most = longest_question(tokenizer, max_seq_length, doc_stride)
    if most < 1:
        raise ValueError(f"windows of {max_seq_length} tokens overlapping by {doc_stride} leave no room for a question")
    question_tokens = _count_tokens(tokenizer, cut_question(tokenizer, question, max_query_length), most)
    if question_tokens > most:
        raise RecordError(index, "question", f"is too long: more than {most} tokens (windows of "
                                             f"{max_seq_length} tokens overlapping by {doc_stride}; "
                                             f"max_query_length {max_query_length})")
    if question_tokens == 0:
        raise RecordError(index, "question", "has no tokens the model reads")
    room = max_seq_length - specials - question_tokens  # context tokens per window, > doc_stride
    step = room - doc_stride
    cap = None if max_windows is None else room + (max_windows - 1) * step
    context_tokens = _count_tokens(tokenizer, context, cap)
    if cap is not None and context_tokens > cap:
        raise RecordError(index, "context", f"is too long: more than {max_windows} windows of {max_seq_length} "
                                            f"tokens (over {cap} context tokens with this question)")
    if context_tokens == 0:
        raise RecordError(index, "context", "has no tokens the model reads")
    return 1 + max(0, math.ceil((context_tokens - room) / step))


def check_records(tokenizer: Any, questions: Sequence[Any], contexts: Sequence[Any], max_seq_length: int = 384,
                  doc_stride: int = 128, max_windows: int | None = None, max_query_length: int = 64) -> list[int]:
    """Check every record before any model work; see :func:`count_windows`.

    Returns:
        The windows of each record.

    Raises:
        RecordError: the first bad record: a question or context that is not a string, is empty, has no tokens or is
            too long.
        ValueError: the two lists differ in length, or are strings.
    """
    if isinstance(questions, str) or isinstance(contexts, str):
        raise ValueError("questions and contexts must be lists of strings (use answer() for a single question)")
    if len(questions) != len(contexts):
        raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
    if max_windows is not None and (not isinstance(max_windows, int) or isinstance(max_windows, bool)
                                    or max_windows <= 0):
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}")
    for i, (question, context) in enumerate(zip(questions, contexts)):
        _check_text("question", question, i)
        _check_text("context", context, i)
    return [count_windows(tokenizer, question, context, max_seq_length, doc_stride, max_windows, index=i,
                          max_query_length=max_query_length)
            for i, (question, context) in enumerate(zip(questions, contexts))]


def torch_runner(model: nn.Module, device: str | torch.device | None = None) -> WindowRunner:
    """A :data:`WindowRunner` over a PyTorch QA model, under ``torch.inference_mode``.

    The model is called with ``input_ids``/``attention_mask``/``token_type_ids`` and must return ``.start_logits``
    and ``.end_logits``; it is neither moved nor switched to eval mode (the caller does that). The runner returns
    them as float32 tensors where the model computed them: on a GPU, reading them on the host waits for the batch.

    Args:
        device: where the batches go; default: the device of the model's first parameter.
    """
    check_available(device)  # one line for a device this machine lacks, not a pinned-memory error mid-way
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)

    def run(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            output = model(**{key: to_device(value, device) for key, value in batch.items()})
        return output.start_logits.float(), output.end_logits.float()

    return run


def run_windows(run: WindowRunner, features: EvalFeatures, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits ``(F, max_seq_length)`` of all windows, at most ``batch_size`` windows per call of
    ``run``.

    Windows are sorted by length and batched with windows of nearly their length, each batch cut to its longest
    window, so that padding costs little (on a CPU a padded batch can take longer than its windows one by one).
    The logits come back in the windows' order, with the cut-off padding positions at a large negative logit.
    Logits a runner returns as tensors wait on their device and are copied to the host together (see
    :class:`~pruning.squad.HostLogits`), so the host prepares and queues the next batch while a GPU runs this one.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    count, width = features.input_ids.shape
    logits = HostLogits(count, width)
    lengths = features.attention_mask.sum(dim=1).numpy()
    for rows in length_sorted_batches(lengths, batch_size):
        used = max(int(lengths[rows].max()), 1)
        batch = {key: value[:, :used] for key, value in features.model_inputs(torch.from_numpy(rows)).items()}
        start_logits, end_logits = run(batch)
        if not (isinstance(start_logits, torch.Tensor) and isinstance(end_logits, torch.Tensor)):
            start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
        if tuple(start_logits.shape) != (len(rows), used) or tuple(end_logits.shape) != (len(rows), used):
            raise ValueError(f"the window runner returned logits of shape {tuple(start_logits.shape)} / "
                             f"{tuple(end_logits.shape)} for a batch of shape {(len(rows), used)}")
        logits.add(rows, start_logits, end_logits)
    return logits.arrays()


def answer_records(run: WindowRunner, tokenizer: Any, questions: Sequence[Any], contexts: Sequence[Any],
                   max_seq_length: int = 384, doc_stride: int = 128, max_windows: int | None = None,
                   batch_size: int = 64, max_answer_length: int = 30, n_best: int = 20,
                   max_query_length: int = 64, null_answers: bool = False,
                   null_threshold: float = 0.0) -> list[Answer]:
    """Answer each question from its context, with the windows of all records run together.

    Args:
        run: what computes the logits of a batch of windows (see :data:`WindowRunner`, :func:`torch_runner`).
        tokenizer: the model's fast tokenizer.
        questions, contexts: one context per question.
        max_seq_length, doc_stride: the windows a long context is split into.
        max_windows: the most windows one context may need; None: no limit.
        batch_size: windows per call of ``run``.
        max_answer_length, n_best: the span search (see :func:`pruning.squad.postprocess_predictions`).
        max_query_length: a question is cut to this many tokens (see :func:`pruning.squad.cut_question`).
        null_answers: answer "no answer" (the empty text, ``start == end == 0``) where it scores higher than every
            span: a model trained on unanswerable questions (see :func:`pruning.checkpoint.read_null_answers`).
        null_threshold: with ``null_answers``, how much higher "no answer" must score (see
            :func:`pruning.squad.postprocess_predictions`).

    Returns:
        One :class:`Answer` per question, in order, with ``context[answer.start:answer.end] == answer.text``.

    Raises:
        RecordError: a record is invalid (see :func:`check_records`); nothing has been run.
        ValueError: the two lists differ in length.
    """
    check_records(tokenizer, questions, contexts, max_seq_length, doc_stride, max_windows, max_query_length)
    examples = [Example(id=str(i), title="", context=context, question=question)
                for i, (question, context) in enumerate(zip(questions, contexts))]
    features = prepare_eval_features(examples, tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride,
                                     max_query_length=max_query_length)
    start_logits, end_logits = run_windows(run, features, batch_size=batch_size)
    spans = postprocess_predictions(examples, features, start_logits, end_logits, n_best=n_best,
                                    max_answer_length=max_answer_length, null_answers=null_answers,
                                    null_threshold=null_threshold)
    return [spans[ex.id] for ex in examples]


def answer_batch(model: nn.Module, tokenizer: Any, questions: Sequence[str], contexts: Sequence[str],
                 max_seq_length: int = 384, doc_stride: int = 128, max_answer_length: int = 30, n_best: int = 20,
                 batch_size: int = 64, device: str | torch.device | None = None,
                 max_windows: int | None = None, max_query_length: int = 64,
                 null_answers: bool = False, null_threshold: float = 0.0) -> list[Answer]:
    """Answer each question from its context with a PyTorch model; see :func:`answer_records`.

    Args:
        model: a QA model called with ``input_ids``/``attention_mask``/``token_type_ids`` that returns
            ``.start_logits`` and ``.end_logits``; it runs in eval mode and its training flag is restored after.
        max_seq_length, doc_stride: the windows, cut to the model's position embeddings where they are longer
            (:func:`pruning.squad.model_windows`), as ``fineprune ask`` and the served model cut them.
        device: where to run; default: the model's device.
        others: as for :func:`answer_records`.

    Raises:
        RecordError: a question or context is empty, not a string or too long.
        ValueError: the two lists differ in length, or the tokenizer makes ids the model cannot embed.
    """
    check_tokenizer_ids(model, tokenizer)
    max_seq_length, doc_stride = model_windows(model, max_seq_length, doc_stride)
    with eval_mode(model):
        return answer_records(torch_runner(model, device), tokenizer, questions, contexts,
                              max_seq_length=max_seq_length, doc_stride=doc_stride, max_windows=max_windows,
                              batch_size=batch_size, max_answer_length=max_answer_length, n_best=n_best,
                              max_query_length=max_query_length, null_answers=null_answers,
                              null_threshold=null_threshold)


def answer(model: nn.Module, tokenizer: Any, question: str, context: str, max_seq_length: int = 384,
           doc_stride: int = 128, max_answer_length: int = 30, n_best: int = 20,
           device: str | torch.device | None = None, max_windows: int | None = None,
           max_query_length: int = 64, null_answers: bool = False, null_threshold: float = 0.0) -> Answer:
    """Answer one question from its context; see :func:`answer_batch`.

    Returns:
        The best span: its text, score (start logit + end logit) and character offsets ``[start, end)`` in
        ``context``.

    Raises:
        RecordError: the question or context is empty, not a string or too long (the message names the field).
    """
    try:
        return answer_batch(model, tokenizer, [question], [context], max_seq_length=max_seq_length,
                            doc_stride=doc_stride, max_answer_length=max_answer_length, n_best=n_best, device=device,
                            max_windows=max_windows, max_query_length=max_query_length,
                            null_answers=null_answers, null_threshold=null_threshold)[0]
    except RecordError as err:  # one record: no index to name
        raise RecordError(None, err.field, err.problem) from None
