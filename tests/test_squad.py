import codecs
import copy
import gzip
import json
import logging

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from pruning import squad
from pruning.resources import squad_file
from pruning.squad import Example, SquadFormatError


# --- the official metric, worked by hand ------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The Denver Broncos", "denver broncos"),
    ("an apple a day", "apple day"),
    ("Theatre at the Anthem", "theatre at anthem"),  # articles only as whole words
    ("  Super\tBowl \n 50 ", "super bowl 50"),
    ("U.S.A.!", "usa"),
    ("rock-'n'-roll", "rocknroll"),
    ("24–10", "24–10"),  # the en dash is not in string.punctuation
    ("A", ""),
])
def test_normalize_answer(text, expected):
    assert squad.normalize_answer(text) == expected


def test_exact_match_ignores_case_articles_punctuation_and_spacing():
    assert squad.exact_match_score("the  Denver Broncos.", "Denver Broncos") == 1.0
    assert squad.exact_match_score("Denver", "Denver Broncos") == 0.0
    assert squad.exact_match_score("", "Denver Broncos") == 0.0


def test_f1_by_hand():
    # prediction {denver, broncos, team}, gold {denver, broncos}: P = 2/3, R = 1, F1 = 2PR/(P+R) = 0.8
    assert squad.f1_score("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)
    # tokens are a multiset: {cat, cat, dog} & {cat, dog, dog} share one cat and one dog: P = R = 2/3
    assert squad.f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert squad.f1_score("Carolina Panthers", "Denver Broncos") == 0.0
    assert squad.f1_score("", "Denver Broncos") == 0.0
    # the official quirk: an answer that normalises to nothing matches exactly but has no tokens for F1
    assert squad.exact_match_score("", "The") == 1.0
    assert squad.f1_score("", "The") == 0.0


def test_best_over_several_gold_answers():
    golds = ["Denver Broncos", "the Broncos", "Broncos of Denver"]
    assert squad.metric_max_over_ground_truths(squad.exact_match_score, "Broncos", golds) == 1.0
    # "Denver" against each gold: 2/3 (P=1, R=1/2), 0, 1/2 (P=1, R=1/3)
    assert squad.metric_max_over_ground_truths(squad.f1_score, "Denver", golds) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        squad.metric_max_over_ground_truths(squad.f1_score, "Denver", [])


def _example(qid, answers, context="Denver Broncos beat the Carolina Panthers in Super Bowl 50."):
    starts = tuple(context.index(a) for a in answers)
    return Example(id=qid, title="t", context=context, question="Who?", answers=tuple(answers), answer_starts=starts)


def test_evaluate_counts_unanswered_questions_as_zero_and_warns(caplog):
    examples = [_example("q1", ["Denver Broncos"]), _example("q2", ["Carolina Panthers", "Panthers"]),
                _example("q3", ["Super Bowl 50"])]
    predictions = {"q1": "the Denver Broncos", "q2": "the Carolina Panthers in", "unknown": "ignored"}
    with caplog.at_level(logging.WARNING, logger="pruning.squad"):
        result = squad.evaluate(examples, predictions)
    # q1: EM 1, F1 1; q2: EM 0, F1 max(0.8, 0.5) = 0.8 ({carolina, panthers, in} vs {carolina, panthers}); q3: 0
    assert result["exact_match"] == pytest.approx(100 / 3, abs=1e-9)
    assert result["f1"] == pytest.approx(100 * 1.8 / 3, abs=1e-9)
    assert "1 of 3 questions have no prediction" in caplog.text


def test_question_f1_is_each_questions_f1_in_order():
    examples = [_example("q1", ["Denver Broncos"]), _example("q2", ["Carolina Panthers", "Panthers"]),
                _example("q3", ["Super Bowl 50"])]
    predictions = {"q2": "the Carolina Panthers in", "q1": "the Denver Broncos"}
    # q1: 100; q2: max(80, 50) as above; q3: no prediction, 0. Their mean is evaluate's F1.
    assert squad.question_f1(examples, predictions) == pytest.approx([100.0, 80.0, 0.0])
    mean = sum(squad.question_f1(examples, predictions)) / 3
    assert mean == pytest.approx(squad.evaluate(examples, predictions)["f1"])
    # Paired with another model's, question by question: "Denver" scores 2/3 against "Denver Broncos".
    assert squad.question_f1(examples, {"q1": "Denver", "q3": "Super Bowl 50"}) == pytest.approx([200 / 3, 0.0, 100.0])


def test_evaluate_accepts_the_raw_dataset():
    context = "Denver Broncos beat the Carolina Panthers."
    dataset = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "a", "question": "Who won?", "answers": [{"text": "Denver Broncos", "answer_start": 0}]},
        {"id": "b", "question": "Who lost?", "answers": [{"text": "Carolina Panthers", "answer_start": 24}]}]}]}]}
    predictions = {"a": "Denver", "b": "Carolina Panthers"}
    expected = {"exact_match": 50.0, "f1": 100 * (2 / 3 + 1) / 2}
    assert squad.evaluate(dataset, predictions) == pytest.approx(expected, abs=1e-9)
    assert squad.evaluate(dataset["data"], predictions) == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError):
        squad.evaluate([], predictions)


# --- loading the shipped data -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_dev():
    return squad.load_squad(squad_file("dev"))


def test_shipped_dev_set(full_dev):
    assert len(full_dev) == 10570
    first = full_dev[0]
    assert first.id == "56be4db0acb8001400a502ec"
    assert first.question == "Which NFL team represented the AFC at Super Bowl 50?"
    assert first.answers[0] == "Denver Broncos"
    assert first.context[first.answer_starts[0]:].startswith("Denver Broncos")
    assert len({ex.id for ex in full_dev}) == len(full_dev)


def test_gold_answers_score_100(full_dev, caplog):
    with caplog.at_level(logging.WARNING, logger="pruning.squad"):
        result = squad.evaluate(full_dev, {ex.id: ex.answers[0] for ex in full_dev})
    assert result == {"exact_match": 100.0, "f1": 100.0}
    assert "no prediction" not in caplog.text


def test_limit_keeps_the_first_questions(dev_subset):
    assert [ex.id for ex in squad.load_squad(squad_file("dev"), limit=5)] == [ex.id for ex in dev_subset[:5]]
    with pytest.raises(ValueError):
        squad.load_squad(squad_file("dev"), limit=0)


def test_a_limit_above_the_questions_of_the_file_is_said(tmp_path, caplog):
    """A question limit (train_limit, eval_limit, --eval-limit) larger than the file: every question is used, and
    one warning gives how many, so a run does not pass for one on the number asked."""
    path = tmp_path / "small.json"
    path.write_text(json.dumps(_valid_dataset()))
    with caplog.at_level(logging.WARNING, logger="pruning.squad"):
        assert len(squad.load_squad(path, limit=2)) == 2
        assert "fewer than" not in caplog.text
        assert [ex.id for ex in squad.load_squad(path, limit=500)] == ["q-first", "q-second"]
    assert f"{path}: holds 2 questions, fewer than the 500 asked for" in caplog.text


