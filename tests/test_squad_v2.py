"""SQuAD v2.0: unanswerable questions read, trained on (labelled at CLS), scored with the official v2.0 rules, and
answered "no answer" by a model trained on them: in evaluation, `eval`, `ask` and the served model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import invocations
from mlflow.tracking import MlflowClient
from transformers import BertConfig, BertForQuestionAnswering

from pruning import squad
from pruning.checkpoint import CheckpointError, read_null_answers, save_model
from pruning.resources import squad_file
from pruning.squad import Example, SquadFormatError
from workflows import cli
from workflows.logged_model import log_qa_model, serve_settings

from conftest import sqlite_store

BEST = ("best_exact_match", "best_exact_match_threshold", "best_f1", "best_f1_threshold")
CONTEXT = "The Denver Broncos beat the Carolina Panthers 24-10 in Super Bowl 50."


def v2_file(path: Path, questions: int = 24, every: int = 3) -> Path:
    """The first ``questions`` shipped dev questions as a SQuAD v2.0 file, every ``every``-th of them made
    unanswerable: asked of another article's context, with no answers and the plausible answer v2.0 files give."""
    shipped = squad.load_squad(squad_file("dev"), limit=max(questions, 200))
    examples, contexts = shipped[:questions], sorted({ex.context for ex in shipped})
    paragraphs = []
    for i, ex in enumerate(examples):
        if i % every == every - 1:
            other = next(c for c in contexts[i % len(contexts):] + contexts if c != ex.context)
            qa = {"id": ex.id, "question": ex.question, "answers": [], "is_impossible": True,
                  "plausible_answers": [{"text": other[:12], "answer_start": 0}]}
            paragraphs.append({"context": other, "qas": [qa]})
        else:
            answers = [{"text": t, "answer_start": s} for t, s in zip(ex.answers, ex.answer_starts)]
            paragraphs.append({"context": ex.context, "qas": [{"id": ex.id, "question": ex.question,
                                                                "answers": answers, "is_impossible": False}]})
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def _file(path: Path, qas: list[dict], context: str = CONTEXT, version: str = "v2.0") -> Path:
    path.write_text(json.dumps({"version": version, "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    return path


def test_an_unanswerable_question_is_read_without_answers_and_a_v2_file_without_a_warning(tmp_path, caplog):
    path = _file(tmp_path / "v2.json", [
        {"id": "a", "question": "Who won?", "answers": [{"text": "Denver Broncos", "answer_start": 4}],
         "is_impossible": False},
        {"id": "b", "question": "Who lost the 1999 final?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "Carolina Panthers", "answer_start": 28}]}])
    caplog.set_level("WARNING")
    answerable, unanswerable = squad.load_squad(path)
    assert (answerable.answers, answerable.impossible) == (("Denver Broncos",), False)
    assert (unanswerable.answers, unanswerable.answer_starts, unanswerable.impossible) == ((), (), True)
    assert not caplog.records


@pytest.mark.parametrize("qa, problem", [
    ({"answers": [{"text": "Denver Broncos", "answer_start": 4}], "is_impossible": True},
     "'is_impossible' is true, but it has 1 answer (an unanswerable question has none)"),
    ({"answers": [], "is_impossible": "yes"}, "'is_impossible' must be true or false, got 'yes'"),
    ({"answers": []}, "no answers (an unanswerable question says \"is_impossible\": true, as in SQuAD v2.0)"),
])
def test_an_unanswerable_question_marked_wrongly_is_one_line_naming_the_file_and_question(tmp_path, qa, problem):
    path = _file(tmp_path / "bad.json", [{"id": "q", "question": "Who?", **qa}])
    with pytest.raises(SquadFormatError) as err:
        squad.load_squad(path)
    assert str(err.value) == f"{path}: question q (data[0].paragraphs[0].qas[0]): {problem}"


def _examples(*golds: tuple[str, ...] | None) -> list[Example]:
    """Questions with these gold answers (None: unanswerable), ids q0, q1, ..."""
    return [Example(id=f"q{i}", title="", context=CONTEXT, question="?", answers=gold or (), impossible=gold is None)
            for i, gold in enumerate(golds)]


def test_the_v2_metric_matches_hand_worked_cases_and_splits_answerable_from_unanswerable():
    examples = _examples(("Denver Broncos",), None, None, ("the",), ("Carolina Panthers",))
    predictions = {"q0": "Broncos", "q1": "", "q2": "the Panthers", "q3": "", "q4": ""}
    # q0: EM 0, F1 2/3; q1 (no answer, none given): 1, 1; q2: 0, 0; q3 (a gold text with no token is the empty
    # answer): 1, 1; q4: 0, 0.
    result = squad.evaluate(examples, predictions, by_answerable=True)
    assert result == pytest.approx({
        "exact_match": 40.0, "f1": 100 * (2 / 3 + 2) / 5,
        "has_answer_exact_match": 100 / 3, "has_answer_f1": 100 * (2 / 3 + 1) / 3, "has_answer_questions": 3,
        "no_answer_exact_match": 50.0, "no_answer_f1": 50.0, "no_answer_questions": 2})
    assert squad.question_f1(examples, predictions) == pytest.approx([200 / 3, 100, 0, 100, 0])
    assert squad.evaluate(examples, predictions) == pytest.approx({"exact_match": 40.0, "f1": 100 * (2 / 3 + 2) / 5})
    # Without an unanswerable question the v1.1 rules hold: the empty prediction of "the" has EM 1 but F1 0, and no
    # split is added.
    v1 = squad.evaluate(_examples(("the",), ("Denver Broncos",)), {"q0": "", "q1": "Broncos"}, by_answerable=True)
    assert v1 == pytest.approx({"exact_match": 50.0, "f1": 100 * (2 / 3) / 2})
    assert squad.f1_score_v2("", "") == 1.0 and squad.f1_score("", "") == 0.0
    # A gold text with no token is left out where the question has others: "the" does not make the empty
    # prediction of an answerable question right.
    mixed = squad.evaluate(_examples(("the", "Denver Broncos"), None), {"q0": "", "q1": ""})
    assert mixed == pytest.approx({"exact_match": 50.0, "f1": 50.0})


def test_fineprune_score_gives_the_official_v2_split(tmp_path, capsys):
    path = _file(tmp_path / "v2.json", [
        {"id": "a", "question": "Who won?", "answers": [{"text": "Denver Broncos", "answer_start": 4}]},
        {"id": "b", "question": "Who lost in 1999?", "answers": [], "is_impossible": True}])
    (tmp_path / "predictions.json").write_text(json.dumps({"a": "Broncos", "b": ""}))
    assert cli.main(["score", str(path), str(tmp_path / "predictions.json")]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx({
        "exact_match": 50.0, "f1": 100 * (2 / 3 + 1) / 2, "has_answer_exact_match": 0.0,
        "has_answer_f1": 200 / 3, "has_answer_questions": 1, "no_answer_exact_match": 100.0, "no_answer_f1": 100.0,
        "no_answer_questions": 1})


def test_every_window_of_an_unanswerable_question_is_labelled_at_cls(tokenizer, tmp_path):
    examples = squad.load_squad(v2_file(tmp_path / "v2.json", questions=12))
    features = squad.prepare_train_features(examples, tokenizer, max_seq_length=96, doc_stride=32)
    windows = squad.prepare_eval_features(examples, tokenizer, max_seq_length=96, doc_stride=32)
    impossible = np.array([examples[int(i)].impossible for i in windows.example_index])
    assert impossible.sum() > len(examples) // 3  # several windows each
    labels = torch.stack([features["start_positions"], features["end_positions"]], dim=1).numpy()
    assert (labels[impossible] == 0).all()
    answerable = v2_file(tmp_path / "v1.json", questions=12, every=10 ** 6)  # the same questions, all answerable
    plain = squad.prepare_train_features(squad.load_squad(answerable), tokenizer, max_seq_length=96, doc_stride=32)
    assert (plain["start_positions"] > 0).sum() > (features["start_positions"] > 0).sum() > 0


def test_no_answer_wins_where_the_cls_score_of_every_window_beats_the_best_span(tokenizer):
    examples = _examples(("Broncos",), ("Broncos",))
    features = squad.prepare_eval_features(examples, tokenizer, max_seq_length=48, doc_stride=16)
    assert len(features) == 2
    start = np.zeros(features.offsets.shape[:2], dtype=np.float32)
    end = np.zeros_like(start)
    context = features.context_mask
    for f in range(2):
        token = int(np.flatnonzero(context[f])[2])
        start[f, token], end[f, token] = 3.0, 2.0  # the best span scores 5
    start[:, 0] = end[:, 0] = [2.0, 3.0]  # no answer: 4 in question 0, 6 in question 1
    null = squad.postprocess_predictions(examples, features, start, end, null_answers=True)
    spans = squad.postprocess_predictions(examples, features, start, end)
    assert null["q0"] == replace(spans["q0"], null_margin=-1.0) and null["q0"].text and null["q0"].score == 5.0
    assert null["q1"] == squad.Answer(text="", score=6.0, start=0, end=0, null_margin=1.0, span=spans["q1"])
    assert spans["q1"].text and spans["q1"].null_margin is None
    # A threshold moves the decision: "no answer" must score more than that above the best span.
    assert squad.postprocess_predictions(examples, features, start, end, null_answers=True,
                                         null_threshold=1.0)["q1"] == replace(spans["q1"], null_margin=1.0)
    lenient = squad.postprocess_predictions(examples, features, start, end, null_answers=True, null_threshold=-1.5)
    assert lenient["q0"] == squad.Answer(text="", score=4.0, start=0, end=0, null_margin=-1.0, span=spans["q0"])
    with pytest.raises(ValueError, match="null_threshold must be a finite number"):
        squad.postprocess_predictions(examples, features, start, end, null_answers=True, null_threshold=float("nan"))


def _margins(*rows: tuple[str, float]) -> dict[str, squad.Answer]:
    """Answers q0, q1, ... made with null_answers at threshold 0: (best span, margin of "no answer" over it)."""
    answers = {}
    for i, (text, margin) in enumerate(rows):
        span = squad.Answer(text=text, score=1.0, start=0, end=len(text), null_margin=margin)
        answers[f"q{i}"] = (squad.Answer(text="", score=1.0 + margin, start=0, end=0, null_margin=margin, span=span)
                            if margin > 0 else span)
    return answers


def test_the_best_no_answer_threshold_matches_hand_worked_cases():
    examples = _examples(("Denver Broncos",), None, None, ("Carolina Panthers",))
    # Span EM/F1 by question: 1/1, 0/0, 0/0, 0/(2/3); "no answer": 0, 1, 1, 0. Between the margins -2, -1, 1, 3 the
    # thresholds score (EM) 2, 3, 2, 1, 1 and (F1) 2, 3, 2, 1, 5/3 questions: best in [-2, -1), at its middle.
    answers = _margins(("Denver Broncos", -2.0), ("Panthers", 1.0), ("Super Bowl", -1.0), ("Panthers", 3.0))
    assert squad.best_null_thresholds(examples, answers) == pytest.approx({
        "best_exact_match": 75.0, "best_exact_match_threshold": -1.5, "best_f1": 75.0, "best_f1_threshold": -1.5})
    # The threshold the answers were made with scores less: q2 takes its wrong span.
    made = {qid: answer.text for qid, answer in answers.items()}
    assert squad.evaluate(examples, made) == pytest.approx({"exact_match": 50.0, "f1": 50.0})
    # Where the best interval holds 0 the threshold stays 0; where every question is best with its span, the
    # threshold lies one logit above the highest margin.
    answers = _margins(("Denver Broncos", -2.0), ("Panthers", 1.0), ("Super Bowl", 0.5), ("Panthers", 3.0))
    assert squad.best_null_thresholds(examples, answers) == pytest.approx({
        "best_exact_match": 75.0, "best_exact_match_threshold": 0.0, "best_f1": 75.0, "best_f1_threshold": 0.0})
    right = _margins(("Denver Broncos", 2.0), ("Carolina Panthers", 5.0))
    assert squad.best_null_thresholds(_examples(("Denver Broncos",), ("Carolina Panthers",)), right) == {
        "best_exact_match": 100.0, "best_exact_match_threshold": 6.0, "best_f1": 100.0, "best_f1_threshold": 6.0}
    # Every question best without its span: one logit below the lowest margin (at the margin itself, that question
    # would take its span and score less).
    wrong = _margins(("Panthers", -2.0), ("Broncos", 3.0))
    assert squad.best_null_thresholds(_examples(None, None), wrong) == {
        "best_exact_match": 100.0, "best_exact_match_threshold": -3.0, "best_f1": 100.0, "best_f1_threshold": -3.0}
    # Two intervals score the same: the one nearer 0 is taken, here the one holding it ([-5, 2), not below -5).
    tie = _margins(("Panthers", -5.0), ("Panthers", 2.0))
    assert squad.best_null_thresholds(_examples(("Denver Broncos",), None), tie) == {
        "best_exact_match": 50.0, "best_exact_match_threshold": 0.0, "best_f1": 50.0, "best_f1_threshold": 0.0}
    # A margin of exactly 0 opens the interval that holds 0: the threshold stays 0.
    at_zero = _margins(("Denver Broncos", 0.0), ("Panthers", 2.0))
    assert squad.best_null_thresholds(_examples(("Denver Broncos",), None), at_zero) == {
        "best_exact_match": 100.0, "best_exact_match_threshold": 0.0, "best_f1": 100.0, "best_f1_threshold": 0.0}
    # A question without an answer scores 0 at every threshold; answers without margins are refused.
    del answers["q0"]
    assert squad.best_null_thresholds(examples, answers)["best_exact_match"] == 50.0
    with pytest.raises(ValueError, match="predict them with null_answers"):
        squad.best_null_thresholds(examples, {"q0": squad.Answer(text="Broncos", score=1.0, start=0, end=7)})


def test_predicting_at_the_best_threshold_scores_the_best_exact_match_and_f1(tokenizer, tmp_path):
    examples = squad.load_squad(v2_file(tmp_path / "v2.json", questions=30))
    features = squad.prepare_eval_features(examples, tokenizer, max_seq_length=64, doc_stride=24)
    rng = np.random.default_rng(0)
    start, end = (rng.normal(size=features.offsets.shape[:2]).astype(np.float32) for _ in range(2))
    impossible = np.array([examples[int(i)].impossible for i in features.example_index])
    start[:, 0] += np.where(impossible, 5.0, 2.0) + rng.normal(0.0, 1.0, len(impossible))  # CLS leans to the truth
    answers = squad.postprocess_predictions(examples, features, start, end, null_answers=True)
    best = squad.best_null_thresholds(examples, answers)
    margins = sorted(answer.null_margin for answer in answers.values())
    assert margins[0] < best["best_f1_threshold"] < min(margins[-1], 0.0)  # between two margins, not the default
    scored = []
    for threshold in (-3.0, -1.0, 0.0, 0.5, 2.0, best["best_f1_threshold"], best["best_exact_match_threshold"]):
        made = squad.postprocess_predictions(examples, features, start, end, null_answers=True,
                                             null_threshold=threshold)
        scored.append((threshold, squad.evaluate(examples, {qid: a.text for qid, a in made.items()})))
    assert scored[-2][1]["f1"] == pytest.approx(best["best_f1"])
    assert scored[-1][1]["exact_match"] == pytest.approx(best["best_exact_match"])
    assert all(s["f1"] <= best["best_f1"] + 1e-9 and s["exact_match"] <= best["best_exact_match"] + 1e-9
               for _, s in scored)
    assert 0 < best["best_f1"] < 100 and best["best_f1"] >= squad.evaluate(
        examples, {qid: a.text for qid, a in answers.items()})["f1"]


def null_leaning_model(tokenizer) -> BertForQuestionAnswering:
    """A one-layer BERT whose CLS position scores far above every token: its layer adds nothing to the embeddings,
    and the QA head reads one dimension, which only the first position embedding holds."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    model = BertForQuestionAnswering(config).eval()
    layer = model.bert.encoder.layer[0]
    with torch.no_grad():
        for linear in (layer.attention.output.dense, layer.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
        embeddings = model.bert.embeddings
        embeddings.word_embeddings.weight[:, 0] = 0.0
        embeddings.position_embeddings.weight[:, 0] = 0.0
        embeddings.position_embeddings.weight[0, 0] = 10.0
        model.qa_outputs.weight.zero_()
        model.qa_outputs.weight[:, 0] = 1.0
        model.qa_outputs.bias.zero_()
    return model


def _ask(model_dir: Path, capsys, *flags: str) -> dict:
    assert cli.main(["ask", str(model_dir), "--question", "Who won Super Bowl 50?", "--context", CONTEXT,
                     *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_model_recorded_as_trained_on_unanswerable_questions_answers_none_in_ask_eval_and_serving(
        tokenizer, tmp_path, capsys):
    model = null_leaning_model(tokenizer)
    spans = tmp_path / "spans"
    save_model(model, tokenizer, spans, evaluation={"max_seq_length": 96, "doc_stride": 32})
    nulls = save_model(model, tokenizer, tmp_path / "nulls", evaluation={"max_seq_length": 96, "doc_stride": 32,
                                                                          "null_answers": True})
    assert not read_null_answers(spans) and read_null_answers(nulls)
    span, null = _ask(spans, capsys), _ask(nulls, capsys)
    assert span["answer"] and "null_margin" not in span
    assert null == {"answer": "", "score": pytest.approx(null["score"]), "start": 0, "end": 0,
                    "null_margin": pytest.approx(null["score"] - span["score"], abs=1e-4),
                    "best_span": span["answer"]}

    data = v2_file(tmp_path / "v2.json", questions=9)
    scored = {}
    for directory in (spans, nulls):
        assert cli.main(["eval", str(directory), "--eval-data", str(data), "--no-progress", "--predictions",
                         str(tmp_path / f"{directory.name}.json")]) == 0
        scored[directory.name] = json.loads(capsys.readouterr().out)
    assert scored["nulls"]["null_answers"] and not scored["spans"]["null_answers"]
    assert set(json.loads((tmp_path / "nulls.json").read_text()).values()) == {""}
    assert scored["nulls"]["no_answer_f1"] == 100.0 and scored["nulls"]["has_answer_f1"] == 0.0
    assert scored["nulls"]["exact_match"] == pytest.approx(100 * 3 / 9)
    # The best threshold is reported (here 0: no threshold answers more questions right), and one given is applied.
    assert scored["nulls"]["null_threshold"] == 0.0 and "null_threshold" not in scored["spans"]
    assert scored["nulls"]["best_f1"] == pytest.approx(100 * 3 / 9)
    assert scored["nulls"]["best_f1_threshold"] == 0.0
    assert "best_f1" not in scored["spans"]
    assert cli.main(["eval", str(nulls), "--eval-data", str(data), "--no-progress", "--null-threshold", "1e4"]) == 0
    lenient = json.loads(capsys.readouterr().out)
    assert lenient["null_threshold"] == 1e4 and lenient["no_answer_f1"] == scored["spans"]["no_answer_f1"]
    assert lenient["f1"] == pytest.approx(scored["spans"]["f1"])
    asked = _ask(nulls, capsys, "--null-threshold", "1e4")
    assert asked["answer"] == span["answer"] and asked["null_margin"] == null["null_margin"]
    assert "best_span" not in asked
    for flags, problem in ((["--null-threshold", "nan"], "--null-threshold nan: must be a finite number of logits"),
                           (["--null-threshold", "1"], f"--null-threshold: {spans} answers every question with a "
                                                       "span (it was not trained on unanswerable questions")):
        assert cli.main(["ask", str(spans if flags[1] == "1" else nulls), "--question", "Who won?", "--context",
                         CONTEXT, *flags]) == 2
        assert problem in capsys.readouterr().err
    # The export keeps the record, and runs as the model it was made of.
    assert cli.main(["export", str(nulls), str(tmp_path / "onnx"), "--questions", "2"]) == 0
    capsys.readouterr()
    assert read_null_answers(tmp_path / "onnx")
    assert cli.main(["eval", str(tmp_path / "onnx"), "--eval-data", str(data), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["exact_match"] == pytest.approx(100 * 3 / 9)
    assert "" not in json.loads((tmp_path / "spans.json").read_text()).values()
    assert scored["spans"]["no_answer_f1"] < 100.0 and scored["spans"]["no_answer_questions"] == 3

    uri = sqlite_store(tmp_path / "mlflow.db")
    experiment = MlflowClient(tracking_uri=uri).create_experiment("v2", artifact_location=(tmp_path / "a").as_uri())
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment):
            info = log_qa_model(nulls, serve_settings({"max_seq_length": "96", "doc_stride": "32"}))
        question = pd.DataFrame({"question": ["Who won Super Bowl 50?"], "context": [CONTEXT]})
        served = {threshold: mlflow.pyfunc.load_model(info.model_uri, model_config={"onnx_variant": "none",
                                                                                     "null_threshold": threshold})
                  for threshold in (0.0, "1e4")}
        answers = {threshold: pd.DataFrame(model.predict(question))["answer"].tolist()
                   for threshold, model in served.items()}
        # A request sets its own threshold (MLflow's params); unset, the served model's applies.
        asked = {threshold: pd.DataFrame(served[0.0].predict(question, params=params))["answer"].tolist()
                 for threshold, params in ((None, None), (1e4, {"null_threshold": 1e4}), (0, {"null_threshold": 0}))}
        assert pd.DataFrame(served["1e4"].predict(question, params={"null_threshold": -1.0}))["answer"].tolist() == [""]
        # As the scoring server hands a request's params over (`mlflow models serve`'s /invocations).
        schema = served[0.0].metadata.get_input_schema()
        replies = [json.loads(invocations(json.dumps({"dataframe_records": question.to_dict("records"), **extra}),
                                          "application/json", served[0.0], schema).response)["predictions"]
                   for extra in ({}, {"params": {"null_threshold": 1e4}})]
        with pytest.raises(MlflowException) as refused:
            invocations(json.dumps({"inputs": question.to_dict("records"), "params": {"null_threshold": 1e999}}),
                        "application/json", served[0.0], schema)
        assert json.loads(refused.value.serialize_as_json())["message"] == (
            "params null_threshold: must be a finite number of logits, got inf")
        for value in ("inf", "1.5", True):
            with pytest.raises(MlflowException, match="null_threshold"):
                served[0.0].predict(question, params={"null_threshold": float(value) if value == "inf" else value})
        with pytest.raises(ValueError, match="model_config null_threshold: must be a finite number of logits, got "
                                             "'inf'"):
            mlflow.pyfunc.load_model(info.model_uri, model_config={"null_threshold": "inf"})
        with mlflow.start_run(experiment_id=experiment):
            spans_info = log_qa_model(spans, serve_settings({"max_seq_length": "96", "doc_stride": "32"}))
        configs = [mlflow.models.get_model_info(logged.model_uri).flavors["python_function"]["config"]
                   for logged in (info, spans_info)]
        signatures = [mlflow.models.get_model_info(logged.model_uri).signature for logged in (info, spans_info)]
        span_columns = list(mlflow.pyfunc.load_model(spans_info.model_uri, model_config={"onnx_variant": "none"})
                            .predict(question).columns)
        margins = {threshold: model.predict(question)["null_margin"].tolist() for threshold, model in served.items()}
    finally:
        mlflow.set_tracking_uri(before)
    # The threshold is a setting of the logged model answering "no answer" alone (0, as it was trained), and serves.
    assert configs[0]["null_threshold"] == 0.0 and "null_threshold" not in configs[1]
    assert answers == {0.0: [""], "1e4": [_ask(spans, capsys)["answer"]]}
    assert asked == {None: [""], 1e4: answers["1e4"], 0: [""]}
    assert [[reply["answer"] for reply in answered] for answered in replies] == [[""], answers["1e4"]]
    # Each answer of a model answering "no answer" carries its margin, as `ask` prints it, whichever won.
    assert margins == {0.0: [pytest.approx(null["null_margin"], abs=1e-4)], "1e4": margins[0.0]}
    assert all(reply["null_margin"] == pytest.approx(margins[0.0][0]) for answered in replies for reply in answered)
    assert span_columns == ["answer", "score"]
    # Only the version answering "no answer" declares the param (MLflow passes no other).
    assert [signature.params.to_dict() if signature.params else None for signature in signatures] == [
        [{"name": "null_threshold", "type": "double", "default": None, "shape": None}], None]
    assert [signature.outputs.input_names() for signature in signatures] == [["answer", "score", "null_margin"],
                                                                              ["answer", "score"]]


def test_a_null_answers_record_that_is_not_true_or_false_is_one_line(tokenizer, tmp_path):
    directory = save_model(null_leaning_model(tokenizer), None, tmp_path / "m", evaluation={"null_answers": "yes"})
    with pytest.raises(CheckpointError) as err:
        read_null_answers(directory)
    assert str(err.value) == (f"{directory / 'config.json'}: fineprune_evaluation.null_answers: must be true or false, "
                              "got 'yes'")


def test_a_run_on_unanswerable_questions_records_it_and_scores_with_no_answers(tmp_path, capsys, caplog):
    data = v2_file(tmp_path / "v2.json", questions=24)
    answerable = v2_file(tmp_path / "v1.json", questions=24, every=10 ** 6)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                         "intermediate_size": 64, "max_position_embeddings": 128},
        "train_data": str(data), "eval_data": str(data), "eval_limit": 9, "max_seq_length": 96, "doc_stride": 32,
        "batch_size": 8, "max_steps": 2, "eval_every": 2, "learning_rate": 1.0e-3, "method": "dense"}))
    runs = {}
    for name, train_data in (("v2", data), ("v1", answerable)):
        assert cli.main(["train", "--config", str(config), "--train-data", str(train_data), "--output-dir",
                         str(tmp_path / name), "--no-progress"]) == 0
        runs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert read_null_answers(runs["v2"]["model_dir"]) and not read_null_answers(runs["v1"]["model_dir"])
    # Its evaluations split the F1 over answerable and unanswerable questions (what a sweep's trial runs log too).
    split = runs["v2"]
    assert (split["has_answer_questions"], split["no_answer_questions"]) == (6, 3)
    assert split["f1"] == pytest.approx((6 * split["has_answer_f1"] + 3 * split["no_answer_f1"]) / 9)
    # The run's own evaluation predicts as eval does with the record: the same F1.
    assert cli.main(["eval", runs["v2"]["model_dir"], "--eval-data", str(data), "--eval-limit", "9",
                     "--no-progress"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["f1"] == pytest.approx(runs["v2"]["f1"], abs=1e-9) and scored["null_answers"]
    assert {key: scored[key] for key in BEST} == pytest.approx({key: split[key] for key in BEST}, abs=1e-9)
    assert split["best_f1"] >= split["f1"] and "best_f1" not in runs["v1"]
    # A teacher that never learned to answer "no answer", distilled from on unanswerable questions: said once.
    warned = {}
    for name in ("v1", "v2"):
        caplog.clear()
        assert cli.main(["train", "--config", str(config), "--teacher", runs[name]["model_dir"], "--output-dir",
                         str(tmp_path / f"student-of-{name}"), "--no-progress"]) == 0
        warned[name] = [r.getMessage() for r in caplog.records if "unanswerable" in r.getMessage()
                        and r.levelname == "WARNING"]
    assert warned["v2"] == [] and warned["v1"] == [
        f"teacher {runs['v1']['model_dir']}: its config.json does not record training on unanswerable questions "
        "(fineprune_evaluation.null_answers): a teacher that never learned to answer \"no answer\" teaches the "
        "student to answer them with spans; fine-tune it on this data first"]
