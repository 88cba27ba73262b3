"""The official SQuAD metric: exact match and F1 of answer texts, by the v1.1 evaluation script's rules, and by the
v2.0 script's where questions are unanswerable (``"is_impossible": true``, whose right answer is the empty text).

Pure functions of texts: :func:`normalize_answer`, :func:`exact_match_score`, :func:`f1_score` (and
:func:`f1_score_v2`), :func:`evaluate` over a dataset, :func:`best_null_thresholds` for a model answering "no
answer", and :func:`score_files` for the files the official scripts read.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .squad_data import Answer, Example, SquadFormatError, load_predictions, load_squad, short_repr

__all__ = ["normalize_answer", "exact_match_score", "f1_score", "f1_score_v2", "metric_max_over_ground_truths",
           "evaluate", "best_null_thresholds", "evaluate_answers", "question_f1", "score_files"]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# The official v1.1 metric
# --------------------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, and collapse whitespace (in that order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when both texts normalise to the same string, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 of the normalised texts: ``2PR / (P + R)`` over the multiset of shared tokens (0 when none)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score_v2(prediction: str, ground_truth: str) -> float:
    """The official SQuAD v2.0 token F1: as :func:`f1_score`, except that when either text normalises to no token
    (no answer, or one such as "the"), it is 1.0 if both do and 0.0 otherwise."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    return f1_score(prediction, ground_truth)


def metric_max_over_ground_truths(metric_fn: Callable[[str, str], float], prediction: str,
                                  ground_truths: Sequence[str]) -> float:
    """The best ``metric_fn(prediction, gold)`` over the gold answers."""
    if not ground_truths:
        raise ValueError("no gold answers to score against")
    return max(metric_fn(prediction, gold) for gold in ground_truths)


def _gold_answers(examples_or_dataset: Any) -> Iterator[tuple[str, list[str], bool]]:
    """(id, gold texts, unanswerable) from a list of :class:`Example`, a raw ``data`` list of articles, or a whole
    SQuAD dict."""
    source = examples_or_dataset
    if isinstance(source, Mapping):
        if "data" not in source:
            raise ValueError("a dataset mapping must have a 'data' list (the parsed SQuAD JSON)")
        source = source["data"]
    for item in source:
        if isinstance(item, Example):
            yield item.id, list(item.answers), item.impossible
        elif isinstance(item, Mapping) and "paragraphs" in item:
            for paragraph in item["paragraphs"]:
                for qa in paragraph["qas"]:
                    yield qa["id"], [answer["text"] for answer in qa["answers"]], qa.get("is_impossible") is True
        else:
            raise ValueError(f"expected Example objects or SQuAD articles, got {type(item).__name__}")


def _question_scores(golds: Sequence[tuple[str, list[str], bool]], predictions: Mapping[str, str]
                     ) -> list[tuple[float, float] | None]:
    """(EM, F1) of each question's prediction (None where it has none), by the v1.1 rules, or by the v2.0 ones
    where any question is unanswerable: gold texts that normalise to nothing are left out, an unanswerable
    question's one gold answer is the empty text, and F1 is :func:`f1_score_v2`."""
    v2 = any(impossible for _, _, impossible in golds)
    f1_fn = f1_score_v2 if v2 else f1_score
    scores: list[tuple[float, float] | None] = []
    for qid, texts, _ in golds:
        if qid not in predictions:
            scores.append(None)
            continue
        if v2:
            texts = [text for text in texts if normalize_answer(text)] or [""]
        prediction = predictions[qid]
        if not isinstance(prediction, str):  # an Answer of predict_spans, say: its text is scored
            raise TypeError(f"predictions[{qid!r}] must be the answer's text, got {type(prediction).__name__} "
                            "(predict() gives texts; of predict_spans()' answers, give each one's .text)")
        scores.append((metric_max_over_ground_truths(exact_match_score, prediction, texts),
                       metric_max_over_ground_truths(f1_fn, prediction, texts)))
    return scores


