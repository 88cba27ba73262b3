"""The product's metric and span decoding against a small independent reference written here from the SQuAD v1.1
definition, on hand-worked cases and on shipped dev questions with constructed predictions and logits."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest

from pruning import squad
from pruning.resources import squad_file
from pruning.squad import Example

# --- the reference ------------------------------------------------------------------------------------------------

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def ref_tokens(text: str) -> list[str]:
    """Lower case, ASCII punctuation out, the words a/an/the out, split on whitespace."""
    words = text.lower().translate(_DROP_PUNCTUATION).split()
    return [w for w in words if w not in ("a", "an", "the")]


def ref_em(prediction: str, gold: str) -> float:
    return 1.0 if ref_tokens(prediction) == ref_tokens(gold) else 0.0


def ref_f1(prediction: str, gold: str) -> float:
    pred, true = ref_tokens(prediction), ref_tokens(gold)
    remaining = list(true)
    shared = 0
    for token in pred:
        if token in remaining:
            remaining.remove(token)
            shared += 1
    if not shared:
        return 0.0
    precision, recall = shared / len(pred), shared / len(true)
    return 2 * precision * recall / (precision + recall)


def ref_evaluate(examples: list[Example], predictions: dict[str, str]) -> dict[str, float]:
    em = f1 = 0.0
    for ex in examples:
        if ex.id in predictions:
            em += max(ref_em(predictions[ex.id], gold) for gold in ex.answers)
            f1 += max(ref_f1(predictions[ex.id], gold) for gold in ex.answers)
    return {"exact_match": 100 * em / len(examples), "f1": 100 * f1 / len(examples)}


def ref_best_span(example: Example, features: squad.EvalFeatures, start: np.ndarray, end: np.ndarray,
                  max_answer_length: int) -> tuple[float, str]:
    """Every (start, end) pair of context tokens of every window of the question: the best score and its text."""
    best = (-np.inf, "")
    for f in np.flatnonzero(features.example_index == 0):
        context = [t for t, (a, _) in enumerate(features.offsets[f]) if a >= 0]
        for i in context:
            for j in context:
                if i <= j < i + max_answer_length:
                    score = float(start[f, i]) + float(end[f, j])
                    if score > best[0]:
                        best = (score, example.context[features.offsets[f, i, 0]:features.offsets[f, j, 1]])
    return best


# --- the metric ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, gold, em, f1", [
    ("The Eiffel Tower", "eiffel tower", 1, 1),
    ("an apple, a pear", "apple pear", 1, 1),
    ("Denver Broncos", "the Denver Broncos.", 1, 1),
    ("Denver", "Denver Broncos", 0, 2 / 3),                 # P 1, R 1/2
    ("the the the", "the", 1, 0),                          # both normalise to nothing: equal, but no token shared
    ("", "Paris", 0, 0),
    ("Paris Paris", "Paris", 0, 2 / 3),                    # P 1/2, R 1
    ("a b c", "c b a", 0, 1),                              # a bag of tokens: order does not count
    ("theater", "the theater", 1, 1),                      # articles are whole words only
    ("U.S.", "US", 1, 1),                                  # punctuation removed, not split on
    ("1,000", "1000", 1, 1),
    ("10–15", "10-15", 0, 0),                              # an en dash is not ASCII punctuation
    ("Café", "cafe", 0, 0),                                # accents stay
    ("  New\tYork \n", "new york", 1, 1),
])
def test_metric_by_hand(prediction, gold, em, f1):
    assert squad.exact_match_score(prediction, gold) == ref_em(prediction, gold) == em
    assert squad.f1_score(prediction, gold) == pytest.approx(ref_f1(prediction, gold)) and ref_f1(
        prediction, gold) == pytest.approx(f1)


def _constructed_predictions(examples: list[Example], seed: int) -> dict[str, str]:
    """Gold answers, gold answers restyled (case, articles, punctuation, spaces), cut, padded and wrong spans,
    empty answers, missing questions and an unknown id."""
    rng = random.Random(seed)
    predictions: dict[str, str] = {}
    for ex in examples:
        gold = rng.choice(ex.answers)
        begin = ex.context.find(gold)
        kind = rng.randrange(8)
        if kind == 0:
            continue  # no prediction: scores 0
        if kind == 1:
            predictions[ex.id] = gold
        elif kind == 2:
            predictions[ex.id] = f"  The {gold.upper()}!! "
        elif kind == 3:
            predictions[ex.id] = gold[: max(1, len(gold) // 2)]
        elif kind == 4:
            predictions[ex.id] = ex.context[max(0, begin - 15):begin + len(gold) + 15]
        elif kind == 5:
            predictions[ex.id] = ""
        elif kind == 6:
            first = rng.randrange(len(ex.context))
            predictions[ex.id] = ex.context[first:first + rng.randrange(1, 80)]
        else:
            predictions[ex.id] = " ".join(reversed(gold.split()))
    predictions["not-a-question-of-the-set"] = "anything"
    return predictions


@pytest.fixture(scope="module")
def dev_questions() -> list[Example]:
    return squad.load_squad(squad_file("dev"), limit=600)


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_matches_the_reference_on_dev_questions(dev_questions, seed):
    predictions = _constructed_predictions(dev_questions, seed)
    expected = ref_evaluate(dev_questions, predictions)
    assert 5 < expected["exact_match"] < expected["f1"] < 95  # the constructed answers span the range
    got = squad.evaluate(dev_questions, predictions)
    assert got == pytest.approx(expected, abs=1e-9)


def test_gold_answers_of_the_dev_set_as_predictions():
    """Every question's last gold answer as its prediction, one question left out: EM 100 on the others. F1 falls
    short where that gold answer normalises to nothing (three dev questions have a gold answer '.'): F1 counts
    shared tokens, and there are none."""
    examples = squad.load_squad(squad_file("dev"))
    predictions = {ex.id: ex.answers[-1] for ex in examples[1:]}
    expected = ref_evaluate(examples, predictions)
    assert expected["exact_match"] == pytest.approx(100 * (len(examples) - 1) / len(examples))
    assert expected["f1"] < expected["exact_match"]
    assert squad.evaluate(examples, predictions) == pytest.approx(expected, abs=1e-9)


# --- span decoding ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_seq_length, doc_stride", [(384, 128), (64, 16), (48, 20)])
def test_decoding_matches_an_exhaustive_search_over_all_windows(tokenizer, dev_questions, max_seq_length,
                                                                doc_stride):
    """Random logits over the windows of dev questions (long contexts in many windows): with every start and end
    tried, the product picks the reference's best span over all windows, with its text."""
    rng = np.random.default_rng(max_seq_length)
    for example in dev_questions[::60]:
        features = squad.prepare_eval_features([example], tokenizer, max_seq_length, doc_stride)
        start = rng.normal(size=features.offsets.shape[:2]).astype(np.float32)
        end = rng.normal(size=features.offsets.shape[:2]).astype(np.float32)
        for max_answer_length in (1, 5, 30):
            score, text = ref_best_span(example, features, start, end, max_answer_length)
            best = squad.postprocess_predictions([example], features, start, end, n_best=max_seq_length,
                                                 max_answer_length=max_answer_length)[example.id]
            assert best.score == pytest.approx(score, abs=1e-6)
            assert best.text == text == example.context[best.start:best.end]


