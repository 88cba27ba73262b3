"""The smoke sweep's champion served over HTTP by ``mlflow models serve``, as a user would start it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

STARTUP_SECONDS = 240  # loading torch, transformers and the model in a fresh process on a busy 2-core machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def _wait_until_up(process: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        if _get(f"{base}/ping") == 200 or _get(f"{base}/health") == 200:
            return
        time.sleep(1.0)
    pytest.fail(f"the server did not answer /ping within {STARTUP_SECONDS} s:\n"
                f"{log.read_text(errors='replace')[-4000:]}")


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and its workers: the whole process group it leads."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    try:  # workers left behind by a leader that exited on its own
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def server(smoke_sweep, tmp_path_factory):
    """``mlflow models serve`` of the smoke sweep's champion on a free port: its base URL; stopped afterwards."""
    champion = smoke_sweep["champion"]
    assert champion.get("registered"), champion
    bin_dir = Path(sys.executable).parent  # the virtualenv's bin: mlflow and uvicorn live there
    mlflow_cli = bin_dir / "mlflow"
    command = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
    port = _free_port()
    command += ["models", "serve", "-m", champion["model_uri"], "--env-manager", "local", "-h", "127.0.0.1",
                "-p", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": smoke_sweep["tracking_uri"],
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(process, base, log)
        yield base
    finally:
        _stop(process)
    assert process.poll() is not None


def _predict(base: str, records: list[dict[str, str]]) -> list[dict]:
    body = json.dumps({"dataframe_records": records}).encode("utf-8")
    request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = json.loads(err.read() or b"{}")
        pytest.fail(f"/invocations answered {err.code}: {detail.get('message')}\n"
                    f"{str(detail.get('stack_trace', ''))[-1500:]}")
    predictions = answer["predictions"] if isinstance(answer, dict) else answer
    assert len(predictions) == len(records)
    return predictions


def _check(predictions: list[dict], records: list[dict[str, str]]) -> None:
    for prediction, record in zip(predictions, records):
        assert prediction["answer"].strip(), prediction
        assert prediction["answer"] in record["context"]
        assert isinstance(prediction["score"], float)


def test_the_champion_answers_over_http(server, dev_subset):
    # SQuAD dev questions with the 200 characters of their context around the gold answer: windows that fit the
    # smoke model's 128 positions.
    records = []
    for example in dev_subset[:3]:
        start = max(0, example.answer_starts[0] - 100)
        records.append({"question": example.question, "context": example.context[start:start + 200]})
    _check(_predict(server, records), records)


def test_the_champion_answers_questions_on_long_contexts(server, dev_subset):
    records = [{"question": e.question, "context": e.context} for e in dev_subset[:2]]
    _check(_predict(server, records), records)