def test_score_files(tmp_path, dev_subset):
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": ex.context, "qas": [{"id": ex.id, "question": ex.question,
                                         "answers": [{"text": ex.answers[0], "answer_start": ex.answer_starts[0]}]}]}
        for ex in dev_subset[:4]]}]}
    (tmp_path / "data.json").write_text(json.dumps(data))
    predictions = {ex.id: ex.answers[0] for ex in dev_subset[:3]}
    predictions[dev_subset[1].id] = "nothing like it"
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    assert squad.load_predictions(tmp_path / "pred.json") == predictions
    assert squad.score_files(tmp_path / "data.json", tmp_path / "pred.json") == {"exact_match": 50.0, "f1": 50.0}


@pytest.mark.parametrize("predictions, problem", [
    ({"56be4db0acb8001400a502ec": "Denver Broncos"}, "none of its 1 question ids (first: '56be4db0acb8001400a502ec')"),
    ({}, "no predictions (an empty object)"),
], ids=["other-dataset", "empty"])
def test_predictions_for_no_question_of_the_data_are_an_error(tmp_path, predictions, problem):
    """Predictions that answer none of the file's questions would score 0 as if the model were wrong: a
    predictions file of another dataset is refused, naming both files."""
    (tmp_path / "data.json").write_text(json.dumps(_valid_dataset()))
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    with pytest.raises(SquadFormatError) as info:
        squad.score_files(tmp_path / "data.json", tmp_path / "pred.json")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'pred.json'}: ") and problem in message
    assert str(tmp_path / "data.json") in message and "\n" not in message


def test_predictions_for_unknown_questions_are_ignored_with_a_warning(tmp_path, caplog):
    (tmp_path / "data.json").write_text(json.dumps(_valid_dataset()))
    (tmp_path / "pred.json").write_text(json.dumps({"q-first": "Broncos", "q-other": "x", "q-third": "y"}))
    with caplog.at_level(logging.WARNING, logger="pruning.squad"):
        result = squad.score_files(tmp_path / "data.json", tmp_path / "pred.json")
    assert result == {"exact_match": 50.0, "f1": 50.0}
    assert "2 of 3 predictions are for questions not in" in caplog.text and "'q-other'" in caplog.text


def test_scoring_reads_no_answer_start(tmp_path, dev_subset):
    """The metric compares texts: a file whose answer_start values are off scores as the official script scores it
    (training still refuses it)."""
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": ex.context, "qas": [{"id": ex.id, "question": ex.question, "answers": [
            {"text": ex.answers[0], "answer_start": ex.answer_starts[0] + 1}]}]}
        for ex in dev_subset[:2]]}]}
    (tmp_path / "data.json").write_text(json.dumps(data))
    (tmp_path / "pred.json").write_text(json.dumps({dev_subset[0].id: dev_subset[0].answers[0]}))
    assert squad.score_files(tmp_path / "data.json", tmp_path / "pred.json") == {"exact_match": 50.0, "f1": 50.0}
    with pytest.raises(SquadFormatError, match="is not at answer_start"):
        squad.load_squad(tmp_path / "data.json")


# --- malformed files --------------------------------------------------------------------------------------------

CONTEXT = "The Broncos beat the Panthers 24-10."


def _valid_dataset():
    return {"version": "1.1", "data": [{"title": "Super_Bowl", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "q-first", "question": "Who won?", "answers": [{"text": "Broncos", "answer_start": 4}]},
        {"id": "q-second", "question": "Who lost?", "answers": [{"text": "Panthers", "answer_start": 21},
                                                                {"text": "the Panthers", "answer_start": 17}]},
    ]}]}]}


def _qa(data, index):
    return data["data"][0]["paragraphs"][0]["qas"][index]


def test_valid_dataset_loads(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(_valid_dataset()))
    examples = squad.load_squad(path)
    assert examples[1] == Example(id="q-second", title="Super_Bowl", context=CONTEXT, question="Who lost?",
                                  answers=("Panthers", "the Panthers"), answer_starts=(21, 17))


def _drop(key, *where):
    def edit(data):
        target = data
        for step in where:
            target = target[step]
        del target[key]
    return edit


def _set_answer_start(value):
    def edit(data):
        _qa(data, 1)["answers"][1]["answer_start"] = value
    return edit


def _duplicate(data):
    _qa(data, 1)["id"] = "q-first"


def _no_answers(data):
    _qa(data, 0)["answers"] = []


def _answer_text(text, start):
    def edit(data):
        _qa(data, 1)["answers"][1].update(text=text, answer_start=start)
    return edit


PARAGRAPH = ("data", 0, "paragraphs", 0)


@pytest.mark.parametrize("edit, names, problem", [
    (_drop("data"), [], "missing 'data'"),
    (_drop("paragraphs", "data", 0), ["data[0]"], "missing 'paragraphs'"),
    (_drop("qas", *PARAGRAPH), ["data[0].paragraphs[0]"], "missing 'qas'"),
    (_drop("context", *PARAGRAPH), ["data[0].paragraphs[0]"], "missing 'context'"),
    (_drop("id", *PARAGRAPH, "qas", 1), ["data[0].paragraphs[0].qas[1]"], "missing 'id'"),
    (_drop("question", *PARAGRAPH, "qas", 1), ["q-second"], "missing 'question'"),
    (_drop("answers", *PARAGRAPH, "qas", 0), ["q-first"], "missing 'answers'"),
    (_no_answers, ["q-first"], "no answers"),
    (_set_answer_start(5), ["q-second", "'the Panthers'"], "answer_start 5"),
    (_set_answer_start(len(CONTEXT) - 3), ["q-second"], "answer_start"),
    (_set_answer_start(-1), ["q-second"], "answer_start -1"),
    (_set_answer_start("17"), ["q-second"], "'answer_start' must be a int"),
    (_duplicate, ["q-first", "data[0].paragraphs[0].qas[0]"], "duplicate id"),
    (_answer_text("", 17), ["q-second"], "answer 1 has an empty text"),
    # The space after "beat": no token holds it, so training would label the question as having no answer.
    (_answer_text(" ", 16), ["q-second"], "answer 1 has an empty text (only whitespace)"),
], ids=["data", "paragraphs", "qas", "context", "id", "question", "answers", "empty-answers", "answer-elsewhere",
        "answer-past-end", "negative-start", "start-type", "duplicate", "empty-text", "whitespace-text"])
def test_malformed_dataset(tmp_path, edit, names, problem):
    data = copy.deepcopy(_valid_dataset())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SquadFormatError) as info:
        squad.load_squad(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert problem in message
    for name in names:
        assert name in message


@pytest.mark.parametrize("qid", ["abc\nINFO fake log line", "\x1b[2Jq", " padded ", "x" * 100])
def test_a_question_id_that_would_break_the_line_is_shown_as_its_repr(tmp_path, qid):
    """Ids are printed in errors: a line break or escape sequence in one broke the one-line error (and could write
    a fake log line); such an id, or one too long or padded with spaces to read, is shown as its repr, cut."""
    shown = squad.short_repr(qid)
    data = _valid_dataset()
    _qa(data, 1)["id"] = qid
    _qa(data, 1)["question"] = ""
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SquadFormatError) as info:
        squad.load_squad(path)
    assert str(info.value) == f"{path}: question {shown} (data[0].paragraphs[0].qas[1]): empty question"
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({"q-first": "Broncos", qid: 1}))
    with pytest.raises(SquadFormatError) as info:
        squad.load_predictions(predictions)
    assert str(info.value) == f"{predictions}: question {shown}: the prediction must be a string, got int"
    assert squad.show_id("56be4db0acb8001400a502ec") == "56be4db0acb8001400a502ec"  # a SQuAD id, as it is


