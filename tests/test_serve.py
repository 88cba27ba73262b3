"""Models served over HTTP by ``mlflow models serve``, as a user would start them: the smoke sweep's champion, and a
model whose answers to known dev questions are fixed by its weights."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pruning.checkpoint import save_model
from pruning.export import FILES, OrtQAModel
from workflows.logged_model import export_for_serving, fluent_store, log_qa_model, serve_settings
from workflows.served_model import SERVE_DEFAULTS
from workflows.serving import BAD_KINDS, ModelServer, ServerError, free_port, invoke, ping, post, run_load, spoil

from conftest import handed_to_handlers, sqlite_store

STARTUP_SECONDS = 240  # loading torch, transformers and the model in a fresh process on a busy 2-core machine


@pytest.fixture(scope="module")
def server(smoke_sweep, tmp_path_factory):
    """``mlflow models serve`` of the smoke sweep's champion on a free port: its base URL; stopped afterwards."""
    champion = smoke_sweep["champion"]
    assert champion.get("registered"), champion
    with _served(champion["model_uri"], smoke_sweep["tracking_uri"], tmp_path_factory.mktemp("serve")) as url:
        yield url


@contextlib.contextmanager
def _served(model_uri: str, tracking_uri: str, log_dir) -> Iterator[str]:
    """``mlflow models serve`` of ``model_uri`` on a free port: its base URL; every process stopped afterwards."""
    served = ModelServer(model_uri, tracking_uri, log_dir / "serve.log", startup_seconds=STARTUP_SECONDS)
    try:
        served.start()
    except ServerError as err:
        pytest.fail(str(err))
    try:
        yield served.url
    finally:
        served.stop()
    assert not served.running


@pytest.fixture(scope="module")
def answer_key_server(answer_key_model, tokenizer, tmp_path_factory):
    """The answer-key model (its best span in each known dev context is the gold answer) exported and logged as the
    registry logs a trial's model, registered in a store of its own and served like the champion; its base URL."""
    root = tmp_path_factory.mktemp("answer_key")
    model_dir = save_model(answer_key_model, tokenizer, root / "model")
    uri = sqlite_store(root / "mlflow.db")
    experiment = MlflowClient(tracking_uri=uri).create_experiment("answer-key",
                                                                  artifact_location=(root / "artifacts").as_uri())
    with fluent_store(uri):
        # As the registry makes a version: exported for ONNX Runtime, which serves it (int8, the default).
        onnx_dir, exported = export_for_serving(model_dir, root / "onnx")
        assert onnx_dir is not None, exported
        with mlflow.start_run(experiment_id=experiment):
            # Windows of 128 tokens, overlapping by 32: every known context takes several.
            info = log_qa_model(model_dir, serve_settings({"max_seq_length": "128", "doc_stride": "32"}), onnx_dir)
        version = mlflow.register_model(info.model_uri, "answer-key")
    with _served(f"models:/answer-key/{version.version}", uri, root) as url:
        yield url


def _predict(base: str, records: list[dict[str, str]]) -> list[dict]:
    reply = invoke(base, records)
    if reply.status != 200:
        body = reply.body if isinstance(reply.body, dict) else {"message": reply.body}
        pytest.fail(f"/invocations answered {reply.status}: {body.get('message')}\n"
                    f"{str(body.get('stack_trace', ''))[-1500:]}")
    answer = reply.body
    predictions = answer["predictions"] if isinstance(answer, dict) else answer
    assert len(predictions) == len(records)
    return predictions


def _check(predictions: list[dict], records: list[dict[str, str]]) -> None:
    for prediction, record in zip(predictions, records):
        assert prediction["answer"].strip(), prediction
        assert prediction["answer"] in record["context"]
        assert isinstance(prediction["score"], float)


def _short_records(dev_subset, count: int) -> list[dict[str, str]]:
    """SQuAD dev questions with the 200 characters of their context around the gold answer: windows that fit the
    smoke model's 128 positions."""
    records = []
    for example in dev_subset[:count]:
        start = max(0, example.answer_starts[0] - 100)
        records.append({"question": example.question, "context": example.context[start:start + 200]})
    return records


def test_the_champion_answers_over_http(server, dev_subset):
    records = _short_records(dev_subset, 3)
    _check(_predict(server, records), records)


