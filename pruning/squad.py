"""SQuAD v1.1 and v2.0 for a question-answering model: contexts cut into windows, the answer spans read back from a
model's logits, and models run over a dataset; with the records and files (:mod:`pruning.squad_data`) and the
official metric (:mod:`pruning.squad_metric`) it builds on, so that ``squad`` names the whole task.

Everything here is a module-level function with explicit arguments, so that training, evaluation, inference and the
tests share one implementation:

* :func:`load_squad` / :func:`load_predictions` read the official JSON formats and fail with a one-line
  :class:`SquadFormatError` naming the file and the question;
* :func:`normalize_answer`, :func:`exact_match_score`, :func:`f1_score` and :func:`evaluate` reproduce the official
  v1.1 evaluation (EM/F1 in percent over every question of the dataset), and the v2.0 one where questions are
  unanswerable (SQuAD v2.0's ``"is_impossible": true``, whose right answer is no answer, the empty text);
* :func:`prepare_train_features` / :func:`prepare_eval_features` split each context into overlapping windows with a
  fast tokenizer;
* :func:`postprocess_predictions` turns per-token start/end logits back into answer spans of the original context
  (or, for a model that learned to answer "no answer", the empty text where that scores higher);
* :func:`predict` and :func:`evaluate_model` run any question-answering model over a list of examples.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .precision import check_available
from .tokenizer import check_tokenizer_ids
# The records, files and metric, named here too: ``squad.load_squad``, ``squad.evaluate``, ...
from .squad_data import (Answer, Example, SquadFormatError, load_predictions, load_squad, lone_surrogate, short_repr,
                         show_id)
from .squad_metric import (best_null_thresholds, evaluate, evaluate_answers, exact_match_score, f1_score, f1_score_v2,
                           metric_max_over_ground_truths, normalize_answer, question_f1, score_files)

__all__ = [
    "SquadFormatError",
    "QuestionError",
    "QuestionTooLong",
    "WindowsTooShort",
    "QuestionWithoutTokens",
    "questions_of",
    "windows_cut",
    "NonFiniteLogits",
    "Example",
    "Answer",
    "EvalFeatures",
    "HostLogits",
    "fit_windows",
    "model_windows",
    "text_prefix",
    "whole_word_tokens",
    "longest_question",
    "tokenize_text",
    "lone_surrogate",
    "short_repr",
    "show_id",
    "cut_question",
    "check_windows",
    "batch_width",
    "to_device",
    "window_batch",
    "TRAIN_WINDOW_DTYPES",
    "compact_windows",
    "load_squad",
    "load_predictions",
    "normalize_answer",
    "exact_match_score",
    "f1_score",
    "f1_score_v2",
    "metric_max_over_ground_truths",
    "evaluate",
    "best_null_thresholds",
    "evaluate_answers",
    "question_f1",
    "score_files",
    "prepare_train_features",
    "prepare_eval_features",
    "postprocess_predictions",
    "compute_logits",
    "length_sorted_batches",
    "predict_spans",
    "predict",
    "evaluate_model",
]

logger = logging.getLogger(__name__)

# Examples per tokenizer call: large enough for the fast tokenizer's batching, small enough to bound memory.
_TOKENIZE_CHUNK = 1000
# Characters of a long question tokenized first, per token kept (English averages under 5 characters a token); the
# prefix doubles until it holds more tokens than are kept, or the whole question.
_CHARS_PER_TOKEN = 8
# Where every tokenizer splits words: Python's other whitespace (\x1c-\x1f, \x0b, \x0c, \x85) are control characters
# that BERT's normalizer deletes, joining the words beside them.
_SPACES = re.compile(r"[ \t\n\r]")


class QuestionError(SquadFormatError):
    """A question its windows cannot take; the message names the question (and, through :func:`questions_of`, the
    file it is in)."""


class QuestionTooLong(QuestionError):
    """A question, cut to ``max_query_length`` tokens, leaves its windows no more than ``doc_stride`` context
    tokens."""


class WindowsTooShort(SquadFormatError):
    """``max_seq_length`` and ``doc_stride`` leave no room for a question in a window."""


class QuestionWithoutTokens(QuestionError):
    """A question or its context is made only of characters the tokenizer drops (zero-width spaces, control
    characters): its windows would hold none of it, and the question would be scored on nothing."""


@contextlib.contextmanager
def windows_cut(given: int, seq: int) -> Iterator[None]:
    """Within the block, a question too long for windows that a model's position embeddings cut from ``given`` to
    ``seq`` tokens (:func:`fit_windows`) says so: its message names the windows as cut, and raising max_seq_length,
    which it advises, cannot lengthen them."""
    try:
        yield
    except (QuestionTooLong, WindowsTooShort) as err:
        if seq >= given:
            raise
        raise type(err)(f"{err}; these windows are max_seq_length {given} cut to the model's {seq} position "
                        "embeddings, which no max_seq_length lengthens") from None


@contextlib.contextmanager
def questions_of(path: str | Path) -> Iterator[None]:
    """Name ``path``, the data file the questions come from, in a :class:`QuestionError` raised within: the windows
    know a question's id, not its file, which a run reading two files (training and evaluation) must say."""
    try:
        yield
    except QuestionError as err:
        raise type(err)(f"{path}: {err}") from None


class NonFiniteLogits(ValueError):
    """A model gave NaN or infinite start/end logits on context tokens, where no span can be ranked."""


# --------------------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------------------

@dataclass
class EvalFeatures:
    """Tokenized evaluation windows and what is needed to map token spans back to their contexts.

    Attributes:
        input_ids, attention_mask, token_type_ids: ``(F, max_seq_length)`` int64 tensors, one row per window.
        example_index: ``(F,)`` index into the examples list of each window's question.
        example_ids: the question id of each window.
        offsets: ``(F, max_seq_length, 2)`` int32 character span ``[start, end)`` of each token in its context, and
            ``-1`` for the question, special and padding tokens (stored as one array: a list of tuples for every
            token of every window would take several hundred MB on the full dev set).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    example_index: np.ndarray
    example_ids: list[str]
    offsets: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def context_mask(self) -> np.ndarray:
        """``(F, max_seq_length)`` bool: True for the tokens of the context."""
        return self.offsets[..., 0] >= 0

    def token_offsets(self, feature: int) -> list[tuple[int, int] | None]:
        """Offsets of one window as a list: ``(start, end)`` for context tokens, None for the others."""
        return [(int(s), int(e)) if s >= 0 else None for s, e in self.offsets[feature]]

    def model_inputs(self, rows: slice | np.ndarray | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The tensors a BERT-style model takes, optionally for a subset of windows."""
        rows = slice(None) if rows is None else rows
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows],
                "token_type_ids": self.token_type_ids[rows]}