@pytest.mark.parametrize("context", ["", " \n\t "])
def test_an_empty_context_is_named_not_scored_as_unanswered(tmp_path, context):
    """Evaluation reads no answer_start, so nothing else would stop a paragraph whose context was lost: its questions
    would get empty answers and score 0 without a word."""
    data = _valid_dataset()
    data["data"][0]["paragraphs"][0]["context"] = context
    # A paragraph without questions is nothing to answer, whatever its context.
    data["data"][0]["paragraphs"].insert(0, {"context": "", "qas": []})
    path = tmp_path / "lost.json"
    path.write_text(json.dumps(data))
    for spans in (False, True):
        with pytest.raises(SquadFormatError) as info:
            squad.load_squad(path, spans=spans)
        assert str(info.value) == f"{path}: data[0].paragraphs[1]: empty 'context' for 2 questions"
    data["data"][0]["paragraphs"][1]["context"] = CONTEXT
    path.write_text(json.dumps(data))
    assert [ex.id for ex in squad.load_squad(path)] == ["q-first", "q-second"]


@pytest.mark.parametrize("field, where", [
    ("context", "data[0].paragraphs[0]: 'context'"),
    ("question", "question q-second (data[0].paragraphs[0].qas[1]): 'question'"),
    ("id", "data[0].paragraphs[0].qas[1]: 'id'"),
])
def test_a_lone_surrogate_is_named_not_met_in_the_tokenizer(tmp_path, tokenizer, field, where):
    """Half of an emoji's surrogate pair, as a JSON writer that cut a string in UTF-16 units leaves it: Python reads
    the escape, but the tokenizer (and any UTF-8 writer of the predictions) cannot take it."""
    data = _valid_dataset()
    target = data["data"][0]["paragraphs"][0] if field == "context" else _qa(data, 1)
    target[field] = target[field][:-1] + "\ud83d" + target[field][-1:]
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(data))  # ASCII: the surrogate written as its escape
    assert "\\ud83d" in path.read_text()
    with pytest.raises(SquadFormatError) as info:
        squad.load_squad(path, spans=False)
    assert str(info.value).startswith(f"{path}: {where} holds a lone surrogate \\ud83d at character ")
    assert "\n" not in str(info.value)
    # A whole pair is the one character it encodes, and is read.
    whole = _valid_dataset()
    _qa(whole, 1)["question"] = "Who lost? \U0001F600"
    path.write_text(json.dumps(whole))
    examples = squad.load_squad(path)
    assert examples[1].question == "Who lost? \U0001F600"
    assert len(squad.prepare_eval_features(examples, tokenizer, max_seq_length=64, doc_stride=16)) == 2


