"""Which ONNX Runtime model a new registered version serves: int8 when it loses at most ``max_int8_f1_drop`` F1
against fp32 on the questions its trial was scored on, else fp32.

A real SQLite MLflow store and two trials of tiny random BERTs whose gold answers are their own fp32 predictions
(so fp32 scores 100): a sound model, whose int8 quantization changes no answer, and a fragile one, one of whose
hidden dimensions is 1000 where the others are about 1. Its QA head ignores that dimension, but the int8 model
quantizes each window's activations with one scale, which that dimension sets: the others round to a few levels and
most answers change.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from conftest import sqlite_store
from pruning import squad
from pruning.errors import path_hint
from pruning.packing import pack, save_packed
from pruning.resources import squad_file
from workflows import registry
from workflows.cli import main
from workflows.int8_check import int8_serves
from workflows.record import ONNX_SCORE_TAGS, TAG_INT8_CHECK, TAG_KIND, TAG_ONNX_VARIANT, TAG_PARENT, TAG_STATUS

SOUND, FRAGILE = "sound", "fragile"
QUESTIONS = 12
WINDOWS = {"max_seq_length": 128, "doc_stride": 64}  # what the trials were scored with (and their model takes)


def _model(tokenizer, fragile: bool) -> BertForQuestionAnswering:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=WINDOWS["max_seq_length"])
    model = BertForQuestionAnswering(config).eval()
    if fragile:
        with torch.no_grad():
            model.bert.encoder.layer[-1].output.LayerNorm.bias[0] = 1000.0
            model.qa_outputs.weight[:, 0] = 0.0
    return model


def _own_answers(model, tokenizer, path: Path) -> Path:
    """A SQuAD file of the first dev questions whose gold answer is ``model``'s own prediction."""
    examples = squad.load_squad(squad_file("dev"), limit=QUESTIONS, spans=False)
    spans = squad.predict_spans(model, tokenizer, examples, progress=False, **WINDOWS)
    paragraphs = [{"context": ex.context,
                   "qas": [{"id": ex.id, "question": ex.question,
                            "answers": [{"text": spans[ex.id].text, "answer_start": spans[ex.id].start}]}]}
                  for ex in examples if spans[ex.id].text.strip()]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "own", "paragraphs": paragraphs}]}))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer):
    """A sweep's parent run and three finished trials with packed models: the sound and the fragile model, each
    scored on its own answers, and the fragile model once more, its questions' file gone."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("served-variant")
    uri = sqlite_store(root / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("tiny", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(experiment_id, tags={TAG_KIND: "sweep"}).info.run_id
    runs, data = {}, {}
    for name, fragile, questions in ((SOUND, False, "sound.json"), (FRAGILE, True, "fragile.json"),
                                     ("lost", True, "gone.json")):
        model = _model(tokenizer, fragile)
        data[name] = _own_answers(model, tokenizer, root / questions)
        save_packed(pack(model), tokenizer, root / name)
        run_id = client.create_run(experiment_id, tags={
            TAG_KIND: "trial", TAG_PARENT: parent, TAG_STATUS: "finished", "fineprune.packed_artifact": "packed_model",
            "pareto": "true", "pareto_speedup": "false", "mlflow.runName": name}).info.run_id
        client.log_artifacts(run_id, str(root / name), "packed_model")
        client.log_metric(run_id, "f1", 100.0)
        for key, value in {**WINDOWS, "eval_data": str(data[name]), "eval_limit": str(QUESTIONS)}.items():
            client.log_param(run_id, key, str(value))
        client.set_terminated(run_id)
        runs[name] = run_id
    data["lost"].unlink()
    return {"client": client, "uri": uri, "parent": parent, "runs": runs, "data": data, "root": root}


def _register(store, trial: str, name: str, **kwargs):
    """The version ``register_run`` makes (or finds), read back; its result must name what the version serves."""
    result = registry.register_run(store["client"], store["runs"][trial], name, store["parent"],
                                   "best_f1_under_density", **kwargs)
    version = store["client"].get_model_version(name, result["version"])
    variant = version.tags[TAG_ONNX_VARIANT]
    served = version.tags.get(ONNX_SCORE_TAGS.get((variant, "f1"), ""))
    assert result["onnx_variant"] == variant and result["served_f1"] == (None if served is None else float(served))
    return version


def _scores(version) -> dict[tuple[str, str], float]:
    return {key: float(version.tags[tag]) for key, tag in ONNX_SCORE_TAGS.items()}


def _logged_models(store, trial: str) -> int:
    client = store["client"]
    experiment = client.get_run(store["runs"][trial]).info.experiment_id
    return len(client.search_logged_models([experiment], filter_string=f"source_run_id = '{store['runs'][trial]}'"))


def test_int8_serves_within_the_drop():
    """Hand-worked: the F1 fp32 minus int8 against the drop allowed."""
    assert int8_serves(40.39, 39.39, 1.0)  # exactly 1 below
    assert not int8_serves(40.39, 37.76, 1.0)  # 2.63 below: the demo's briefly trained champion
    assert int8_serves(40.39, 37.76, 3.0)
    assert int8_serves(40.0, 41.0, 0.0)  # int8 better
    assert not int8_serves(40.0, 39.99, 0.0)


def test_a_version_serves_fp32_when_int8_loses_more_than_the_drop(store, capsys):
    sound, fragile = _register(store, SOUND, "tiny-sound"), _register(store, FRAGILE, "tiny-fragile")
    assert _scores(sound) == {("fp32", "f1"): 100.0, ("fp32", "exact_match"): 100.0,
                              ("int8", "f1"): 100.0, ("int8", "exact_match"): 100.0}
    assert sound.tags[TAG_ONNX_VARIANT] == "int8"
    assert sound.tags[TAG_INT8_CHECK].startswith("serves ONNX Runtime int8: int8 F1 100.00 against fp32 100.00 on the "
                                                 f"first {QUESTIONS} questions")
    # No answer changed: the drop is 0 on every question, and so is its standard error.
    assert sound.tags[TAG_INT8_CHECK].endswith("(max_int8_f1_drop; the drop's standard error, question by question: "
                                               "0.00)")
    scores = _scores(fragile)
    assert scores[("fp32", "f1")] == 100.0 and scores[("int8", "f1")] < 60.0, scores
    assert fragile.tags[TAG_ONNX_VARIANT] == "fp32" and fragile.tags["onnx"] == "fp32,int8"
    assert fragile.tags[TAG_INT8_CHECK].startswith("serves ONNX Runtime fp32: int8 F1 ")
    assert "more than 1 F1 below (max_int8_f1_drop; the drop's standard error" in fragile.tags[TAG_INT8_CHECK]
    error = float(re.search(r"question by question: ([0-9.]+)\)$", fragile.tags[TAG_INT8_CHECK]).group(1))
    assert 0 < error < scores[("fp32", "f1")] - scores[("int8", "f1")]
    # The version serves what its tags say, with the scores they record: its pyfunc's model config, and eval of it.
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store["uri"])
    try:
        served = mlflow.pyfunc.load_model(f"models:/tiny-fragile/{fragile.version}").unwrap_python_model()
    finally:
        mlflow.set_tracking_uri(before)
    assert (served.runtime, served.precision) == ("onnxruntime", "fp32")
    for model, tags in (("tiny-fragile", fragile.tags), ("tiny-sound", sound.tags)):
        data = store["data"][FRAGILE if model == "tiny-fragile" else SOUND]
        assert main(["eval", f"models:/{model}@champion", "--tracking-uri", store["uri"], "--eval-data", str(data),
                     "--no-progress"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["variant"] == tags[TAG_ONNX_VARIANT]
        assert result["f1"] == pytest.approx(float(tags[ONNX_SCORE_TAGS[(result["variant"], "f1")]]))


def test_the_drop_allowed_is_the_registrys(store):
    """The trial's served model is logged once per choice of variant, and reused under another name while the same
    drop chooses the same one."""
    before = _logged_models(store, FRAGILE)
    fragile = _register(store, FRAGILE, "tiny-fragile-too")  # the default drop: the model logged before, fp32
    assert _logged_models(store, FRAGILE) == before
    assert fragile.tags[TAG_ONNX_VARIANT] == "fp32" and _scores(fragile)[("fp32", "f1")] == 100.0
    lenient = _register(store, FRAGILE, "tiny-fragile-lenient", max_int8_f1_drop=95.0)  # int8: logged anew
    assert _logged_models(store, FRAGILE) == before + 1
    assert lenient.tags[TAG_ONNX_VARIANT] == "int8" and "within 95 F1 below" in lenient.tags[TAG_INT8_CHECK]
    unchecked = _register(store, FRAGILE, "tiny-fragile-unchecked", max_int8_f1_drop=None)  # int8: the one above
    assert _logged_models(store, FRAGILE) == before + 1
    assert unchecked.tags[TAG_ONNX_VARIANT] == "int8"
    again = _register(store, FRAGILE, "tiny-fragile-again")  # the default drop again: fp32, the first one
    assert _logged_models(store, FRAGILE) == before + 1 and again.source == fragile.source


def test_questions_that_cannot_be_read_leave_int8_unchecked(store, caplog):
    with caplog.at_level(logging.WARNING, logger="workflows.int8_check"):
        version = _register(store, "lost", "tiny-lost")
    gone = str(store["root"] / "gone.json")
    beside = path_hint(store["root"] / "gone.json")  # the file of the store's other trials: "did you mean ...?"
    assert version.tags[TAG_ONNX_VARIANT] == "int8" and not set(ONNX_SCORE_TAGS.values()) & set(version.tags)
    assert version.tags[TAG_INT8_CHECK] == (f"serves ONNX Runtime int8, unchecked: the trial's questions could not "
                                            f"be scored (ResourceError: {gone}: SQuAD data file not found{beside})")
    assert any("serves its int8 model unchecked" in r.getMessage() and gone in r.getMessage() for r in caplog.records)


def test_without_the_export_nothing_is_checked(store):
    version = _register(store, FRAGILE, "tiny-fragile-torch", onnx=False)
    assert version.tags[TAG_ONNX_VARIANT] == "none" and TAG_INT8_CHECK not in version.tags


def test_select_gives_the_f1_of_the_model_each_version_runs_as(store):
    """`fineprune select` names, beside the trial's F1, the F1 the check measured for what it timed."""
    client = store["client"]
    for name, runs_as, f1, kwargs in (("tiny-timed", "onnxruntime-fp32", ("fp32", "f1"), {}),
                                      ("tiny-timed-int8", "onnxruntime-int8", ("int8", "f1"), {"max_int8_f1_drop": 95}),
                                      ("tiny-timed-torch", "torch", None, {"onnx": False})):
        version = _register(store, FRAGILE, name, **kwargs)
        chosen = registry.select_by_latency(client, name, 10_000.0, repeats=1, warmup=0, alias="timed")
        assert chosen["served_by"] == runs_as and chosen["f1"] == 100.0
        assert chosen["served_f1"] == (None if f1 is None else float(version.tags[ONNX_SCORE_TAGS[f1]]))
        assert [row["served_f1"] for row in chosen["versions"]] == [chosen["served_f1"]]
    torch_timed = registry.select_by_latency(client, "tiny-timed", 10_000.0, repeats=1, warmup=0, alias="timed",
                                             runtime="torch")
    assert torch_timed["served_by"] == "torch" and torch_timed["served_f1"] is None


def test_the_frontier_registration_says_what_each_version_serves(store):
    rows = registry.register_frontier(store["client"], "tiny", store["parent"], "tiny-front")
    by_trial = {row["run_id"]: (row["onnx_variant"], row["served_f1"]) for row in rows}
    runs = store["runs"]
    assert by_trial == {runs[SOUND]: ("int8", 100.0), runs[FRAGILE]: ("fp32", 100.0), runs["lost"]: ("int8", None)}