def test_the_served_model_answers_known_dev_questions_with_their_gold_answers(answer_key_server, known_answers):
    records = [{"question": e.question, "context": e.context} for e in known_answers]
    gold = [e.answers[0] for e in known_answers]
    assert [p["answer"] for p in _predict(answer_key_server, records)] == gold
    # The same records in another order, and one alone: each answer stays with its record.
    order = [3, 0, 5, 1, 4, 2]
    assert [p["answer"] for p in _predict(answer_key_server, [records[i] for i in order])] == [gold[i] for i in order]
    assert [p["answer"] for p in _predict(answer_key_server, records[4:5])] == gold[4:5]


def test_the_client_reaches_the_local_server_where_the_environment_names_an_http_proxy(answer_key_server,
                                                                                     known_answers):
    """A machine behind a proxy has http_proxy set; the server listens on 127.0.0.1, which no proxy reaches: ping,
    and so ModelServer's wait for it, and every request went to the proxy (here: a port nothing listens on)."""
    record = {"question": known_answers[0].question, "context": known_answers[0].context}
    script = ("import json, sys\n"
              "from workflows.serving import invoke, ping\n"
              "reply = invoke(sys.argv[1], [json.loads(sys.argv[2])])\n"
              "print(json.dumps([ping(sys.argv[1]), reply.status, reply.body]))\n")
    proxy = f"http://127.0.0.1:{free_port()}"
    env = {key: value for key, value in os.environ.items() if key.lower() != "no_proxy"}
    env.update(http_proxy=proxy, HTTP_PROXY=proxy)
    done = subprocess.run([sys.executable, "-c", script, answer_key_server, json.dumps(record)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    alive, status, body = json.loads(done.stdout)
    assert (alive, status) == (True, 200), body
    assert body["predictions"][0]["answer"] == known_answers[0].answers[0]


def _serving_processes(port: int) -> list[int]:
    """Process ids of the ``mlflow models serve`` processes started on ``port`` (the leader's and its workers')."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in command and str(port).encode() in command:
            found.append(int(entry.name))
    return found


def _signal_once_serving(command: list[str], signum: int) -> tuple[int, str]:
    """Run ``command`` (a client that starts a ModelServer and logs its URL on stderr), send it ``signum`` once its
    server has started, and check that no process of that server is left: the client's exit status and the rest of
    its stderr."""
    client = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    port = None
    try:
        for line in client.stderr:
            if line.startswith("serving ") and " on http://127.0.0.1:" in line:
                port = int(line.split(" on http://127.0.0.1:")[1].split()[0])
                break
        assert port is not None, "the client never started the server"
        deadline = time.monotonic() + 30
        while not _serving_processes(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _serving_processes(port), "no server process found"
        client.send_signal(signum)
        _, err = client.communicate(timeout=120)
        assert client.returncode != 0
        deadline = time.monotonic() + 30
        while _serving_processes(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _serving_processes(port)
        assert not left, f"server processes {left} run on after the client got signal {signum}:\n{err[-2000:]}"
        return client.returncode, err
    finally:
        if client.poll() is None:
            client.kill()
        for pid in _serving_processes(port) if port else []:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def _logged_tiny_model(tmp_path, tokenizer, config, params: dict[str, str] | None = None) -> tuple[str, str, str]:
    """A tiny random QA model saved and logged as the served pyfunc on a new run whose params are ``params`` (served
    with the settings they give): (model URI, tracking URI, run id)."""
    from transformers import BertForQuestionAnswering

    model_dir = save_model(BertForQuestionAnswering(config).eval(), tokenizer, tmp_path / "model")
    uri = sqlite_store(tmp_path / "mlflow.db")
    experiment = MlflowClient(tracking_uri=uri).create_experiment("log", artifact_location=(tmp_path / "a").as_uri())
    with fluent_store(uri):
        with mlflow.start_run(experiment_id=experiment) as run:
            if params:
                mlflow.log_params(params)
            info = log_qa_model(model_dir, serve_settings(params or {}))
    return info.model_uri, uri, run.info.run_id


def test_an_interrupt_while_the_server_starts_stops_the_server(tmp_path, tokenizer, tiny_bert_config):
    """Ctrl-C while ModelServer waits for /ping (a minute on a busy machine) reaches only the client: the server runs
    in a session of its own. It was left serving, holding its port and the model's memory, after the client had
    gone. The client then waits, so that a server that answered first is interrupted while it serves (the client
    had ended with status 0 before the signal came)."""
    model_uri, uri, _ = _logged_tiny_model(tmp_path, tokenizer, tiny_bert_config)
    script = ("import logging, signal, sys, time\n"
              "from workflows.serving import ModelServer\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # a terminal's, not a test runner's ignore

              "logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(message)s')\n"
              "with ModelServer(sys.argv[1], sys.argv[2], sys.argv[3]):\n"
              "    time.sleep(600)\n")
    _signal_once_serving([sys.executable, "-c", script, model_uri, uri, str(tmp_path / "serve.log")], signal.SIGINT)


def test_serve_load_stopped_by_sigterm_stops_its_server(tmp_path, tokenizer, tiny_bert_config):
    """``timeout``, ``kill`` and a job scheduler stop a script with SIGTERM, which ended serve_load at once, its
    server left running."""
    from transformers import BertForQuestionAnswering

    model_dir = save_model(BertForQuestionAnswering(tiny_bert_config).eval(), tokenizer, tmp_path / "model")
    script = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
    code, err = _signal_once_serving([sys.executable, str(script), "--model-dir", str(model_dir), "--requests",
                                      "2000", "--clients", "1", "--rounds", "0"], signal.SIGTERM)
    assert code == 143 and err.strip().splitlines()[-1] == ("serve_load: interrupted by SIGTERM; the model server "
                                                            "is stopped"), err[-2000:]


def _answers(reply) -> list[str]:
    assert reply.status == 200, reply
    predictions = reply.body["predictions"] if isinstance(reply.body, dict) else reply.body
    return [p["answer"] for p in predictions]


def test_every_request_form_answers_the_same(answer_key_server, known_answers):
    records = [{"question": e.question, "context": e.context} for e in known_answers[:3]]
    gold = [e.answers[0] for e in known_answers[:3]]
    columns = {"question": [r["question"] for r in records], "context": [r["context"] for r in records]}
    for payload in ({"dataframe_records": records}, {"inputs": records}, {"inputs": columns},
                    {"instances": records},
                    {"dataframe_split": {"columns": ["question", "context"],
                                         "data": [[r["question"], r["context"]] for r in records]}}):
        assert _answers(post(answer_key_server, payload)) == gold, payload


@pytest.mark.parametrize("form", ["dataframe_records", "inputs", "inputs columns", "instances"])
@pytest.mark.parametrize("value, kind", [(5, "int"), (None, "null"), (2.5, "float"), (True, "bool"),
                                         (["Ann"], "list")])
def test_every_request_form_refuses_a_field_that_is_not_text(answer_key_server, form, value, kind):
    """MLflow casts the values of an ``inputs`` request to the signature's column types before the model sees them:
    a number or null must still be refused as it is with ``dataframe_records``, not answered as its text."""
    record = {"question": "Who wrote it?", "context": value}
    if form == "inputs columns":
        payload = {"inputs": {"question": [record["question"]], "context": [value]}}
    else:
        payload = {form: [record]}
    reply = post(answer_key_server, payload)
    assert reply.status == 400, (payload, reply)
    assert reply.body["message"] == f"record 0: context must be a string, got {kind}", reply.body


def test_the_champion_answers_questions_on_long_contexts(server, dev_subset):
    records = [{"question": e.question, "context": e.context} for e in dev_subset[:2]]
    _check(_predict(server, records), records)


def test_the_champion_answers_over_http_through_onnx_runtime(server, smoke_sweep, dev_subset):
    mlflow.set_tracking_uri(smoke_sweep["tracking_uri"])
    uri = smoke_sweep["champion"]["model_uri"]
    served = mlflow.pyfunc.load_model(uri)
    exported = served.unwrap_python_model().model
    assert isinstance(exported, OrtQAModel) and exported.variant == "int8"
    assert (served.unwrap_python_model().runtime, served.unwrap_python_model().precision) == ("onnxruntime", "int8")
    # The version carries both ONNX models beside the PyTorch weights.
    assert {FILES["fp32"], FILES["int8"]} <= {p.name for p in exported.path.parent.iterdir()}
    flavor = served.metadata.flavors["python_function"]
    assert {"model_dir", "onnx_dir"} <= set(flavor["artifacts"]) and flavor["config"]["onnx_variant"] == "int8"
    assert flavor["config"]["precision"] == "fp32"  # what the smoke trials were measured in
    on_torch = mlflow.pyfunc.load_model(uri, model_config={"onnx_variant": "none"})
    assert not isinstance(on_torch.unwrap_python_model().model, OrtQAModel)
    assert (on_torch.unwrap_python_model().runtime, on_torch.unwrap_python_model().precision) == ("torch", "fp32")
    on_fp32 = mlflow.pyfunc.load_model(uri, model_config={"onnx_variant": "fp32"})

    records = _short_records(dev_subset, 8)
    frame = pd.DataFrame(records)
    over_http = _predict(server, records)
    int8, fp32, torch_answers = served.predict(frame), on_fp32.predict(frame), on_torch.predict(frame)
    # The server answers with the int8 model: its scores, which are not PyTorch's; the fp32 export gives
    # PyTorch's answers.
    assert [p["answer"] for p in over_http] == int8["answer"].tolist()
    assert [p["score"] for p in over_http] == pytest.approx(int8["score"].tolist(), abs=1e-5)
    assert max(abs(a - b) for a, b in zip(int8["score"], torch_answers["score"])) > 1e-4
    assert fp32["answer"].tolist() == torch_answers["answer"].tolist()
    assert fp32["score"].tolist() == pytest.approx(torch_answers["score"].tolist(), abs=2e-4)


def test_the_served_model_logs_its_window_limit(smoke_sweep):
    mlflow.set_tracking_uri(smoke_sweep["tracking_uri"])
    settings = mlflow.pyfunc.load_model(smoke_sweep["champion"]["model_uri"]).model_config
    assert settings["max_windows"] == 64  # the run config's default: the smoke space does not set it
    assert settings["max_seq_length"] == 64 and settings["doc_stride"] == 32 and settings["batch_size"] == 32


def test_a_bad_record_among_good_ones_gets_a_one_line_400_naming_it(server, dev_subset):
    records = _short_records(dev_subset, 4)
    for position, (field, kind) in zip((2, 0, 3), BAD_KINDS[:3]):
        sent = [*records[:position], spoil(records[position], field, kind), *records[position + 1:]]
        reply = invoke(server, sent)
        assert reply.status == 400, reply
        assert set(reply.body) == {"error_code", "message"}, reply.body
        assert reply.body["message"].startswith(f"record {position}: {field} "), reply.body
        assert "\n" not in reply.body["message"]
    _check(_predict(server, records), records)  # the same records, repaired, are answered in order


def test_one_record_given_to_the_client_alone_is_sent_as_one(server, dev_subset):
    """invoke() of one record (a dict), or of a pandas DataFrame, sent its field names, `["question", "context"]`,
    which the server refused."""
    import pandas as pd

    (record,) = _short_records(dev_subset, 1)
    alone, listed, frame = invoke(server, record), invoke(server, [record]), invoke(server, pd.DataFrame([record]))
    assert alone.status == listed.status == frame.status == 200, (alone, frame)
    assert alone.body == listed.body == frame.body


@pytest.mark.parametrize("sent,needle", [
    ([{"question": "Who?"}], "missing: context"),
    ([{"context": "Paris is in France."}], "missing: question"),
    ([], "no records"),
    ([{"query": "Who?", "text": "Ann."}], "no records with a question or a context"),  # every field misnamed
    ([{"question": "Who?", "context": "Ann."}] * 257, "257 records in one request: at most 256"),
])
def test_a_request_without_a_field_or_records_gets_a_one_line_400(server, sent, needle):
    reply = invoke(server, sent)
    assert reply.status == 400, reply
    assert needle in reply.body["message"] and "\n" not in reply.body["message"], reply.body


def test_the_champion_under_load_with_malformed_requests(server, dev_subset, tokenizer):
    # 40 requests from 4 clients; 6 malformed ones (every kind: empty, null and oversized contexts and questions).
    # Valid records: whole dev contexts, with questions that fit the smoke model's windows (64 tokens overlapping
    # by 32: at most 64 - 3 - 32 - 1 = 28 question tokens).
    records = [{"question": e.question, "context": e.context} for e in dev_subset
               if len(tokenizer.tokenize(e.question)) <= 28]
    assert len(records) > 20
    result = run_load(server, records, requests=40, clients=4, bad_fraction=0.15, seed=0)
    assert result.requests == 40 and result.bad == 6
    assert result.other == 0, result.problems
    assert result.ok == result.valid and result.bad_rejected == result.bad
    assert result.server_errors == 0
    assert ping(server)  # the server still answers after the oversized requests
    _check(_predict(server, records[:2]), records[:2])


def test_the_served_model_answers_from_many_threads_at_once(smoke_sweep, dev_subset):
    # The scoring server calls predict from several threads; each must get the answers of a lone call.
    mlflow.set_tracking_uri(smoke_sweep["tracking_uri"])
    model = mlflow.pyfunc.load_model(smoke_sweep["champion"]["model_uri"])
    frames = [pd.DataFrame(_short_records(dev_subset[i:], 2)) for i in range(8)]
    expected = [model.predict(frame)["answer"].tolist() for frame in frames]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: model.predict(frames[i % 8])["answer"].tolist(), range(160)))
    assert answers == [expected[i % 8] for i in range(160)]


def test_the_served_model_searches_spans_as_its_run_did(smoke_sweep, dev_subset):
    """max_answer_length (logged from the run config, or set in the inference config) bounds the answers."""
    mlflow.set_tracking_uri(smoke_sweep["tracking_uri"])
    uri = smoke_sweep["champion"]["model_uri"]
    assert mlflow.pyfunc.load_model(uri).model_config["max_answer_length"] == 30
    frame = pd.DataFrame(_short_records(dev_subset, 8))
    longest = mlflow.pyfunc.load_model(uri).predict(frame)["answer"].tolist()
    single = mlflow.pyfunc.load_model(uri, model_config={"max_answer_length": 1}).predict(frame)["answer"].tolist()
    assert any(" " in a.strip() for a in longest)
    assert not any(" " in a.strip() for a in single)


def test_a_version_logged_on_a_trial_run_keeps_the_runs_params_and_says_nothing_of_them(tmp_path, tokenizer,
                                                                                       tiny_bert_config, caplog):
    """The served batch (the run's eval_batch_size) is not the run's training batch_size: MLflow's copy of the
    model's settings into the run's params fails on it; the run keeps its params, and no warning says so."""
    model_uri, uri, run_id = _logged_tiny_model(tmp_path, tokenizer, tiny_bert_config,
                                                {"batch_size": "8", "eval_batch_size": "32"})
    params = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    with fluent_store(uri):
        settings = mlflow.pyfunc.load_model(model_uri).model_config
        fewer = mlflow.pyfunc.load_model(model_uri, model_config={"max_records": 2})
        with pytest.raises(Exception, match="max_records: must be a whole number >= 1, got 0"):
            mlflow.pyfunc.load_model(model_uri, model_config={"max_records": 0})
        # A setting of the inference config that no request could be answered with stops the model from loading,
        # in one line, instead of failing every request as if the request were wrong.
        for config, message in [({"batch_size": 0}, "model_config batch_size: must be a whole number >= 1, got 0"),
                                ({"max_windows": -1}, "model_config max_windows: must be a whole number >= 1"),
                                ({"n_best": 0}, "model_config n_best: must be"),
                                ({"max_answer_length": "many"}, "model_config max_answer_length: must be a whole "
                                                                "number >= 1, got 'many'"),
                                ({"batch_size": 2.5}, "model_config batch_size: must be a whole number >= 1, got 2.5"),
                                ({"max_seq_length": 8, "doc_stride": 128},
                                 "model_config max_seq_length 8, doc_stride 128: windows of 8 tokens overlapping by "
                                 "4 leave no room for a question")]:
            with pytest.raises(ValueError) as refused:
                mlflow.pyfunc.load_model(model_uri, model_config=config)
            assert str(refused.value).startswith(message) and "\n" not in str(refused.value), config
        as_text = mlflow.pyfunc.load_model(model_uri, model_config={"batch_size": "4", "n_best": 5.0})
        assert (as_text.unwrap_python_model().batch_size, as_text.unwrap_python_model().n_best) == (4, 5)
    assert params == {"batch_size": "8", "eval_batch_size": "32"}
    assert not [r for r in caplog.records if "model config as params" in r.getMessage()]
    assert settings["batch_size"] == 32 and settings["max_records"] == 256
    records = pd.DataFrame([{"question": "Who?", "context": "Ann wrote it."}] * 3)
    with pytest.raises(Exception, match="3 records in one request: at most 2"):
        fewer.predict(records)


def test_models_logged_one_after_another_say_nothing_of_the_predict_type_hints(tmp_path, tokenizer,
                                                                               tiny_bert_config):
    """MLflow reads the served class's annotations as it logs a model; when the class was pickled with each model,
    after a process's first model it could not resolve them, and said so in two lines a model (a sweep logs one a
    frontier point)."""
    from transformers import BertForQuestionAnswering

    model_dir = save_model(BertForQuestionAnswering(tiny_bert_config).eval(), tokenizer, tmp_path / "model")
    uri = sqlite_store(tmp_path / "mlflow.db")
    experiment = MlflowClient(tracking_uri=uri).create_experiment("log", artifact_location=(tmp_path / "a").as_uri())
    with handed_to_handlers("mlflow.models.signature") as said, fluent_store(uri):
        for _ in range(2):
            with mlflow.start_run(experiment_id=experiment):
                log_qa_model(model_dir, serve_settings({}))
    assert not [line for line in said if "type hint" in line], said
    assert len(list((tmp_path / "a").rglob("MLmodel"))) == 2


def test_a_logged_model_is_code_and_loading_it_unpickles_nothing(tmp_path, tokenizer, tiny_bert_config):
    """The served class was pickled by value into each logged model (and MLflow warned, a line a model, that
    loading such a model can run any code the pickle holds). A model is now logged as code: its python_model is
    the file of MODEL_CODE, it carries the pruning package and, of workflows, only the modules the served model
    imports, and it holds no pickle. Loaded here, it is the project's own class."""
    from mlflow.models import Model
    from transformers import BertForQuestionAnswering

    from workflows.served_model import MODEL_CODE, MODEL_FILE, SHIPPED_MODULES, PackedQAModel

    model_dir = save_model(BertForQuestionAnswering(tiny_bert_config).eval(), tokenizer, tmp_path / "model")
    uri = sqlite_store(tmp_path / "mlflow.db")
    experiment = MlflowClient(tracking_uri=uri).create_experiment("log", artifact_location=(tmp_path / "a").as_uri())
    with handed_to_handlers("mlflow.pyfunc") as said, fluent_store(uri):
        with mlflow.start_run(experiment_id=experiment):
            info = log_qa_model(model_dir, serve_settings({}))
    assert not [line for line in said if "CloudPickle" in line or "pickle" in line.lower()], said
    (root,) = {path.parent for path in (tmp_path / "a").rglob("MLmodel")}
    flavor = Model.load(str(root)).flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert Path(flavor["model_code_path"]).name == MODEL_FILE
    assert (root / MODEL_FILE).read_text(encoding="utf-8") == MODEL_CODE
    shipped = root / flavor["code"]
    assert sorted(path.name for path in (shipped / "workflows").iterdir()) == sorted(
        ["__init__.py", *(f"{module}.py" for module in SHIPPED_MODULES)])
    assert (shipped / "pruning" / "inference.py").is_file() and not list(shipped.rglob("__pycache__"))
    assert not [path for path in root.rglob("*") if path.suffix in (".pkl", ".pickle", ".cloudpickle")]
    with fluent_store(uri):
        loaded = mlflow.pyfunc.load_model(info.model_uri)
        assert type(loaded.unwrap_python_model()) is PackedQAModel
        answer = loaded.predict(pd.DataFrame({"question": ["Who wrote it?"], "context": ["It was written by Ann."]}))
    assert answer.columns.tolist() == ["answer", "score"] and len(answer) == 1

def test_serve_settings_come_from_the_run_config_with_defaults():
    params = {"max_seq_length": "128", "doc_stride": "32", "eval_batch_size": "16", "learning_rate": "0.001",
              "max_answer_length": "12"}
    assert serve_settings(params) == {"max_seq_length": 128, "doc_stride": 32, "max_query_length": 64,
                                      "max_windows": 64, "batch_size": 16, "max_answer_length": 12, "n_best": 20}
    assert serve_settings({"max_windows": "8"})["max_windows"] == 8
    assert serve_settings({}) == SERVE_DEFAULTS == {"max_seq_length": 384, "doc_stride": 128, "max_query_length": 64,
                                                    "max_windows": 64,
                                                    "max_answer_length": 30, "n_best": 20,
                                                    "batch_size": 64}


def test_a_reply_cut_short_by_the_server_is_an_answer_of_status_0_not_an_exception():
    """A server that dies while it answers (its worker killed, out of memory) sends a truncated reply: the load
    test counts it as a failed request instead of stopping."""
    import socket
    import threading

    from workflows.serving import post

    payload = {"inputs": []}
    body = json.dumps(payload).encode("utf-8")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_half():
        connection, _ = listener.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request or len(request.partition(b"\r\n\r\n")[2]) < len(body):
                request += connection.recv(65536)  # the whole request read: closing on unread bytes resets
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pre")
            connection.shutdown(socket.SHUT_WR)  # the end of the reply, 95 bytes short
            while connection.recv(65536):
                pass

    thread = threading.Thread(target=answer_half, daemon=True)
    thread.start()
    try:
        reply = post(f"http://127.0.0.1:{port}", payload, timeout=30)
    finally:
        thread.join(timeout=30)
        listener.close()
    assert reply.status == 0
    assert reply.body.startswith("IncompleteRead")


def test_answers_assigned_back_to_an_indexed_frame_stay_with_their_records(tmp_path, tokenizer, tiny_bert_config):
    """A frame sampled or filtered from a larger one keeps its index (2, 0, 1): the answers came back indexed 0, 1,
    2, so ``frame["answer"] = predict(frame)["answer"]`` gave each question the answer of another record."""
    model_uri, uri, _ = _logged_tiny_model(tmp_path, tokenizer, tiny_bert_config)
    frame = pd.DataFrame({"question": ["Who wrote it?", "When was it written?", "Where does she live?"],
                          "context": ["It was written by Ann.", "That happened in 1999 after the war.",
                                      "Ann lives in Paris now."]}, index=[2, 0, 1])
    with fluent_store(uri):
        model = mlflow.pyfunc.load_model(model_uri)
        alone = [model.predict(frame.iloc[[i]])["answer"].iloc[0] for i in range(len(frame))]
        predictions = model.predict(frame)
    assert predictions.index.tolist() == [2, 0, 1]
    assert predictions["answer"].tolist() == alone  # in the records' order, as before
    frame["answer"] = predictions["answer"]
    assert frame["answer"].tolist() == alone
    assert all(answer in context for answer, context in zip(frame["answer"], frame["context"]))


def test_a_precision_mistyped_in_the_inference_config_is_refused_when_an_onnx_version_loads(tmp_path, tokenizer,
                                                                                           tiny_bert_config):
    """``precision`` was checked only where PyTorch serves the version: one served through ONNX Runtime loaded with
    ``precision: fp16`` (or null) and answered in int8 without a word, and refused the same setting only once
    switched to PyTorch."""
    from transformers import BertForQuestionAnswering

    model_dir = save_model(BertForQuestionAnswering(tiny_bert_config).eval(), tokenizer, tmp_path / "model")
    onnx_dir, exported = export_for_serving(model_dir, tmp_path / "onnx")
    assert onnx_dir is not None, exported
    uri = sqlite_store(tmp_path / "mlflow.db")
    experiment = MlflowClient(tracking_uri=uri).create_experiment("log", artifact_location=(tmp_path / "a").as_uri())
    with fluent_store(uri):
        with mlflow.start_run(experiment_id=experiment):
            info = log_qa_model(model_dir, {**serve_settings({}), "precision": "fp32"}, onnx_dir)
        for variant in ("int8", "fp32", "none"):
            for precision in ("fp16", None):
                with pytest.raises(ValueError) as refused:
                    mlflow.pyfunc.load_model(info.model_uri, model_config={"onnx_variant": variant,
                                                                          "precision": precision})
                assert str(refused.value) == (f"model_config precision: unknown value {str(precision)!r} (allowed: "
                                              "fp32, bf16, auto)"), variant
        served = mlflow.pyfunc.load_model(info.model_uri, model_config={"precision": "bf16"}).unwrap_python_model()
        assert (served.runtime, served.precision) == ("onnxruntime", "int8")


def test_an_instances_request_pairs_its_records_fields_by_position_as_the_readme_says(tmp_path, tokenizer,
                                                                                    tiny_bert_config):
    """MLflow's `instances` parser (the scoring server's, before the model) gathers each field across the records:
    a record without a field is not refused by its index, as `dataframe_records` and `inputs` refuse it."""
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    from workflows.served_model import RequestError

    model_uri, uri, _ = _logged_tiny_model(tmp_path, tokenizer, tiny_bert_config)
    question, context = "Where does Bob live?", "Bob lives in Rome near the old bridge."
    with fluent_store(uri):
        model = mlflow.pyfunc.load_model(model_uri)
        schema = model.metadata.get_input_schema()
        paired = model.predict(infer_and_parse_data({"instances": [{"question": question}, {"context": context}]},
                                                    schema))
        alone = model.predict(pd.DataFrame([{"question": question, "context": context}]))
        assert paired["answer"].tolist() == alone["answer"].tolist()  # one record: question A on context B
        for form in ("dataframe_records", "inputs"):
            with pytest.raises(RequestError, match=r"^record 0: context is missing \(the record has no context, or "
                                                   r"it is null\)$"):
                model.predict(infer_and_parse_data({form: [{"question": question}, {"context": context}]}, schema))
        with pytest.raises(MlflowException, match="Failed to enforce schema") as refused:  # MLflow's own message
            model.predict(infer_and_parse_data({"instances": [{"question": question, "context": context},
                                                              {"question": question}]}, schema))
        assert not isinstance(refused.value, RequestError)


def test_a_csv_request_is_refused_by_mlflows_parser_and_its_rows_as_records_answer_as_the_readme_says(
        tmp_path, tokenizer, tiny_bert_config):
    """The README sends CSV rows as `dataframe_records`: MLflow's CSV parser types the columns from the signature,
    whose "any" fields it cannot type, and answers 400 (with a stack trace) before the model sees the request."""
    import io

    from mlflow.pyfunc.scoring_server import infer_and_parse_data, parse_csv_input

    model_uri, uri, _ = _logged_tiny_model(tmp_path, tokenizer, tiny_bert_config)
    csv = "question,context\nWhere does Bob live?,Bob lives in Rome near the old bridge.\n"
    with fluent_store(uri):
        model = mlflow.pyfunc.load_model(model_uri)
        schema = model.metadata.get_input_schema()
        with pytest.raises(MlflowException) as refused:
            parse_csv_input(io.StringIO(csv), schema)
        assert refused.value.get_http_status_code() == 400
        records = pd.read_csv(io.StringIO(csv)).to_dict("records")
        answered = model.predict(infer_and_parse_data({"dataframe_records": records}, schema))
        assert answered["answer"].tolist() == model.predict(pd.DataFrame(records))["answer"].tolist()


def test_a_record_without_a_field_is_said_to_miss_it_by_its_index_and_a_null_alone_is_null(tmp_path, tokenizer,
                                                                                        tiny_bert_config):
    """A record without a context, next to one with it, was refused as "context must be a string, got null", a
    value it never sent. pandas fills the absent field with NaN (as it does a null next to texts), a null alone
    reaches the model as None."""
    from workflows.served_model import RequestError

    model_uri, uri, _ = _logged_tiny_model(tmp_path, tokenizer, tiny_bert_config)
    question, context = "Who wrote it?", "It was written by Ann."
    with fluent_store(uri):
        model = mlflow.pyfunc.load_model(model_uri)
        records = [{"question": question, "context": context}, {"question": question}]
        for sent, index in ((records, 1), (pd.DataFrame(records), 1), (records[::-1], 0)):
            with pytest.raises(RequestError) as refused:
                model.predict(sent)
            assert str(refused.value) == (f"record {index}: context is missing (the record has no context, or it is "
                                          "null)")
        for sent in ([{"question": question, "context": None}], pd.DataFrame([{"question": None, "context": context}])):
            field = "context" if isinstance(sent, list) else "question"
            with pytest.raises(RequestError, match=f"^record 0: {field} must be a string, got null$"):
                model.predict(sent)