@pytest.mark.parametrize("content, problem", [
    (b"", "empty file"),
    (b"  \n", "empty file"),
    (b'{"data": [\xff\xfe]}', "invalid UTF-8 at byte 10"),
    (b'{"data": [}', "invalid JSON at line 1"),
    (b"[1, 2]", "missing 'data'"),
    (b'[{"title": "t", "paragraphs": []}]', "missing 'data'"),
    (b'{"data": []}', "data: no questions"),
    (b'{"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": []}]}]}', "data: no questions"),
])
def test_unreadable_dataset(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(SquadFormatError, match="^" + str(path)) as info:
        squad.load_squad(path)
    assert problem in str(info.value)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be"])
def test_a_file_with_a_byte_order_mark_reads_as_the_plain_one(tmp_path, encoding):
    """UTF-8 with a byte-order mark, and UTF-16 (what Windows editors and PowerShell's `>` write), with its mark."""
    plain = tmp_path / "data.json"
    plain.write_text(json.dumps(_valid_dataset(), ensure_ascii=False).replace("Who won?", "Who wön? 😀"),
                     encoding="utf-8")
    marked = tmp_path / "marked.json"
    text = plain.read_text(encoding="utf-8")
    marked.write_bytes(codecs.BOM_UTF16_BE + text.encode(encoding) if encoding == "utf-16-be" else text.encode(encoding))
    assert squad.load_squad(marked) == squad.load_squad(plain)
    assert squad.load_squad(marked)[0].question == "Who wön? 😀"


def test_a_gzip_compressed_file_reads_as_the_plain_one(tmp_path):
    plain = tmp_path / "data.json"
    plain.write_text(json.dumps(_valid_dataset()))
    packed = tmp_path / "data.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert squad.load_squad(packed) == squad.load_squad(plain)
    predictions = tmp_path / "pred.json.gz"
    predictions.write_bytes(gzip.compress(json.dumps({"q-first": "Broncos"}).encode()))
    assert squad.score_files(packed, predictions) == {"exact_match": 50.0, "f1": 50.0}
    damaged = tmp_path / "damaged.json.gz"
    damaged.write_bytes(packed.read_bytes()[:-12])
    with pytest.raises(SquadFormatError, match=f"^{damaged}: a damaged gzip file"):
        squad.load_squad(damaged)


def _flat(data: dict) -> list[dict]:
    """The questions of a nested SQuAD dict as the flat records HuggingFace ``datasets`` writes."""
    return [{"id": qa["id"], "title": article["title"], "context": paragraph["context"], "question": qa["question"],
             "answers": {"text": [a["text"] for a in qa["answers"]],
                         "answer_start": [a["answer_start"] for a in qa["answers"]]}}
            for article in data["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]


@pytest.mark.parametrize("layout", ["json-lines", "one-line", "list", "data-list", "gzip-json-lines"])
def test_the_flat_records_of_huggingface_datasets_read_as_the_nested_questions(tmp_path, layout):
    """``Dataset.to_json`` writes SQuAD as JSON Lines of flat records (``load_dataset("json", field="data")``
    reads them from a ``data`` list); each layout reads as the same questions, an empty ``answers`` list as an
    unanswerable (SQuAD v2.0) question."""
    nested = _valid_dataset()
    nested["data"][0]["paragraphs"][0]["qas"].append({"id": "q-none", "question": "Who lost in 1999?",
                                                      "answers": [], "is_impossible": True})
    records = _flat(nested)
    assert records[2]["answers"] == {"text": [], "answer_start": []}
    content = {"json-lines": "\n".join(json.dumps(r) for r in records) + "\n\n",
               "gzip-json-lines": "\n".join(json.dumps(r) for r in records),
               "one-line": json.dumps(records[0]) + "\n", "list": json.dumps(records),
               "data-list": json.dumps({"data": records})}[layout]
    path = tmp_path / "flat.jsonl"
    if layout.startswith("gzip"):
        path.write_bytes(gzip.compress(content.encode()))
    else:
        path.write_text(content)
    (tmp_path / "nested.json").write_text(json.dumps(nested))
    expected = squad.load_squad(tmp_path / "nested.json")
    assert squad.load_squad(path) == (expected[:1] if layout == "one-line" else expected)
    assert squad.load_squad(path, limit=1) == expected[:1]


@pytest.mark.parametrize("content, problem", [
    ('{"id": "q1"}\n{"id": "q2"}\n', "question q1 (line 1): missing 'context'"),
    ("{FIRST}\n\n{oops\n", "invalid JSON at line 3 column 2: Expecting property name enclosed in double quotes"),
    ("[{FIRST}, 3]", "[1]: expected a question record (a JSON object), got int"),
    ("{FIRST}\n{SECOND_UNEVEN}", "question q-second (line 2): answers: 2 texts but 1 answer_start values"),
    ("{FIRST}\n{SECOND_AS_LIST}", "question q-second (line 2): 'answers' must be a dict, got list"),
    ("{FIRST}\n{FIRST}", "question q-first (line 2): duplicate id (first at line 1)"),
    ("{FIRST}\n{SECOND_NO_ID}", "line 2: empty 'id'"),
    ("{SECOND_OFF}", "question q-second (line 1): answer 0 'Panthers' is not at answer_start 20 of its context "
                     "(the text occurs at 21)"),
    # A record without its answers is still a question record (it was taken for a nested file: "missing 'data'").
    ("{FIRST_NO_ANSWERS}", "question q-first (line 1): missing 'answers'"),
    ("{FIRST}\n{FIRST_NO_ANSWERS}", "question q-first (line 2): missing 'answers'"),
    ('{"data": [{FIRST_NO_ANSWERS}]}', "question q-first (data[0]): missing 'answers'"),
], ids=["not-records", "bad-line", "not-an-object", "uneven-answers", "answers-list", "duplicate", "empty-id",
        "answer-off", "no-answers-one-line", "no-answers", "no-answers-in-data"])
def test_malformed_flat_records_are_one_line_naming_the_line_and_question(tmp_path, content, problem):
    first, second = _flat(_valid_dataset())
    values = {"FIRST": first, "SECOND_UNEVEN": {**second, "answers": {"text": ["a", "b"], "answer_start": [1]}},
              "SECOND_AS_LIST": {**second, "answers": [{"text": "Panthers", "answer_start": 21}]},
              "SECOND_NO_ID": {**second, "id": "", "context": ""},
              "SECOND_OFF": {**second, "answers": {"text": ["Panthers"], "answer_start": [20]}},
              "FIRST_NO_ANSWERS": {k: v for k, v in first.items() if k != "answers"}}
    for name, value in values.items():
        content = content.replace("{" + name + "}", json.dumps(value))
    path = tmp_path / "flat.jsonl"
    path.write_text(content)
    with pytest.raises(SquadFormatError) as info:
        squad.load_squad(path)
    assert str(info.value) == f"{path}: {problem}"


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_json_lines_whose_strings_hold_unicode_line_separators_read_as_their_records(tmp_path, separator):
    """JSON strings may hold U+2028, U+2029 and U+0085 as they are (``json.dumps(..., ensure_ascii=False)`` and
    ``jq -c`` write them so); the lines of JSON Lines end at line feeds only, where ``str.splitlines`` also cut
    there and a valid file was refused as "invalid JSON at line 1"."""
    records = _flat(_valid_dataset())
    records[0]["question"] = records[0]["question"].replace(" ", separator, 1)
    path = tmp_path / "flat.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n", encoding="utf-8")
    loaded = squad.load_squad(path)
    assert [e.id for e in loaded] == [r["id"] for r in records]
    assert separator in loaded[0].question


def test_an_indented_json_file_with_something_after_it_is_one_error_at_that_place(tmp_path):
    """A stray ``}`` after an indented SQuAD file was taken for JSON Lines and reported at line 1; JSON Lines is
    only where the first line is a value by itself."""
    text = json.dumps(_valid_dataset(), indent=2)
    path = tmp_path / "stray.json"
    path.write_text(text + "\n}\n")
    line = text.count("\n") + 2
    with pytest.raises(SquadFormatError) as info:
        squad.load_squad(path)
    assert str(info.value) == f"{path}: invalid JSON at line {line} column 1: Extra data"


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(SquadFormatError, match="cannot read"):
        squad.load_squad(tmp_path / "absent.json")


@pytest.mark.parametrize("content, problem", [
    (b"", "empty file"),
    (b'{"q1": "a",', "invalid JSON"),
    (b'{"q1": "\xc3("}', "invalid UTF-8"),
    (b'["a"]', "expected a JSON object"),
    (b'{"q1": "a", "q2": 3}', "question q2: the prediction must be a string"),
    (b'{"q1": "a", "q1": "b"}', "question q1: duplicate id"),
    # The data file in the predictions' place was "question data: the prediction must be a string, got list".
    (b'{"version": "1.1", "data": []}', "a SQuAD data file ('data' holds its articles), not predictions"),
])
def test_malformed_predictions(tmp_path, content, problem):
    path = tmp_path / "pred.json"
    path.write_bytes(content)
    with pytest.raises(SquadFormatError, match="^" + str(path)) as info:
        squad.load_predictions(path)
    assert problem in str(info.value)


# --- features ---------------------------------------------------------------------------------------------------

FILLER = "The river flows past the old mill and the village green before it reaches the sea."
ANSWER = "Golden Gate Bridge"


def _windows(tokenizer, example, max_seq_length, doc_stride):
    features = squad.prepare_eval_features([example], tokenizer, max_seq_length, doc_stride)
    spans = []
    for f in range(len(features)):
        context = np.flatnonzero(features.context_mask[f])
        spans.append((int(features.offsets[f, context[0], 0]), int(features.offsets[f, context[-1], 1])))
    return features, spans


def _edge_example(tokenizer, straddle, max_seq_length=48, doc_stride=16):
    """A long context whose answer crosses the end of the first window (straddle) or ends exactly on it."""
    for k in range(60):
        words = (FILLER + " ") * 12
        prefix = " ".join(words.split()[:k]) + " "
        context = prefix + ANSWER + " " + words
        start = len(prefix)
        example = Example(id=f"edge-{k}", title="", context=context, question="Which bridge?", answers=(ANSWER,),
                          answer_starts=(start,))
        _, spans = _windows(tokenizer, example, max_seq_length, doc_stride)
        first_end = spans[0][1]
        if straddle and start < first_end < start + len(ANSWER):
            return example
        if not straddle and first_end == start + len(ANSWER):
            return example
    raise AssertionError("no placement of the answer found")


@pytest.mark.parametrize("straddle", [True, False], ids=["answer-crosses-window-end", "answer-ends-window"])
def test_train_features_at_a_window_edge(tokenizer, straddle):
    max_seq_length, doc_stride = 48, 16
    example = _edge_example(tokenizer, straddle, max_seq_length, doc_stride)
    answer_start = example.answer_starts[0]
    answer_end = answer_start + len(ANSWER)
    train = squad.prepare_train_features([example], tokenizer, max_seq_length, doc_stride)
    evals, spans = _windows(tokenizer, example, max_seq_length, doc_stride)
    assert len(spans) >= 3
    assert torch.equal(train["input_ids"], evals.input_ids)
    holding = [f for f, (lo, hi) in enumerate(spans) if lo <= answer_start and answer_end <= hi]
    assert holding and len(holding) < len(spans)
    assert (0 in holding) == (not straddle)
    for f in range(len(spans)):
        start, end = int(train["start_positions"][f]), int(train["end_positions"][f])
        if f in holding:
            assert 0 < start <= end
            assert evals.context_mask[f, start] and evals.context_mask[f, end]
            text = example.context[evals.offsets[f, start, 0]:evals.offsets[f, end, 1]]
            assert text == ANSWER
            # the same span through the tokenizer's ids
            decoded = tokenizer.decode(train["input_ids"][f, start:end + 1])
            assert decoded == ANSWER.lower()
        else:
            assert (start, end) == (0, 0)


def test_an_answer_selected_with_spaces_around_it_is_labelled_where_its_words_are(tokenizer):
    """Hand-made answers often carry the spaces or line break around the selection: a window that ends on the
    answer's last word, or starts on its first, holds it, and labels the same tokens as for the bare answer."""
    max_seq_length, doc_stride = 48, 16
    bare = _edge_example(tokenizer, False, max_seq_length, doc_stride)  # the answer ends the first window
    start = bare.answer_starts[0]
    padded = Example(id="padded", title="", context=bare.context, question=bare.question,
                     answers=(bare.context[start - 1:start + len(ANSWER) + 1],), answer_starts=(start - 1,))
    assert padded.answers[0] == f" {ANSWER} "
    expected = squad.prepare_train_features([bare], tokenizer, max_seq_length, doc_stride)
    got = squad.prepare_train_features([padded], tokenizer, max_seq_length, doc_stride)
    assert expected["start_positions"][0] > 0
    for key in ("start_positions", "end_positions"):
        assert torch.equal(got[key], expected[key])



@pytest.mark.parametrize("cased", [False, True], ids=["uncased", "cased"])
@pytest.mark.parametrize("where, answer", [
    ("end", "Zoe\u0308"),             # a decomposed accent at the very end of the context
    ("end", "Malmo\u0308\u200b"),      # a zero-width space after it
    ("start", "\u200bParis"),         # a zero-width space first in the context
    ("start", "\ufeffParis"),         # a byte-order mark first in the context
], ids=["accent-at-end", "zero-width-at-end", "zero-width-at-start", "bom-at-start"])
def test_an_answer_at_the_context_edge_with_characters_no_token_covers_is_labelled(tokenizer, cased, where, answer):
    """A normalizer drops some characters from its tokens (an uncased one a combining accent, every BERT one a
    zero-width space): an answer at the very start or end of a context, beginning or ending with one, is still in
    the window that holds its tokens, not labelled as no answer in every window."""
    from transformers import BertTokenizerFast

    if cased:
        tokenizer = BertTokenizerFast(tokenizer.vocab_file, do_lower_case=False)
    filler = " ".join(["river", "mill", "village", "green", "sea"] * 24)
    context = f"{answer} {filler}" if where == "start" else f"{filler} {answer}"
    start_char = context.index(answer)
    example = Example(id="edge", title="", context=context, question="Who?", answers=(answer,),
                      answer_starts=(start_char,))
    train = squad.prepare_train_features([example], tokenizer, max_seq_length=48, doc_stride=16)
    evals = squad.prepare_eval_features([example], tokenizer, max_seq_length=48, doc_stride=16)
    assert len(evals) > 2
    labelled = [f for f in range(len(evals)) if int(train["start_positions"][f]) > 0]
    assert labelled == ([0] if where == "start" else [len(evals) - 1])
    f = labelled[0]
    start, end = int(train["start_positions"][f]), int(train["end_positions"][f])
    covered = context[evals.offsets[f, start, 0]:evals.offsets[f, end, 1]]
    assert covered and covered in answer and covered.strip("\u200b\ufeff")[:3] == answer.strip("\u200b\ufeff")[:3]

def test_doc_stride_is_the_overlap_of_consecutive_windows(tokenizer):
    context = " ".join(["river", "mill", "village", "green", "sea"] * 30)
    example = Example(id="long", title="t", context=context, question="Where?", answers=("sea",),
                      answer_starts=(context.index("sea"),))
    features = squad.prepare_eval_features([example], tokenizer, max_seq_length=48, doc_stride=12)
    windows = [{tuple(span) for span in features.offsets[f][features.context_mask[f]]} for f in range(len(features))]
    assert len(windows) > 2
    assert all(len(a & b) == 12 for a, b in zip(windows, windows[1:]))


def test_eval_features_map_windows_back(tokenizer, dev_subset):
    features = squad.prepare_eval_features(dev_subset, tokenizer, max_seq_length=96, doc_stride=32)
    assert len(features) > len(dev_subset)  # some contexts need several windows
    assert features.input_ids.shape == (len(features), 96) and features.input_ids.dtype == torch.long
    assert sorted(set(features.example_index.tolist())) == list(range(len(dev_subset)))
    assert np.all(np.diff(features.example_index) >= 0)
    for f in range(len(features)):
        example = dev_subset[features.example_index[f]]
        assert features.example_ids[f] == example.id
        offsets = features.token_offsets(f)
        assert offsets[0] is None  # CLS
        for token, span in enumerate(offsets):
            assert (span is not None) == bool(features.context_mask[f, token])
            if span is not None:
                assert 0 <= span[0] < span[1] <= len(example.context)
        # context tokens are exactly those with token type 1, less the final separator
        types = features.token_type_ids[f].numpy().astype(bool)
        last = np.flatnonzero(types)[-1]
        types[last] = False
        assert np.array_equal(types, features.context_mask[f])


def test_question_leading_spaces_are_stripped(tokenizer, dev_subset):
    example = dev_subset[0]
    padded = Example(example.id, example.title, example.context, "   " + example.question, example.answers,
                     example.answer_starts)
    a = squad.prepare_train_features([example], tokenizer, 128, 32)
    b = squad.prepare_train_features([padded], tokenizer, 128, 32)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_feature_arguments_are_checked(tokenizer, dev_subset):
    with pytest.raises(ValueError, match="doc_stride"):
        squad.prepare_eval_features(dev_subset[:1], tokenizer, max_seq_length=64, doc_stride=64)
    with pytest.raises(ValueError, match="max_query_length must be a positive integer"):
        squad.prepare_eval_features(dev_subset[:1], tokenizer, max_query_length=0)
    # A question that, cut to max_query_length, still leaves no more than doc_stride context tokens: one line.
    long_question = Example("long", "", "A short context.", "why " * 100, ("short",), (2,))
    with pytest.raises(SquadFormatError, match=r"^question long has 100 tokens: .* at most 92 \(lower "
                                               r"max_query_length \(100\)") as raised:
        squad.prepare_train_features([long_question], tokenizer, max_seq_length=128, doc_stride=32,
                                     max_query_length=100)
    assert "\n" not in str(raised.value)


def _question_tokens(features, f: int) -> int:
    """Question tokens of window ``f``: the tokens of type 0 that are neither special nor padding."""
    real = features.attention_mask[f].bool() & (features.token_type_ids[f] == 0)
    return int(real.sum()) - 2  # [CLS] and the first [SEP]


def test_a_long_question_is_cut_to_max_query_length(tokenizer, dev_subset, caplog):
    # A question longer than a window's room used to stop the whole run; now it is cut to its first 64 tokens.
    example = dev_subset[0]
    long_question = Example("long", example.title, example.context, "   " + "which of the teams " * 60 + "won?",
                            example.answers, example.answer_starts)
    examples = [dev_subset[1], long_question, dev_subset[2]]
    with caplog.at_level(logging.WARNING, logger="pruning.squad"):
        features = squad.prepare_eval_features(examples, tokenizer, max_seq_length=128, doc_stride=32)
        train = squad.prepare_train_features(examples, tokenizer, max_seq_length=128, doc_stride=32)
    warnings = [r.getMessage() for r in caplog.records if "max_query_length" in r.getMessage()]
    assert warnings == ["1 of 3 questions have more than max_query_length (64) tokens: each is cut to its first 64"] * 2
    cut = [f for f in range(len(features)) if features.example_ids[f] == "long"]
    assert cut and all(_question_tokens(features, f) == 64 for f in cut)
    assert tokenizer.decode(features.input_ids[cut[0], 1:65]) == ("which of the teams " * 16).strip()
    # Training still finds the gold answer in the windows of the cut question.
    answers = [tokenizer.decode(train["input_ids"][f, train["start_positions"][f]:train["end_positions"][f] + 1])
               for f in cut if train["start_positions"][f] > 0]
    assert answers and set(answers) == {example.answers[0].lower()}
    # Its windows are those of the question cut by hand.
    by_hand = Example("long", "", example.context, squad.cut_question(tokenizer, long_question.question, 64))
    assert torch.equal(squad.prepare_eval_features([by_hand], tokenizer, 128, 32).input_ids, features.input_ids[cut])


def test_short_questions_are_not_cut(tokenizer, dev_subset, caplog):
    with caplog.at_level(logging.WARNING, logger="pruning.squad"):
        cut = squad.prepare_eval_features(dev_subset, tokenizer, max_seq_length=128, doc_stride=32)
        whole = squad.prepare_eval_features(dev_subset, tokenizer, max_seq_length=128, doc_stride=32,
                                            max_query_length=90)
    assert not caplog.records
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(getattr(cut, key), getattr(whole, key))
    assert np.array_equal(cut.offsets, whole.offsets)
    short = "Which NFL team represented the AFC at Super Bowl 50?"
    assert squad.cut_question(tokenizer, "  " + short, 64) == short
    n = len(tokenizer(short, add_special_tokens=False)["input_ids"])
    assert squad.cut_question(tokenizer, short, n) == short
    assert len(tokenizer(squad.cut_question(tokenizer, short, n - 1), add_special_tokens=False)["input_ids"]) == n - 1


@pytest.mark.parametrize("question", ["why " * 100_000, "x" * 5000 + " why", "日本語の質問です" * 200,
                                      "e\u0301t\u00e9 " * 300, "\u200b " * 50 + "who " * 100])
def test_cut_question_keeps_at_most_max_query_length_tokens(tokenizer, question):
    cut = squad.cut_question(tokenizer, question, 16)
    assert question.lstrip().startswith(cut)
    tokens = len(tokenizer(cut, add_special_tokens=False)["input_ids"])
    assert 0 < tokens <= 16


@pytest.mark.parametrize("max_seq_length, doc_stride, positions, expected", [
    (128, 96, 512, (128, 96)),   # fits: the run config's windows, stride included
    (384, 128, 512, (384, 128)),
    (512, 300, 512, (512, 300)),
    (384, 128, 128, (128, 64)),  # cut to the positions: the stride to half the cut window
    (384, 32, 128, (128, 32)),
    (64, 128, 512, (64, 32)),    # a stride no shorter than the window: half the window
])
def test_fit_windows_keeps_windows_that_fit(max_seq_length, doc_stride, positions, expected):
    from types import SimpleNamespace

    from pruning.config import RunConfig
    from pruning.trainer import fit_to_model

    assert squad.fit_windows(max_seq_length, doc_stride, positions) == expected
    if doc_stride >= max_seq_length:
        return  # not a valid run config
    # The served model and `eval` fit the windows by this rule; a run's training and evaluation the same way.
    model = SimpleNamespace(config=SimpleNamespace(model_type="bert", max_position_embeddings=positions))
    cfg = fit_to_model(RunConfig(max_seq_length=max_seq_length, doc_stride=doc_stride), model)
    assert (cfg.max_seq_length, cfg.doc_stride) == expected


# --- post-processing --------------------------------------------------------------------------------------------

def _hand_features(context):
    """Two windows of 8 tokens over a context of 1-character tokens 'abcdefghij': [CLS] q [SEP] ctx... [SEP]."""
    offsets = np.full((2, 8, 2), -1, dtype=np.int32)
    for f, first in enumerate([0, 3]):  # window 0 covers characters 0-4, window 1 characters 3-7
        for t in range(5):
            offsets[f, 2 + t] = (first + t, first + t + 1)
    ids = torch.zeros((2, 8), dtype=torch.long)
    return squad.EvalFeatures(input_ids=ids, attention_mask=ids.clone(), token_type_ids=ids.clone(),
                              example_index=np.array([0, 0]), example_ids=["x", "x"], offsets=offsets)


def test_postprocess_by_hand():
    context = "abcdefghij"
    example = Example(id="x", title="", context=context, question="?")
    features = _hand_features(context)
    start = np.zeros((2, 8), dtype=np.float32)
    end = np.zeros((2, 8), dtype=np.float32)
    start[:, :2] = end[:, :2] = 100.0  # CLS and question tokens are never answers
    start[0, 3], end[0, 5] = 4.0, 3.0  # window 0: tokens 3..5 are characters 1..3 = "bcd", score 7
    start[1, 3], end[1, 4] = 5.0, 5.5  # window 1: tokens 3..4 are characters 4..5 = "ef", score 10.5
    best = squad.postprocess_predictions([example], features, start, end)["x"]
    assert best == squad.Answer(text="ef", score=10.5, start=4, end=6)
    # with max_answer_length=1 the best single token wins: "f" (0 + 5.5) over "e" (5 + 0) and "b" (4 + 0)
    best = squad.postprocess_predictions([example], features, start, end, max_answer_length=1)["x"]
    assert best == squad.Answer(text="f", score=5.5, start=5, end=6)
    # an end before its start is no answer: start "f" 50 and end "d" 50 cannot pair; "f" alone scores 50 + 5.5
    start[1, 4], end[1, 2] = 50.0, 50.0
    best = squad.postprocess_predictions([example], features, torch.from_numpy(start), end)["x"]
    assert best == squad.Answer(text="f", score=55.5, start=5, end=6)


def _span_marked(tokenizer, context, answer):
    """The answer postprocessing picks when a model marks the first and the last token of ``answer`` in
    ``context``."""
    example = Example(id="x", title="", context=context, question="Who?")
    features = squad.prepare_eval_features([example], tokenizer, max_seq_length=64, doc_stride=16)
    begin = context.index(answer)
    offsets = features.offsets[0]
    start = np.zeros(offsets.shape[0], dtype=np.float32)
    end = np.zeros(offsets.shape[0], dtype=np.float32)
    start[np.flatnonzero(offsets[:, 0] == begin)[0]] = 10.0
    end[np.flatnonzero((offsets[:, 0] >= begin) & (offsets[:, 1] <= begin + len(answer)))[-1]] = 10.0
    return squad.postprocess_predictions([example], features, start[None], end[None])["x"]


@pytest.mark.parametrize("cased", [False, True], ids=["uncased", "cased"])
@pytest.mark.parametrize("answer", ["Zoe\u0308", "re\u0301sume\u0301", "Andre\u0301 Previn", "Noe\u0308l"])
def test_an_answer_ending_on_a_decomposed_accent_keeps_it(tokenizer, cased, answer):
    # NFD text: a base letter and a combining mark. An accent-stripping (uncased) tokenizer leaves the mark out of
    # its token's offsets; the answer is still the whole of the original text.
    from transformers import BertTokenizerFast

    if cased:
        tokenizer = BertTokenizerFast(tokenizer.vocab_file, do_lower_case=False)
    context = f"The  prize went to {answer}, after a long wait."
    best = _span_marked(tokenizer, context, answer)
    assert best.text == answer and context[best.start:best.end] == answer
    assert squad.exact_match_score(best.text, answer) == 1.0


def _brute_force(context, features, start, end, max_answer_length):
    best = None
    for f in range(len(features)):
        tokens = np.flatnonzero(features.context_mask[f])
        for s in tokens:
            for e in tokens:
                if s <= e < s + max_answer_length:
                    score = float(start[f, s]) + float(end[f, e])
                    if best is None or score > best[0]:
                        best = (score, int(features.offsets[f, s, 0]), int(features.offsets[f, e, 1]))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_postprocess_matches_a_brute_force_search(seed):
    context = "abcdefghij"
    example = Example(id="x", title="", context=context, question="?")
    features = _hand_features(context)
    rng = np.random.default_rng(seed)
    start = rng.normal(size=(2, 8)).astype(np.float32)
    end = rng.normal(size=(2, 8)).astype(np.float32)
    for max_answer_length in (1, 2, 30):
        score, lo, hi = _brute_force(context, features, start, end, max_answer_length)
        best = squad.postprocess_predictions([example], features, start, end, n_best=20,
                                             max_answer_length=max_answer_length)["x"]
        assert (best.start, best.end, best.text) == (lo, hi, context[lo:hi])
        assert best.score == pytest.approx(score)
    # the top start after the top end in every window: the n-best pairs are all invalid, every pair is searched
    start[:, 6] = end[:, 2] = 9.0
    score, lo, hi = _brute_force(context, features, start, end, 30)
    best = squad.postprocess_predictions([example], features, start, end, n_best=1)["x"]
    assert (best.start, best.end, best.score) == (lo, hi, pytest.approx(score))


# --- running a model --------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_qa_model(tiny_bert_config):
    torch.manual_seed(0)
    return BertForQuestionAnswering(tiny_bert_config)


def test_predict_and_evaluate_model(tiny_qa_model, tokenizer, dev_subset):
    examples = dev_subset[:12]
    tiny_qa_model.train()
    kwargs = dict(max_seq_length=96, doc_stride=32, max_answer_length=10, n_best=5, progress=False)
    metrics, predictions = squad.evaluate_model(tiny_qa_model, tokenizer, examples, batch_size=4, **kwargs)
    assert tiny_qa_model.training  # restored after evaluation
    assert set(predictions) == {ex.id for ex in examples}
    for ex in examples:
        assert predictions[ex.id] and predictions[ex.id] in ex.context
    assert metrics == squad.evaluate(examples, predictions)
    assert 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 100.0
    # the answers do not depend on how the windows are batched
    assert squad.predict(tiny_qa_model, tokenizer, examples, batch_size=64, **kwargs) == predictions


def test_predict_spans_agree_with_the_logits(tiny_qa_model, tokenizer, dev_subset):
    examples = dev_subset[:6]
    features = squad.prepare_eval_features(examples, tokenizer, max_seq_length=96, doc_stride=32)
    start, end = squad.compute_logits(tiny_qa_model, features, batch_size=5, progress=False)
    with torch.inference_mode():
        direct = tiny_qa_model.eval()(**features.model_inputs())
    # A batch runs to its longest window: past that, a window's logits are the padding's mark, never an answer.
    real = features.attention_mask.bool().numpy()
    np.testing.assert_allclose(start[real], direct.start_logits.numpy()[real], atol=1e-5)
    np.testing.assert_allclose(end[real], direct.end_logits.numpy()[real], atol=1e-5)
    spans = squad.predict_spans(tiny_qa_model, tokenizer, examples, max_seq_length=96, doc_stride=32,
                                progress=False)
    assert spans == squad.postprocess_predictions(examples, features, start, end)
    for ex in examples:
        span = spans[ex.id]
        assert ex.context[span.start:span.end] == span.text



def test_predict_on_windows_built_once_answers_as_on_its_own(tiny_qa_model, tokenizer, dev_subset):
    """Windows built once are reused for the same questions (evaluation during training); windows of other
    questions or of another width are refused, not read as these questions'."""
    examples = dev_subset[:8]
    kwargs = dict(max_seq_length=96, doc_stride=32, progress=False)
    features = squad.prepare_eval_features(examples, tokenizer, max_seq_length=96, doc_stride=32)
    own = squad.predict(tiny_qa_model, tokenizer, examples, **kwargs)
    assert squad.predict(tiny_qa_model, tokenizer, examples, features=features, **kwargs) == own
    with pytest.raises(ValueError, match="not those of these 7 questions"):
        squad.predict(tiny_qa_model, tokenizer, examples[:7], features=features, **kwargs)
    with pytest.raises(ValueError, match="not those of these 8 questions"):
        squad.predict(tiny_qa_model, tokenizer, examples[::-1], features=features, **kwargs)
    with pytest.raises(ValueError, match="64 tokens wide, not max_seq_length 96"):
        squad.predict(tiny_qa_model, tokenizer, examples, features=squad.prepare_eval_features(
            examples, tokenizer, max_seq_length=64, doc_stride=16), **kwargs)

def _nan_model(config) -> BertForQuestionAnswering:
    torch.manual_seed(0)
    model = BertForQuestionAnswering(config).eval()
    with torch.no_grad():
        model.qa_outputs.weight.fill_(float("nan"))
    return model


def test_non_finite_logits_are_an_error_not_an_arbitrary_span(tiny_bert_config, tokenizer, dev_subset):
    model = _nan_model(tiny_bert_config)
    examples = dev_subset[:3]
    with pytest.raises(squad.NonFiniteLogits, match=r"^the model gave NaN or infinite start/end logits in (\d+) "
                                                    rf"of \1 windows \(first: question {examples[0].id}\)"):
        squad.evaluate_model(model, tokenizer, examples, max_seq_length=96, doc_stride=32, progress=False)
    # One infinite logit on a context token is enough; non-finite values outside the context are never read.
    features = squad.prepare_eval_features(examples, tokenizer, max_seq_length=96, doc_stride=32)
    start = np.zeros(features.offsets.shape[:2], dtype=np.float32)
    end = start.copy()
    start[~features.context_mask] = np.nan
    assert set(squad.postprocess_predictions(examples, features, start, end)) == {ex.id for ex in examples}
    f, t = np.argwhere(features.context_mask)[-1]
    end[f, t] = np.inf
    with pytest.raises(squad.NonFiniteLogits, match=rf"in 1 of {len(features)} windows \(first: question "
                                                    rf"{features.example_ids[f]}\)"):
        squad.postprocess_predictions(examples, features, start, end)


def test_evaluation_tokenizing_draws_a_bar_when_progress_is_asked(tokenizer, dev_subset, tiny_bert_config, capsys):
    """Tokenizing a whole dev set takes a while before the first forward pass: predicting with progress shows it."""
    model = BertForQuestionAnswering(tiny_bert_config).eval()
    squad.predict_spans(model, tokenizer, dev_subset[:4], max_seq_length=96, doc_stride=32, progress=True)
    err = capsys.readouterr().err
    assert "tokenize: 100%" in err and err.index("tokenize") < err.index("predict")
    squad.predict_spans(model, tokenizer, dev_subset[:4], max_seq_length=96, doc_stride=32, progress=False)
    assert "tokenize" not in capsys.readouterr().err


def test_an_answer_written_in_another_unicode_form_than_its_context_is_named_so(tmp_path):
    # "Zoë" typed composed in the answer, decomposed (e + U+0308) in a context pasted from elsewhere: they look the
    # same, and "the text is not in the context" left the user looking at two identical words
    data = {"data": [{"title": "t", "paragraphs": [{"context": "The singer Zoe\u0308 sang.", "qas": [
        {"id": "a", "question": "Who sang?", "answers": [{"text": "Zo\u00eb", "answer_start": 11}]}]}]}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SquadFormatError) as caught:
        squad.load_squad(path)
    assert "Unicode form, NFC" in str(caught.value) and str(path) in str(caught.value)
    assert squad.load_squad(path, spans=False)[0].answers == ("Zo\u00eb",)


def test_windows_cut_to_a_model_are_named_in_what_only_their_length_explains():
    """A question too long for the windows, or windows without room for one, add that the model cut them; a question
    without tokens, which no window length explains, and windows not cut are left as they were."""
    from pruning.squad import QuestionTooLong, QuestionWithoutTokens, WindowsTooShort, windows_cut

    for error in (QuestionTooLong, WindowsTooShort):
        with pytest.raises(error, match=r"^x; these windows are max_seq_length 96 cut to the model's 24 position "
                                        r"embeddings, which no max_seq_length lengthens$"):
            with windows_cut(96, 24):
                raise error("x")
        with pytest.raises(error, match=r"^x$"):
            with windows_cut(96, 96):
                raise error("x")
    with pytest.raises(QuestionWithoutTokens, match=r"^x$"):
        with windows_cut(96, 24):
            raise QuestionWithoutTokens("x")


def test_an_example_given_one_text_for_its_answers_is_refused():
    """`Example(answers="Paris")` in a notebook was scored as five answers of one character each: "Paris" scored 0
    and "P" 100."""
    context = "The capital of France is Paris."
    with pytest.raises(TypeError, match=r"^Example 'a': answers must be a tuple of texts, got the str 'Paris': "
                                        r"write \('Paris',\) for one$"):
        Example(id="a", title="", context=context, question="Where?", answers="Paris", answer_starts=(25,))
    with pytest.raises(TypeError, match=r"^Example 'a': answer_starts must be a tuple of character offsets, got the "
                                        r"int 25: write \(25,\) for one$"):
        Example(id="a", title="", context=context, question="Where?", answers=("Paris",), answer_starts=25)
    one = Example(id="a", title="", context=context, question="Where?", answers=("Paris",), answer_starts=(25,))
    assert squad.evaluate([one], {"a": "Paris"})["exact_match"] == 100.0
    assert squad.evaluate([one], {"a": "P"})["exact_match"] == 0.0


def test_examples_that_share_an_id_are_refused_before_the_model_runs(tokenizer):
    """Predictions are keyed by question id: two questions of one id built by hand got one answer, which
    `evaluate_model` scored for both."""
    context = "The capital of France is Paris. The capital of Spain is Madrid."
    examples = [Example(id="a", title="", context=context, question=question)
                for question in ("What is the capital of France?", "What is the capital of Spain?")]
    with pytest.raises(ValueError, match=r"^question id 'a' is given twice \(examples 0 and 1\); predictions are "
                                         r"keyed by id, so each question needs its own$"):
        squad.prepare_eval_features(examples, tokenizer, max_seq_length=64, doc_stride=32)
    model = BertForQuestionAnswering(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64)).eval()
    with pytest.raises(ValueError, match="given twice"):
        squad.evaluate_model(model, tokenizer, examples, max_seq_length=64, doc_stride=32, progress=False)


def test_a_training_answer_no_window_holds_whole_is_said_once(tokenizer, caplog):
    """An answer longer than a window's context part is labelled "no answer" in every window: the question trains a
    model to answer nothing, and nothing said so. One warning names how many and the longest."""
    filler = " ".join(["river", "mill", "village", "green", "sea"] * 12)
    long_answer = " ".join(["north", "bank", "harbour", "tower"] * 10)  # 40 words: more than a window of 32 holds
    context = f"{filler} {long_answer} {filler}"
    long = Example(id="long-answer", title="", context=context, question="What?", answers=(long_answer,),
                   answer_starts=(context.index(long_answer),))
    short = Example(id="short-answer", title="", context=context, question="Which?", answers=("harbour",),
                    answer_starts=(context.index("harbour"),))
    with caplog.at_level(logging.WARNING, logger="pruning.squad"):
        train = squad.prepare_train_features([long, short], tokenizer, max_seq_length=32, doc_stride=8)
    said = [r.getMessage() for r in caplog.records if "no window" in r.getMessage()]
    assert said == [f"1 of 2 answerable training questions have an answer that no window of 32 tokens holds whole "
                    f"(e.g. question long-answer, an answer of {len(long_answer)} characters): each is trained as "
                    "\"no answer\" in every window (longer windows, max_seq_length, hold them)"]
    windows = squad.prepare_eval_features([long], tokenizer, max_seq_length=32, doc_stride=8)
    assert not train["start_positions"][:len(windows)].any()  # the long one's windows, all at CLS
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pruning.squad"):
        squad.prepare_train_features([short], tokenizer, max_seq_length=32, doc_stride=8)
    assert not [r for r in caplog.records if "no window" in r.getMessage()]