def _check_window(tokenizer: Any, max_seq_length: int, doc_stride: int) -> None:
    for name, value in (("max_seq_length", max_seq_length), ("doc_stride", doc_stride)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if doc_stride >= max_seq_length:
        raise ValueError(f"doc_stride ({doc_stride}) must be smaller than max_seq_length ({max_seq_length})")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets need one")
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError("the tokenizer must pad on the right (question first, context second)")


def text_prefix(text: str, size: int) -> tuple[str, bool]:
    """A prefix of ``text`` of about ``size`` characters, and whether it ends where a tokenizer splits words (at
    whitespace, or the text's end), so that its tokens are the text's first ones.

    It is cut back to the last space, tab or line break before ``size`` where that lies in the second half, else on
    to the next one where that comes within ``2 * size``. A text with none near (Chinese or Japanese, words joined by
    punctuation) is cut at ``size``, inside a word (False): only its tokens of the words before that one are the
    text's (:func:`whole_word_tokens`). Where the tokenizer splits such a text into words (BERT's WordPiece: at each
    punctuation mark and Chinese character) only a bounded prefix is tokenized; a byte-level BPE or SentencePiece
    tokenizer takes a run of letters without spaces as one word, which is then tokenized whole.
    """
    if size >= len(text):
        return text, True
    back = max(text.rfind(char, 0, size) for char in (" ", "\n", "\t", "\r"))
    if back >= size // 2:
        return text[:back], True
    after = _SPACES.search(text, size, 2 * size)
    if after is not None:
        return text[:after.start()], True
    return text[:size], False


def whole_word_tokens(encoding: Any) -> int:
    """Tokens of a prefix cut inside a word (:func:`text_prefix`) that are the text's own: those before the cut word,
    whose tokens the cut may change. ``encoding``: the prefix tokenized by a fast tokenizer, without special tokens."""
    words = encoding.word_ids()
    return sum(1 for word in words if word != words[-1]) if words else 0


def tokenize_text(tokenizer: Any, *texts: Any, **kwargs: Any) -> Any:
    """``tokenizer(*texts, **kwargs)`` reading questions and contexts as plain text.

    A text holding the literal text of a special token ("[SEP]", "[CLS]", "[PAD]", or "<s>", "</s>", "<pad>" for a
    byte-level BPE) is split into that text's ordinary tokens instead of becoming the special token, so the model
    sees the words it was given and no answer is made of a marker. Training, evaluation, ``ask`` and serving all
    tokenize through here, so they agree.

    Called without ``max_length`` or ``truncation``, it reads a whole text to count or cut its tokens, never to feed
    it to the model as it is (windows are made with ``max_length``): transformers' warning that a text longer than
    the model's positions "will result in indexing errors" is then false, and is not given.
    """
    if "max_length" not in kwargs and "truncation" not in kwargs:
        kwargs.setdefault("verbose", False)
    return tokenizer(*texts, split_special_tokens=True, **kwargs)


def cut_question(tokenizer: Any, question: str, max_query_length: int = 64) -> str:
    """``question`` without its leading whitespace, cut after its first ``max_query_length`` tokens (as the BERT
    SQuAD recipe truncates queries); unchanged when it has no more tokens. Only a prefix of a long question is
    tokenized."""
    if not isinstance(max_query_length, int) or isinstance(max_query_length, bool) or max_query_length <= 0:
        raise ValueError(f"max_query_length must be a positive integer, got {max_query_length!r}")
    text = question.lstrip()
    size = _CHARS_PER_TOKEN * (max_query_length + 1)
    while True:
        prefix, whole = text_prefix(text, size)
        encoding = tokenize_text(tokenizer, prefix, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        if (len(offsets) if whole else whole_word_tokens(encoding)) > max_query_length:
            break  # the first max_query_length tokens are the question's own
        if len(prefix) == len(text):
            return text
        size = 2 * max(size, len(prefix))
    # Cut after the last token kept. A tokenizer may split the cut text differently, so cut again until it fits
    # (at least one character each time, as several tokens may share one character).
    text = prefix
    while len(offsets) > max_query_length:
        text = text[:min(int(offsets[max_query_length - 1][1]), len(text) - 1)].rstrip()
        offsets = tokenize_text(tokenizer, text, add_special_tokens=False,
                                return_offsets_mapping=True)["offset_mapping"]
    return text


def _cut_questions(examples: Sequence[Example], tokenizer: Any, max_query_length: int) -> list[str]:
    """The questions of ``examples`` as the windows take them: leading whitespace removed, cut to
    ``max_query_length`` tokens (one warning gives how many were cut).

    Tokens never outnumber UTF-8 bytes, and a question's first characters tell whether it is short, so only the
    questions that may be long are tokenized, and only their beginnings, in one batch.
    """
    # Leading spaces of a question only waste window room (one SQuAD train question has thousands).
    questions = [ex.question.lstrip() for ex in examples]
    suspects = [i for i, q in enumerate(questions) if len(q.encode("utf-8")) > max_query_length]
    if not suspects:
        return questions
    size = _CHARS_PER_TOKEN * (max_query_length + 1)
    heads = tokenize_text(tokenizer, [questions[i][:size] for i in suspects], add_special_tokens=False)["input_ids"]
    cut = 0
    for i, head in zip(suspects, heads):
        if len(head) > max_query_length or len(questions[i]) > size:
            shorter = cut_question(tokenizer, questions[i], max_query_length)
            cut += shorter != questions[i]
            questions[i] = shorter
    if cut:
        logger.warning("%d of %d questions have more than max_query_length (%d) tokens: each is cut to its first %d",
                       cut, len(questions), max_query_length, max_query_length)
    return questions


def _check_question_lengths(examples: Sequence[Example], questions: list[str], tokenizer: Any, max_seq_length: int,
                            doc_stride: int, max_query_length: int) -> None:
    """Fail clearly on a question (cut to ``max_query_length`` tokens) too long to leave more than ``doc_stride``
    tokens of context in a window.

    The tokenizer itself panics in that case. Tokens never outnumber UTF-8 bytes, so only the few long questions
    are tokenized here.
    """
    room = longest_question(tokenizer, max_seq_length, doc_stride) + 1
    if room < 2:
        raise WindowsTooShort(f"max_seq_length {max_seq_length} and doc_stride {doc_stride} leave no room for a "
                              "question: raise max_seq_length or lower doc_stride")
    if max_query_length < room:  # every question has been cut short enough
        return
    suspects = [i for i, q in enumerate(questions) if len(q.encode("utf-8")) >= room]
    if not suspects:
        return
    lengths = tokenize_text(tokenizer, [questions[i] for i in suspects], add_special_tokens=False)["input_ids"]
    for i, ids in zip(suspects, lengths):
        if len(ids) >= room:
            raise QuestionTooLong(f"question {show_id(examples[i].id)} has {len(ids)} tokens: with max_seq_length "
                                   f"{max_seq_length} and doc_stride {doc_stride} a question may have at most "
                                   f"{room - 1} (lower max_query_length ({max_query_length}), raise max_seq_length "
                                   "or lower doc_stride)")


REPLACEMENT_CHARACTER = "\ufffd"  # what a decoder puts for bytes it could not read; BERT's normalizer drops it


def _readable(text: str) -> bool:
    """Whether ``text`` holds a letter, digit, punctuation mark or symbol other than U+FFFD, which every tokenizer
    keeps as a token (an unknown one at worst); it stops at the first, so it costs next to nothing on real text."""
    return any(unicodedata.category(char)[0] in "LNPS" and char != REPLACEMENT_CHARACTER for char in text)


def _check_tokens(examples: Sequence[Example], questions: list[str], tokenizer: Any) -> None:
    """Fail clearly on a question (as cut) or context with no token: made only of characters the tokenizer drops
    (zero-width spaces, control characters, lone combining accents for an uncased one), it would be windowed as
    nothing, trained on or scored without a word. Only the few texts without a readable character are tokenized."""
    for field, texts in (("question", questions), ("context", [ex.context for ex in examples])):
        suspects = [i for i, text in enumerate(texts) if not _readable(text)]
        if not suspects:
            continue
        ids = tokenize_text(tokenizer, [texts[i] for i in suspects], add_special_tokens=False)["input_ids"]
        for i, tokens in zip(suspects, ids):
            if not tokens:
                raise QuestionWithoutTokens(f"question {show_id(examples[i].id)}: its {field} {short_repr(texts[i])} "
                                            "has no tokens the model reads (only characters the tokenizer drops, such "
                                            "as zero-width spaces or control characters)")


def _tokenize(examples: Sequence[Example], tokenizer: Any, max_seq_length: int, doc_stride: int,
              max_query_length: int, progress: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield (index of the chunk's first example, encoding) for chunks of examples; windows of all questions.
    ``progress``: a tqdm bar of the questions done (the whole SQuAD training set takes minutes)."""
    _check_window(tokenizer, max_seq_length, doc_stride)
    if not isinstance(max_query_length, int) or isinstance(max_query_length, bool) or max_query_length <= 0:
        raise ValueError(f"max_query_length must be a positive integer, got {max_query_length!r}")
    questions = _cut_questions(examples, tokenizer, max_query_length)
    _check_tokens(examples, questions, tokenizer)
    _check_question_lengths(examples, questions, tokenizer, max_seq_length, doc_stride, max_query_length)
    types = _pair_types(tokenizer)
    with tqdm(total=len(examples), desc="tokenize", unit="question", disable=not progress,
              dynamic_ncols=True) as bar:
        for first in range(0, len(examples), _TOKENIZE_CHUNK):
            chunk = slice(first, first + _TOKENIZE_CHUNK)
            # token_type_ids asked for: a tokenizer whose model_input_names leave them out still has them for BERT.
            encoding = tokenize_text(tokenizer, questions[chunk], [ex.context for ex in examples[chunk]],
                                     truncation="only_second", max_length=max_seq_length, stride=doc_stride,
                                     return_overflowing_tokens=True, return_offsets_mapping=True,
                                     return_token_type_ids=True, padding="max_length", return_tensors="np")
            if types != (0, 1) and (types != (0, 0) or encoding["token_type_ids"].any()):  # RoBERTa's: all 0
                _retype_windows(encoding, types)
            yield first, encoding
            bar.update(len(questions[chunk]))


def _pair_types(tokenizer: Any) -> tuple[int, int]:
    """The token types the tokenizer's pair template gives a question and a context: (0, 1) for BERT's, (0, 0) for
    a template of one token type (``[CLS] $A [SEP] $B [SEP]``) or for RoBERTa."""
    encoding = tokenize_text(tokenizer, "q", "c", return_token_type_ids=True)
    pieces, types = encoding.sequence_ids(), encoding["token_type_ids"]
    return types[pieces.index(0)], types[pieces.index(1)]


def _retype_windows(encoding: Any, types: tuple[int, int]) -> None:
    """Give the question and context tokens of every window the token types of the pair template (``types``).

    The tokenizers library gives them only to a context's first window: its later (overflowing) windows keep type 0
    for the question and 1 for the context whatever the template says (huggingface/tokenizers#1908), which a model
    of one token type cannot embed.
    """
    token_types = encoding["token_type_ids"]
    for i in range(token_types.shape[0]):
        pieces = np.array([-1 if p is None else p for p in encoding.sequence_ids(i)])
        for piece, kind in enumerate(types):
            token_types[i, pieces == piece] = kind


def _context_offsets(encoding: Any) -> np.ndarray:
    """Offsets ``(F, L, 2)`` of one encoding with every non-context token set to -1."""
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int32).copy()
    for i in range(offsets.shape[0]):
        is_context = np.array([s == 1 for s in encoding.sequence_ids(i)], dtype=bool)
        offsets[i, ~is_context] = -1
    return offsets


def _concat(parts: list[np.ndarray], width: int, dtype: np.dtype | type = np.int64) -> torch.Tensor:
    if not parts:
        return torch.from_numpy(np.zeros((0, width), dtype=dtype))
    return torch.from_numpy(np.concatenate(parts, dtype=dtype, casting="unsafe"))


# The training windows as they are kept, in memory and in the feature cache: token and segment ids in 32 bits, the
# attention mask (0 or 1) in 8. SQuAD's 88,524 training windows of 384 tokens take 306 MB so, not int64's 816 MB in
# every trial's process; a batch is widened to int64 as it is taken (:func:`window_batch`).
TRAIN_WINDOW_DTYPES = {"input_ids": torch.int32, "attention_mask": torch.uint8, "token_type_ids": torch.int32}


_KEPT_NUMPY = {key: torch.empty(0, dtype=dtype).numpy().dtype for key, dtype in TRAIN_WINDOW_DTYPES.items()}


def compact_windows(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``features`` with its windows in :data:`TRAIN_WINDOW_DTYPES` (windows tokenized, or cached, as int64)."""
    out = dict(features)
    for key, dtype in TRAIN_WINDOW_DTYPES.items():
        value = out.get(key)
        if value is None or value.dtype == dtype:
            continue
        bounds = torch.iinfo(dtype)
        if value.numel() and not bounds.min <= int(value.min()) <= int(value.max()) <= bounds.max:
            raise ValueError(f"{key}: values from {int(value.min())} to {int(value.max())} do not fit {dtype}")
        out[key] = value.to(dtype)
    return out


def _token_span(offsets: np.ndarray, start_char: int, end_char: int) -> tuple[int, int] | None:
    """Characters ``[start, end)`` from the first to the last context token that overlaps ``[start_char,
    end_char)``, in the windows ``offsets`` ``(W, L, 2)`` of one context; None when no token does.

    A tokenizer's normalizer drops some characters from its tokens (a combining accent an uncased tokenizer strips,
    a zero-width space, a soft hyphen): an answer that begins or ends with one at the context's edge is still held by
    the window that holds its tokens.
    """
    tokens = offsets.reshape(-1, 2)
    hit = tokens[(tokens[:, 0] >= 0) & (tokens[:, 1] > start_char) & (tokens[:, 0] < end_char)]
    if hit.size == 0:
        return None
    return int(hit[:, 0].min()), int(hit[:, 1].max())


def _answer_tokens(offsets: np.ndarray, start_char: int, end_char: int) -> tuple[int, int]:
    """Token indices of the first and last token of ``[start_char, end_char)`` in one window, or (0, 0) (CLS)."""
    context = np.flatnonzero(offsets[:, 0] >= 0)
    if context.size == 0:
        return 0, 0
    if offsets[context[0], 0] > start_char or offsets[context[-1], 1] < end_char:
        return 0, 0  # the window does not hold the whole answer
    # First token ending after the answer's start; last token starting before its end.
    start = context[np.argmax(offsets[context, 1] > start_char)]
    end = context[np.flatnonzero(offsets[context, 0] < end_char)[-1]]
    return int(start), int(end)


def _trimmed_span(text: str, start: int) -> tuple[int, int]:
    """Characters ``[start, end)`` of an answer without its leading and trailing whitespace, which no token covers:
    a window that holds the words of an answer selected with a space around it holds the answer."""
    stripped = text.strip()
    if not stripped:
        return start, start + len(text)
    begin = start + text.index(stripped)
    return begin, begin + len(stripped)


def batch_width(attention_mask: torch.Tensor) -> int:
    """Tokens a batch of windows needs: its longest window's (windows are padded at the end to the same width, and
    a padded position changes no real token's output, so the columns after this one can be cut)."""
    return int(attention_mask.sum(dim=1).max())


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor``, a host tensor, on ``device``, as a DataLoader with ``pin_memory`` hands a batch to a GPU.

    To a CUDA device the values go through page-locked (pinned) host memory and the host does not wait for the
    copy: it is queued behind the GPU's work while the host goes on preparing the step (a copy from ordinary memory
    holds the host until the GPU has taken it). Anywhere else (the CPU, ``meta``) it is ``tensor.to(device)``, the
    same tensor on the CPU.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor)  # contiguous too: a strided host view would be staged through ordinary memory again
    return pinned.to(device, non_blocking=True)


def window_batch(features: dict[str, torch.Tensor], index: torch.Tensor,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The windows ``index`` of ``features`` as one batch on ``device`` (by :func:`to_device`: through pinned
    memory to a GPU), every per-token tensor cut to :func:`batch_width` (per-window tensors, such as answer
    positions, are kept whole) and widened to int64 there (windows are kept narrower: :data:`TRAIN_WINDOW_DTYPES`)."""
    batch = {k: v[index] for k, v in features.items()}
    width = batch_width(batch["attention_mask"])
    return {k: to_device(v[:, :width] if v.ndim == 2 else v, device).long() for k, v in batch.items()}


def prepare_train_features(examples: Sequence[Example], tokenizer: Any, max_seq_length: int = 384,
                           doc_stride: int = 128, max_query_length: int = 64,
                           progress: bool = False) -> dict[str, torch.Tensor]:
    """Training windows with the token positions of each question's first gold answer.

    A context longer than one window is split into windows overlapping by ``doc_stride`` tokens. A window that
    does not contain the whole answer gets start = end = 0 (the CLS token), as does every window of an unanswerable
    question: the score of that position is how a model says "no answer" (see :func:`postprocess_predictions`).

    Args:
        examples: questions with at least one gold answer each, or unanswerable (``impossible``).
        tokenizer: a fast tokenizer that pads on the right.
        max_seq_length: tokens per window (question + context + special tokens).
        doc_stride: overlap, in tokens, of consecutive windows of one context.
        max_query_length: a question with more tokens is cut to its first ``max_query_length`` (one warning gives
            how many were); a question that, cut, still leaves no more than ``doc_stride`` context tokens in a
            window raises :class:`SquadFormatError`.
        progress: show a tqdm bar of the questions tokenized (the whole SQuAD training set takes minutes).

    Returns:
        Tensors ``input_ids``, ``attention_mask``, ``token_type_ids`` of shape ``(F, max_seq_length)`` in
        :data:`TRAIN_WINDOW_DTYPES` and int64 ``start_positions``, ``end_positions`` of shape ``(F,)``.

    Raises:
        QuestionWithoutTokens: a question or context has no token, or a first gold answer is made only of characters
            the tokenizer drops (``"\\u200b"``, a control character): no token covers it, so every window would
            label it as no answer. Its other answers are not trained on and are not checked (the metric, as the
            official evaluation script, reads them as texts).
    """
    for ex in examples:
        if not ex.answers and not ex.impossible:
            raise ValueError(f"question {show_id(ex.id)} has no gold answer to train on")
    parts: dict[str, list[np.ndarray]] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
    starts: list[int] = []
    ends: list[int] = []
    held: dict[int, bool] = {}  # answerable question -> whether a window holds its answer whole
    for first, encoding in _tokenize(examples, tokenizer, max_seq_length, doc_stride, max_query_length,
                                     progress):
        for key, chunks in parts.items():  # narrowed chunk by chunk: never all the windows in int64 at once
            chunks.append(np.asarray(encoding[key]).astype(_KEPT_NUMPY[key]))
        offsets = _context_offsets(encoding)
        mapping = np.asarray(encoding["overflow_to_sample_mapping"])
        spans: dict[int, tuple[int, int] | None] = {}
        for i, sample in enumerate(mapping.tolist()):
            if sample not in spans:  # the answer's characters as its tokens cover them, over all its windows
                ex = examples[first + sample]
                # An unanswerable question has no span: every window is labelled at CLS.
                spans[sample] = None if ex.impossible else _token_span(
                    offsets[mapping == sample], *_trimmed_span(ex.answers[0], ex.answer_starts[0]))
                if spans[sample] is None and not ex.impossible:  # every window would label it "no answer" (CLS)
                    raise QuestionWithoutTokens(f"question {show_id(ex.id)}: its answer {short_repr(ex.answers[0])} "
                                                "has no tokens the model reads (only characters the tokenizer drops, "
                                                "such as zero-width spaces or control characters)")
            start, end = (0, 0) if spans[sample] is None else _answer_tokens(offsets[i], *spans[sample])
            starts.append(start)
            ends.append(end)
            if spans[sample] is not None:
                held[first + sample] = held.get(first + sample, False) or end > 0
    _say_unheld([examples[index] for index, whole in held.items() if not whole], len(held), max_seq_length)
    features = {key: _concat(chunks, max_seq_length, _KEPT_NUMPY[key]) for key, chunks in parts.items()}
    features["start_positions"] = torch.tensor(starts, dtype=torch.long)
    features["end_positions"] = torch.tensor(ends, dtype=torch.long)
    return features


def _say_unheld(unheld: Sequence[Example], answerable: int, max_seq_length: int) -> None:
    """One warning for the answerable training questions whose first answer no window holds whole (longer than a
    window's context part): every window of each is labelled "no answer", which trains a model to give none."""
    if not unheld:
        return
    longest = max(unheld, key=lambda ex: len(ex.answers[0]))
    logger.warning("%d of %d answerable training questions have an answer that no window of %d tokens holds whole "
                   "(e.g. question %s, an answer of %d characters): each is trained as \"no answer\" in every window "
                   "(longer windows, max_seq_length, hold them)", len(unheld), answerable, max_seq_length,
                   show_id(longest.id), len(longest.answers[0]))


def prepare_eval_features(examples: Sequence[Example], tokenizer: Any, max_seq_length: int = 384,
                          doc_stride: int = 128, max_query_length: int = 64, progress: bool = False) -> EvalFeatures:
    """Evaluation windows of every question, with the map from windows and tokens back to the contexts.

    Args: as for :func:`prepare_train_features` (gold answers are not needed).

    Returns:
        The windows in example order (all windows of example 0 first).

    Raises:
        ValueError: two examples share an id (their predictions are keyed by it: one would answer both).
    """
    if isinstance(examples, (str, bytes, Path, Example)) or not isinstance(examples, Sequence):
        raise TypeError(f"examples must be a list of Example (pruning.squad.load_squad(path) reads them), got "
                        f"{type(examples).__name__}")
    first_at: dict[str, int] = {}
    for i, example in enumerate(examples):
        if not isinstance(example, Example):
            raise TypeError(f"examples[{i}] must be an Example, got {type(example).__name__}")
        if first_at.setdefault(example.id, i) != i:
            raise ValueError(f"question id {example.id!r} is given twice (examples {first_at[example.id]} and {i}); "
                             "predictions are keyed by id, so each question needs its own")
    parts: dict[str, list[np.ndarray]] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
    example_index: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    for first, encoding in _tokenize(examples, tokenizer, max_seq_length, doc_stride, max_query_length,
                                     progress):
        for key, chunks in parts.items():
            chunks.append(encoding[key])
        example_index.append(np.asarray(encoding["overflow_to_sample_mapping"], dtype=np.int64) + first)
        offsets.append(_context_offsets(encoding))
    index = np.concatenate(example_index) if example_index else np.zeros(0, dtype=np.int64)
    return EvalFeatures(
        input_ids=_concat(parts["input_ids"], max_seq_length),
        attention_mask=_concat(parts["attention_mask"], max_seq_length),
        token_type_ids=_concat(parts["token_type_ids"], max_seq_length),
        example_index=index,
        example_ids=[examples[i].id for i in index],
        offsets=np.concatenate(offsets) if offsets else np.zeros((0, max_seq_length, 2), dtype=np.int32),
    )


# --------------------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------------------

def _best_in_window(start_logits: np.ndarray, end_logits: np.ndarray, is_context: np.ndarray, n_best: int | None,
                    max_answer_length: int) -> tuple[float, int, int] | None:
    """Best (score, start token, end token) of one window among the ``n_best`` starts x ``n_best`` ends.

    ``n_best=None`` searches every pair of context tokens.
    """
    candidates = np.flatnonzero(is_context)
    if candidates.size == 0:
        return None
    if n_best is None:
        start_idx = end_idx = candidates
    else:
        # Stable sort: equal logits resolve to the earlier token, run after run.
        start_idx = candidates[np.argsort(-start_logits[candidates], kind="stable")[:n_best]]
        end_idx = candidates[np.argsort(-end_logits[candidates], kind="stable")[:n_best]]
    length = end_idx[None, :] - start_idx[:, None] + 1
    valid = (length >= 1) & (length <= max_answer_length)
    if not valid.any():
        return None
    scores = start_logits[start_idx][:, None].astype(np.float64) + end_logits[end_idx][None, :]
    scores = np.where(valid, scores, -np.inf)
    s, e = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return float(scores[s, e]), int(start_idx[s]), int(end_idx[e])


def fit_windows(max_seq_length: int, doc_stride: int, max_positions: int) -> tuple[int, int]:
    """The windows a model can take: ``(max_seq_length, doc_stride)`` cut to its position embeddings.

    A window is at most ``max_positions`` tokens long. Windows that fit the model, with a stride (the overlap of
    consecutive windows) shorter than a window, are kept as they are, so that a model is evaluated and served with
    the windows its run config names. Otherwise the stride is at most half the (cut) window, so that a window still
    leaves room for the question and moves on by some context. Training, evaluation, ``ask`` and the served model
    all use this rule.
    """
    seq, stride = int(max_seq_length), int(doc_stride)
    if seq <= int(max_positions) and stride < seq:
        return seq, stride
    seq = min(seq, int(max_positions))
    return seq, min(stride, seq // 2)


def model_windows(model: Any, max_seq_length: int, doc_stride: int) -> tuple[int, int]:
    """``(max_seq_length, doc_stride)`` fitted to ``model`` (:func:`fit_windows`) where its ``config`` gives its
    position embeddings; as given otherwise. Already fitted windows are kept as they are. A model of a type the
    project does not prune (a stock ALBERT or DistilBERT, answering as transformers builds it) takes its
    ``max_position_embeddings``."""
    from .structure import max_positions

    config = getattr(model, "config", None)
    if getattr(config, "max_position_embeddings", None) is None:
        return int(max_seq_length), int(doc_stride)
    try:
        limit = max_positions(config)
    except ValueError:  # a model_type outside the pruned families: its positions start at 0
        limit = int(config.max_position_embeddings)
    return fit_windows(max_seq_length, doc_stride, limit)


def longest_question(tokenizer: Any, max_seq_length: int, doc_stride: int) -> int:
    """The most question tokens a window of ``max_seq_length`` tokens overlapping the next by ``doc_stride`` takes
    (it must keep more than ``doc_stride`` tokens for the context); below 1 when the windows have no room for a
    question at all."""
    return max_seq_length - tokenizer.num_special_tokens_to_add(pair=True) - doc_stride - 1


def check_windows(examples: Sequence[Example], tokenizer: Any, max_positions: int) -> dict[str, torch.Tensor]:
    """Model inputs of the windows of ``examples`` (384 tokens, stride 128, fitted to the model): the real
    windows that packing and export compare a model's logits on.

    Their questions are cut to 64 tokens (the run config's ``max_query_length``), or to what the fitted windows
    take when that is fewer: the windows are fixed (``fineprune pack`` and ``export`` have no flags for them), so a
    question longer than they take is cut as any long question is, not refused with advice no flag can follow."""
    seq, stride = fit_windows(384, 128, max_positions)
    query = min(64, longest_question(tokenizer, seq, stride))
    return prepare_eval_features(examples, tokenizer, max_seq_length=seq, doc_stride=stride,
                                 max_query_length=max(1, query)).model_inputs()


def postprocess_predictions(examples: Sequence[Example], features: EvalFeatures, all_start_logits: Any,
                            all_end_logits: Any, n_best: int = 20, max_answer_length: int = 30,
                            null_answers: bool = False, null_threshold: float = 0.0) -> dict[str, Answer]:
    """Pick each question's answer span from the start/end logits of its windows.

    In every window the ``n_best`` highest start and end logits over the context tokens are paired; a pair is valid
    when ``start <= end`` and it spans at most ``max_answer_length`` tokens, and it scores
    ``start_logit + end_logit``. The best valid pair over all windows of a question wins, and its text is cut from
    the original context by character offsets. When no top-``n_best`` pair is valid, every pair of context tokens is
    searched instead, so a question with any context gets a non-empty answer.

    With ``null_answers`` (a model trained on unanswerable questions, SQuAD v2.0), a question's "no answer" scores
    the lowest ``start_logit + end_logit`` of the CLS token (its windows' first) over its windows, as training
    labels a window without the answer there, and it wins over the best span when it scores more than
    ``null_threshold`` above it (by default, when it scores higher): the answer is then the empty text, with that
    score. Each answer gives that margin (:attr:`Answer.null_margin`), from which :func:`best_null_thresholds` finds
    the threshold that would have scored best.

    Args:
        examples: the questions, in the order :func:`prepare_eval_features` saw them.
        features: the windows of those questions.
        all_start_logits, all_end_logits: ``(F, max_seq_length)`` arrays (numpy or torch).
        n_best: start and end candidates per window.
        max_answer_length: longest answer, in tokens.
        null_answers: answer "no answer" where it scores higher than every span.
        null_threshold: with ``null_answers``, how much higher (in logits, start plus end; negative: "no answer"
            wins even where the best span scores up to that much higher).

    Returns:
        question id -> :class:`Answer` (an empty text with score ``-inf`` only for a question without context tokens;
        with ``null_answers``, an empty text with the score of "no answer" where that wins).

    Raises:
        NonFiniteLogits: a start or end logit of a context token is NaN or infinite (a model whose weights hold NaN
            or inf); the one-line message gives how many windows and the first question.
    """
    if n_best <= 0 or max_answer_length <= 0:
        raise ValueError(f"n_best and max_answer_length must be positive, got {n_best} and {max_answer_length}")
    if not math.isfinite(null_threshold):
        raise ValueError(f"null_threshold must be a finite number, got {null_threshold}")
    start_logits = _as_numpy(all_start_logits)
    end_logits = _as_numpy(all_end_logits)
    expected = features.offsets.shape[:2]
    if start_logits.shape != expected or end_logits.shape != expected:
        raise ValueError(f"logits of shape {start_logits.shape} / {end_logits.shape} do not match the features "
                         f"{expected}")
    windows: list[list[int]] = [[] for _ in examples]
    for feature, example in enumerate(features.example_index):
        windows[int(example)].append(feature)
    is_context = features.context_mask
    broken = ~(np.isfinite(start_logits) & np.isfinite(end_logits)) & is_context
    if broken.any():
        windows_hit = np.flatnonzero(broken.any(axis=1))
        first = show_id(features.example_ids[windows_hit[0]])
        raise NonFiniteLogits(f"the model gave NaN or infinite start/end logits in {len(windows_hit)} of "
                              f"{len(features)} windows (first: question {first}): "
                              "its weights hold NaN or inf, or its precision overflows")

    results: dict[str, Answer] = {}
    for example, ex in enumerate(examples):
        best: tuple[float, int, int, int] | None = None
        for search in (n_best, None):
            for f in windows[example]:
                found = _best_in_window(start_logits[f], end_logits[f], is_context[f], search, max_answer_length)
                if found is not None and (best is None or found[0] > best[0]):
                    best = (found[0], f, found[1], found[2])
            if best is not None:
                break
        span = None
        if best is not None:
            score, f, s, e = best
            start_char, end_char = _without_spaces(ex.context, int(features.offsets[f, s, 0]),
                                                   _with_marks(ex.context, int(features.offsets[f, e, 1])))
            span = Answer(text=ex.context[start_char:end_char], score=score, start=start_char, end=end_char)
        if null_answers and windows[example]:
            null = float(min(float(start_logits[f, 0]) + float(end_logits[f, 0]) for f in windows[example]))
            margin = math.inf if span is None else null - span.score
            if margin > null_threshold:
                results[ex.id] = Answer(text="", score=null, start=0, end=0, null_margin=margin, span=span)
                continue
            span = replace(span, null_margin=margin)
        results[ex.id] = span if span is not None else Answer(text="", score=float("-inf"), start=0, end=0)
    return results


def _without_spaces(context: str, start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` without the whitespace at its ends, unless it holds nothing else.

    A tokenizer whose offsets hold the space before a word (a SentencePiece ``Metaspace`` "▁Köln", a byte-level BPE
    with ``trim_offsets`` false) would begin an answer with that space.
    """
    text = context[start:end]
    if not text.strip():
        return start, end
    return start + len(text) - len(text.lstrip()), end - (len(text) - len(text.rstrip()))


def _with_marks(context: str, end: int) -> int:
    """``end`` moved past the combining marks that follow it.

    A tokenizer that strips accents drops a decomposed accent (a base letter followed by a combining mark, as in
    NFD text) from its tokens' offsets, so a span ending on an accented letter would lose the accent.
    """
    while end < len(context) and unicodedata.category(context[end]) == "Mn":
        end += 1
    return end


def _as_numpy(logits: Any) -> np.ndarray:
    if isinstance(logits, torch.Tensor):
        return logits.detach().float().cpu().numpy()
    return np.asarray(logits, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# Running a model
# --------------------------------------------------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


# How many bytes of logits a pass keeps on its device before copying them to the host together: a copy to the host
# waits until the device has run everything queued before it, so one a batch would leave a GPU idle while the host
# prepares the next batch.
_LOGITS_KEPT_ON_DEVICE = 256 * 2**20
PAD_LOGIT = -1e4  # the logit of the padding positions a batch was cut off at (never part of an answer)


class HostLogits:
    """Start and end logits of ``count`` windows of ``width`` tokens, gathered batch by batch into host arrays.

    A batch's logits cover its windows up to the width it was cut to; the positions after it read
    :data:`PAD_LOGIT`. Logits given as tensors wait on their device and are copied to the host together, when
    :data:`_LOGITS_KEPT_ON_DEVICE` bytes are waiting and at the end, so the host queues the next batch while a GPU
    runs this one; numpy arrays are written at once.
    """

    def __init__(self, count: int, width: int) -> None:
        self.width = width
        self.starts = np.full((count, width), PAD_LOGIT, dtype=np.float32)
        self.ends = np.full((count, width), PAD_LOGIT, dtype=np.float32)
        self._waiting: list[tuple[np.ndarray, torch.Tensor]] = []  # (windows, their (2, B, width) logits)
        self._kept = 0  # bytes waiting

    def add(self, rows: np.ndarray, start: Any, end: Any) -> None:
        """The logits ``(len(rows), used)`` of the windows ``rows``."""
        if not (isinstance(start, torch.Tensor) and isinstance(end, torch.Tensor)):
            used = np.shape(start)[1]
            self.starts[rows, :used], self.ends[rows, :used] = start, end
            return
        logits = torch.stack((start.float(), end.float()))
        if self._waiting and self._waiting[-1][1].device != logits.device:
            self._copy()
        if self.width > logits.shape[2]:
            logits = nn.functional.pad(logits, (0, self.width - logits.shape[2]), value=PAD_LOGIT)
        self._waiting.append((rows, logits))
        self._kept += logits.numel() * logits.element_size()
        if self._kept >= _LOGITS_KEPT_ON_DEVICE:
            self._copy()

    def _copy(self) -> None:
        if self._waiting:
            values = torch.cat([logits for _, logits in self._waiting], dim=1).cpu().numpy()
            order = np.concatenate([rows for rows, _ in self._waiting])
            self.starts[order], self.ends[order] = values[0], values[1]
            self._waiting.clear()
        self._kept = 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The start and end logits of every window, once all have come to the host."""
        self._copy()
        return self.starts, self.ends


# Every window of a batch is at least this fraction of the batch's longest: padding is at most 1/5 of its tokens.
_MIN_FILL = 0.8


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Window indices by batch: longest first (a batch too large for the device fails at once), at most
    ``batch_size`` a batch, each window of a batch at least ``_MIN_FILL`` as long as the batch's first (longest)
    one. Cut to its longest window, a batch then computes few padding positions."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, first = [], 0
    while first < len(order):
        longest = lengths[order[first]]
        end = min(first + batch_size, len(order))
        # lengths[order] is non-increasing: the batch ends at the first window shorter than the fill allows.
        end = first + 1 + int(np.sum(lengths[order[first + 1:end]] >= _MIN_FILL * longest))
        batches.append(order[first:end])
        first = end
    return batches


def compute_logits(model: nn.Module, features: EvalFeatures, batch_size: int = 64,
                   device: str | torch.device | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits ``(F, max_seq_length)`` (float32 numpy) of a QA model over all windows.

    The model runs in eval mode under ``torch.inference_mode`` (its training flag is restored afterwards); it is
    called with ``input_ids``, ``attention_mask`` and ``token_type_ids`` and must return an object with
    ``start_logits`` and ``end_logits``.

    The windows run in batches of similar length (:func:`length_sorted_batches`), each cut to its longest window:
    in the order of the file, a batch of 64 SQuAD dev windows is padded to 1.65 times its tokens. The logits stay
    on the device, and come back to the host together (see :class:`HostLogits`), so the host queues the next batch
    while a GPU runs this one.

    Args:
        device: where to run the batches; default: the device of the model's first parameter. The model is not moved.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_available(device)  # one line for a device this machine lacks, not a pinned-memory error mid-way
    device = torch.device(device) if device is not None else _model_device(model)
    logits = HostLogits(len(features), features.input_ids.shape[1])
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = length_sorted_batches(features.attention_mask.sum(dim=1).numpy(), batch_size)
            for rows in tqdm(batches, desc="predict", disable=not progress, dynamic_ncols=True):
                batch = features.model_inputs(torch.from_numpy(rows))
                # Dynamic padding: run only up to the longest window of the batch, pad the logits back after.
                used = batch_width(batch["attention_mask"])
                output = model(**{key: to_device(value[:, :used], device) for key, value in batch.items()})
                logits.add(rows, output.start_logits, output.end_logits)
            return logits.arrays()
    finally:
        model.train(was_training)


def _check_features(examples: Sequence[Example], features: EvalFeatures, max_seq_length: int) -> None:
    """Refuse windows that are not those of ``examples`` (a window of another question, a question without one) or
    not ``max_seq_length`` tokens wide."""
    if features.input_ids.shape[1] != max_seq_length:
        raise ValueError(f"the windows given are {features.input_ids.shape[1]} tokens wide, not max_seq_length "
                         f"{max_seq_length}")
    index = features.example_index
    covered = np.unique(index)
    if (len(covered) != len(examples) or (len(covered) and (covered[0] < 0 or covered[-1] >= len(examples)))
            or features.example_ids != [examples[int(i)].id for i in index]):
        raise ValueError(f"the windows given are not those of these {len(examples)} questions")


def predict_spans(model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_seq_length: int = 384,
                  doc_stride: int = 128, batch_size: int = 64, max_answer_length: int = 30, n_best: int = 20,
                  device: str | torch.device | None = None, progress: bool = True,
                  max_query_length: int = 64, features: EvalFeatures | None = None,
                  null_answers: bool = False, null_threshold: float = 0.0) -> dict[str, Answer]:
    """Answer spans (text, score, character offsets) of a QA model for every question; see :func:`predict`."""
    if features is None:
        check_tokenizer_ids(model, tokenizer)
        max_seq_length, doc_stride = model_windows(model, max_seq_length, doc_stride)
        features = prepare_eval_features(examples, tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride,
                                         max_query_length=max_query_length, progress=progress)
    else:
        _check_features(examples, features, max_seq_length)
    start_logits, end_logits = compute_logits(model, features, batch_size=batch_size, device=device,
                                              progress=progress)
    return postprocess_predictions(examples, features, start_logits, end_logits, n_best=n_best,
                                   max_answer_length=max_answer_length, null_answers=null_answers,
                                   null_threshold=null_threshold)


def predict(model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_seq_length: int = 384,
            doc_stride: int = 128, batch_size: int = 64, max_answer_length: int = 30, n_best: int = 20,
            device: str | torch.device | None = None, progress: bool = True,
            max_query_length: int = 64, features: EvalFeatures | None = None,
            null_answers: bool = False, null_threshold: float = 0.0) -> dict[str, str]:
    """Predicted answer text of a QA model for every question (official predictions format).

    Args:
        model: any module called as ``model(input_ids=, attention_mask=, token_type_ids=)`` that returns
            ``.start_logits`` and ``.end_logits`` (dense, masked or packed BERT).
        tokenizer: the model's fast tokenizer.
        examples: the questions.
        max_seq_length, doc_stride: the windows (see :func:`prepare_eval_features`), cut to the model's position
            embeddings where they are longer (:func:`model_windows`), as ``fineprune eval`` cuts them.
        batch_size: windows per forward pass.
        max_answer_length, n_best: the span search (see :func:`postprocess_predictions`).
        device: where to run; default: the model's device.
        progress: show a tqdm bar.
        max_query_length: questions are cut to this many tokens (see :func:`prepare_train_features`).
        features: the windows of ``examples``, as :func:`prepare_eval_features` built them with these window
            settings, so that a caller scoring the same questions again (a run evaluating every few steps) tokenizes
            them once; None builds them here.
        null_answers: answer "no answer" (the empty text) where it scores higher than every span (a model trained
            on unanswerable questions; see :func:`postprocess_predictions`).
        null_threshold: with ``null_answers``, how much higher "no answer" must score.

    Returns:
        question id -> answer text.

    Raises:
        ValueError: ``features`` are not the windows of ``examples``, or not ``max_seq_length`` tokens wide.
    """
    spans = predict_spans(model, tokenizer, examples, max_seq_length=max_seq_length, doc_stride=doc_stride,
                          batch_size=batch_size, max_answer_length=max_answer_length, n_best=n_best, device=device,
                          progress=progress, max_query_length=max_query_length, features=features,
                          null_answers=null_answers, null_threshold=null_threshold)
    return {qid: span.text for qid, span in spans.items()}


def evaluate_model(model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_seq_length: int = 384,
                   doc_stride: int = 128, batch_size: int = 64, max_answer_length: int = 30, n_best: int = 20,
                   device: str | torch.device | None = None, progress: bool = True,
                   max_query_length: int = 64, null_answers: bool = False) -> tuple[dict[str, float], dict[str, str]]:
    """Predict every question and score the predictions with the official metric.

    Args: as for :func:`predict`.

    Returns:
        (``{"exact_match", "f1"}`` in percent, question id -> predicted text).
    """
    predictions = predict(model, tokenizer, examples, max_seq_length=max_seq_length, doc_stride=doc_stride,
                          batch_size=batch_size, max_answer_length=max_answer_length, n_best=n_best, device=device,
                          progress=progress, max_query_length=max_query_length, null_answers=null_answers)
    return evaluate(examples, predictions), predictions