def evaluate(examples_or_dataset: Any, predictions: Mapping[str, str], by_answerable: bool = False
             ) -> dict[str, float]:
    """The official SQuAD exact match and F1, in percent, averaged over every question of the dataset: v1.1's, or
    v2.0's where any question is unanswerable (see :func:`_question_scores`; on answerable questions alone the two
    differ only for a gold text that normalises to nothing).

    A question without a prediction scores 0 (one warning gives their number); predictions for unknown ids are
    ignored.

    Args:
        examples_or_dataset: a list of :class:`Example`, the ``data`` list of a SQuAD JSON file, or the whole file.
        predictions: question id -> predicted answer text (the empty text: no answer).
        by_answerable: for a dataset with unanswerable questions, add the official v2.0 script's split: EM, F1 and
            the number of questions over the answerable ones (``has_answer_exact_match``, ``has_answer_f1``,
            ``has_answer_questions``) and over the unanswerable ones (``no_answer_...``).

    Returns:
        ``{"exact_match": 100 * sum(EM) / n, "f1": 100 * sum(F1) / n}`` (and the split).
    """
    golds = list(_gold_answers(examples_or_dataset))
    if not golds:
        raise ValueError("the dataset has no questions to evaluate")
    scores = _question_scores(golds, predictions)
    unanswered = sum(score is None for score in scores)
    if unanswered:
        logger.warning("%d of %d questions have no prediction and score 0", unanswered, len(golds))

    def mean(rows: list[tuple[float, float] | None], which: int) -> float:
        return 100.0 * sum(row[which] for row in rows if row is not None) / len(rows) if rows else 0.0

    result = {"exact_match": mean(scores, 0), "f1": mean(scores, 1)}
    if by_answerable and any(impossible for _, _, impossible in golds):
        for name, impossible in (("has_answer", False), ("no_answer", True)):
            rows = [score for score, (_, _, flag) in zip(scores, golds) if flag is impossible]
            result.update({f"{name}_exact_match": mean(rows, 0), f"{name}_f1": mean(rows, 1),
                           f"{name}_questions": len(rows)})
    return result


def best_null_thresholds(examples_or_dataset: Any, answers: Mapping[str, Answer]) -> dict[str, float]:
    """The exact match and F1 (percent) the answers would score with the best "no answer" threshold, and that
    threshold: SQuAD v2.0's ``best_exact`` / ``best_f1`` of the official script, whose no-answer probabilities are
    here each answer's :attr:`Answer.null_margin`.

    With threshold ``t`` a question is answered "no answer" where its margin exceeds ``t``, and with its best span
    elsewhere. The score changes only at the margins, so every interval between two neighbouring margins is tried;
    of those scoring best, the one holding 0 (the threshold the model was trained to, so no change is asked for) or
    else the nearest to it is taken, and its middle reported (one logit beyond the outermost margin for the
    intervals below the lowest and above the highest).

    Args:
        examples_or_dataset: the questions (as for :func:`evaluate`).
        answers: question id -> answer, made with ``null_answers`` (:func:`pruning.squad.postprocess_predictions`);
            a question without one scores 0 at every threshold.

    Returns:
        ``best_exact_match``, ``best_exact_match_threshold``, ``best_f1``, ``best_f1_threshold``.

    Raises:
        ValueError: no questions, or an answer without a margin (made without ``null_answers``).
    """
    golds = list(_gold_answers(examples_or_dataset))
    if not golds:
        raise ValueError("the dataset has no questions to evaluate")
    answered = [qid for qid, _, _ in golds if qid in answers]
    if any(answers[qid].null_margin is None for qid in answered):
        raise ValueError("the answers give no \"no answer\" margin: predict them with null_answers")
    spans = {qid: answers[qid].span.text if answers[qid].span is not None else answers[qid].text
             for qid in answered}
    with_span = _question_scores(golds, spans)
    with_null = _question_scores(golds, dict.fromkeys(answered, ""))
    rows = [(answers[qid].null_margin, span, null) for (qid, _, _), span, null in zip(golds, with_span, with_null)
            if span is not None]
    order = sorted(rows, key=lambda row: row[0])
    sorted_margins = np.array([margin for margin, _, _ in order], dtype=np.float64)
    # The thresholds: one inside each interval [lows[i], highs[i]) the margins cut the line into, lowest first; at
    # a threshold there, the questions whose margin is at most lows[i] take their span, the others "no answer".
    margins = sorted({margin for margin, _, _ in rows if math.isfinite(margin)})
    lows = np.array([-math.inf, *margins])
    highs = np.array([*margins, math.inf])
    spans_taken = np.searchsorted(sorted_margins, lows, side="right")
    holds_zero = (lows <= 0) & (highs > 0)
    distance = np.where(holds_zero, 0.0, np.minimum(np.abs(lows), np.abs(highs)))  # of each interval from 0
    result: dict[str, float] = {}
    for which, name in ((0, "exact_match"), (1, "f1")):
        gain = np.concatenate([[0.0], np.cumsum([span[which] - null[which] for _, span, null in order])])
        totals = sum(null[which] for _, _, null in order) + gain[spans_taken]
        best = float(totals.max())
        candidates = np.flatnonzero(totals >= best - 1e-9)
        i = int(candidates[np.argmin(distance[candidates])])
        low, high = float(lows[i]), float(highs[i])
        if holds_zero[i]:
            threshold = 0.0
        elif not math.isfinite(low):
            threshold = high - 1.0
        elif not math.isfinite(high):
            threshold = low + 1.0
        else:
            threshold = (low + high) / 2
        result[f"best_{name}"] = 100.0 * best / len(golds)
        result[f"best_{name}_threshold"] = threshold
    return result