def test_gold_spans_come_back_exactly_from_any_window(tokenizer, dev_questions):
    """Logits that mark a gold answer's first and last token in every window holding it (an answer in the overlap
    of two windows is marked in both): the decoded text is that gold answer, character for character."""
    aligned = 0
    for max_seq_length, doc_stride in ((384, 128), (96, 24)):
        features = squad.prepare_eval_features(dev_questions, tokenizer, max_seq_length, doc_stride)
        start = np.zeros(features.offsets.shape[:2], dtype=np.float32)
        end = np.zeros_like(start)
        for f, e in enumerate(features.example_index):
            ex = dev_questions[e]
            begin = ex.answer_starts[0]
            start[f, features.offsets[f, :, 0] == begin] = 10.0
            end[f, features.offsets[f, :, 1] == begin + len(ex.answers[0])] = 10.0
        answers = squad.postprocess_predictions(dev_questions, features, start, end, max_answer_length=64)
        for f, e in enumerate(features.example_index):
            ex = dev_questions[e]
            if start[f].max() > 0 and end[f].max() > 0:  # the whole answer, on token boundaries, in this window
                assert answers[ex.id].text == ex.answers[0], ex.id
                aligned += 1
    assert aligned > len(dev_questions)  # nearly every answer, several in two windows


def test_leading_and_repeated_whitespace_and_unicode_map_back_exactly(tokenizer):
    context = "\n\t  Naïve  café\u00a0owners in  Zürich — 北京 sold 😀 mugs  for ½ price.  "
    example = Example(id="u", title="", context=context, question="  Who sold mugs?")
    features = squad.prepare_eval_features([example], tokenizer, 384, 128)
    tokens = np.flatnonzero(features.context_mask[0])
    words = [context[a:b] for a, b in features.offsets[0, tokens]]
    assert words[:4] == ["Naïve", "café", "owners", "in"] and "北" in words and "😀" in words
    for i, first in enumerate(tokens):
        for last in tokens[i:i + 6]:
            start = np.zeros((1, features.offsets.shape[1]), dtype=np.float32)
            end = np.zeros_like(start)
            start[0, first] = end[0, last] = 10.0
            best = squad.postprocess_predictions([example], features, start, end)["u"]
            lo, hi = features.offsets[0, first, 0], features.offsets[0, last, 1]
            assert best.text == context[lo:hi] == context[best.start:best.end]
            assert best.text == best.text.strip() and best.text