def evaluate_answers(examples_or_dataset: Any, answers: Mapping[str, Answer], null_answers: bool = False
                     ) -> tuple[dict[str, float], dict[str, str]]:
    """What a model's answers score: :func:`evaluate` of their texts with the answerable / unanswerable split, and
    for a model answering "no answer" (``null_answers``, answers made so) on questions that hold unanswerable ones,
    what the best threshold would score (:func:`best_null_thresholds`).

    Returns:
        (the metrics, question id -> answer text: the predictions in the official format).
    """
    predictions = {qid: answer.text for qid, answer in answers.items()}
    metrics = evaluate(examples_or_dataset, predictions, by_answerable=True)
    if null_answers and metrics.get("no_answer_questions"):
        metrics.update(best_null_thresholds(examples_or_dataset, answers))
    return metrics, predictions


def question_f1(examples: Sequence[Example], predictions: Mapping[str, str]) -> list[float]:
    """The official F1 (percent) of each question's prediction, in the order of ``examples``; a question without a
    prediction scores 0. Their mean is :func:`evaluate`'s ``f1``; two models' lists pair question by question."""
    scores = _question_scores([(ex.id, list(ex.answers), ex.impossible) for ex in examples], predictions)
    return [0.0 if score is None else 100.0 * score[1] for score in scores]


def score_files(data_path: str | Path, predictions_path: str | Path) -> dict[str, float]:
    """Score an official-format predictions file against a SQuAD v1.1 or v2.0 data file (both validated; the
    answers' ``answer_start`` values are not read, as the official evaluation scripts do not read them); for a file
    with unanswerable questions, with the answerable / unanswerable split of :func:`evaluate`.

    Predictions may cover only some of the questions (those left out score 0, as in :func:`evaluate`); predictions
    for questions the data file does not hold are ignored, with one warning giving their number.

    Raises:
        SquadFormatError: either file is malformed, or no prediction is for a question of the data file (the
            predictions of another dataset, or an empty object), which would score 0 for every question.
    """
    examples = load_squad(data_path, spans=False)
    predictions = load_predictions(predictions_path)
    questions = {ex.id for ex in examples}
    unknown = [qid for qid in predictions if qid not in questions]
    if not predictions:
        raise SquadFormatError(f"{predictions_path}: no predictions (an empty object): every question of {data_path} "
                               "would score 0")
    if len(unknown) == len(predictions):
        raise SquadFormatError(f"{predictions_path}: none of its {len(predictions)} question ids (first: "
                               f"{short_repr(unknown[0])}) is in {data_path} (first there: "
                               f"{short_repr(examples[0].id)}); predictions for another dataset?")
    if unknown:
        logger.warning("%s: %d of %d predictions are for questions not in %s (first: %s); they are ignored",
                       predictions_path, len(unknown), len(predictions), data_path, short_repr(unknown[0]))
    return evaluate(examples, predictions, by_answerable=True)
