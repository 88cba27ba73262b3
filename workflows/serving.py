"""A registered model served over HTTP by ``mlflow models serve`` on 127.0.0.1, a small client, and a load test.

:class:`ModelServer` starts the server as a user would (``--env-manager local``, this environment's ``mlflow`` and
``uvicorn`` first on PATH) on a free port, waits for ``/ping`` and stops the whole process group it started.
:func:`invoke` posts records to ``/invocations`` (:func:`post`: any request form) and returns the status and the
decoded body, errors included.
:func:`run_load` sends a bounded number of requests from concurrent clients, some of them malformed on purpose, and
counts what came back (used by ``bench/serve_load.py`` and the tests).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["ServerError", "ModelServer", "Reply", "free_port", "invoke", "post", "ping", "BAD_KINDS", "spoil",
           "LoadResult", "run_load"]

logger = logging.getLogger(__name__)

# The server listens on 127.0.0.1, which no proxy reaches: requests to it never go through one that the environment
# names (http_proxy on a machine behind a proxy, without a no_proxy entry for 127.0.0.1).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """The model server exited or did not answer ``/ping`` in time; the message ends with its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ping(base_url: str, timeout: float = 5.0) -> bool:
    """Whether the server answers ``GET /ping`` with 200."""
    try:
        with _DIRECT.open(f"{base_url}/ping", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@dataclass(frozen=True)
class Reply:
    """One ``/invocations`` answer: HTTP status (0: no answer), decoded JSON body (or the raw text), seconds taken."""

    status: int
    body: Any
    seconds: float


def invoke(base_url: str, records: Sequence[Mapping[str, Any]] | Mapping[str, Any], timeout: float = 120.0
           ) -> Reply:
    """POST ``{"dataframe_records": records}`` to ``/invocations``; HTTP errors are returned, not raised. One record
    (a mapping) is sent as a list of one, a pandas DataFrame as its rows (``list()`` of either sent its field
    names)."""
    if isinstance(records, Mapping):
        records = [records]
    elif callable(getattr(records, "to_dict", None)) and hasattr(records, "columns"):  # a DataFrame
        records = records.to_dict("records")
    return post(base_url, {"dataframe_records": list(records)}, timeout=timeout)


def post(base_url: str, payload: Any, timeout: float = 120.0) -> Reply:
    """POST ``payload`` as JSON to ``/invocations`` (any of MLflow's request forms: ``dataframe_records``,
    ``dataframe_split``, ``inputs``, ``instances``); HTTP errors are returned, not raised."""
    data = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(f"{base_url}/invocations", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with _DIRECT.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:  # no answer, or one cut short
        return Reply(0, f"{type(err).__name__}: {err}", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode("utf-8", errors="replace")
    return Reply(status, body, seconds)


class ModelServer:
    """``mlflow models serve -m MODEL_URI --env-manager local`` on 127.0.0.1 and a free port.

    Use as a context manager: entering starts the server and waits until ``/ping`` answers, leaving stops it and its
    workers (the process group it leads)::

        with ModelServer("models:/name@champion", tracking_uri="sqlite:///mlflow.db", log_path=log) as server:
            reply = invoke(server.url, [{"question": "...", "context": "..."}])

    Args:
        model_uri: what to serve (``models:/NAME@ALIAS``, ``runs:/...``, a local path).
        tracking_uri: the MLflow store that resolves ``models:/`` URIs.
        log_path: where the server's stdout and stderr go.
        workers: server worker processes.
        startup_seconds: how long to wait for ``/ping`` (loading torch and the model in a fresh process).
        env: extra environment variables for the server.
    """

    def __init__(self, model_uri: str, tracking_uri: str | None, log_path: str | Path, workers: int = 1,
                 startup_seconds: float = 240.0, env: Mapping[str, str] | None = None) -> None:
        self.model_uri = model_uri
        self.tracking_uri = tracking_uri
        self.log_path = Path(log_path)
        self.workers = workers
        self.startup_seconds = startup_seconds
        self.extra_env = dict(env or {})
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self) -> "ModelServer":
        """Start the server and wait until it answers ``/ping``.

        Raises:
            ServerError: it exited or did not answer within ``startup_seconds`` (it is stopped then, as it is when
                the wait ends in any other way, Ctrl-C included).
        """
        bin_dir = Path(sys.executable).parent  # this environment's bin: mlflow, and the uvicorn it starts
        mlflow_cli = bin_dir / "mlflow"
        command = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
        self.port = free_port()
        command += ["models", "serve", "-m", self.model_uri, "--env-manager", "local", "-h", "127.0.0.1",
                    "-p", str(self.port), "--workers", str(self.workers)]
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **self.extra_env}
        if self.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            logger.info("serving %s on %s (log: %s)", self.model_uri, self.url, self.log_path)
            self._wait_until_ready()
        except BaseException:
            # Ctrl-C while waiting reaches only this process (the server leads a session of its own), and a
            # context manager whose entry fails is never left: stopped here, the server would run on.
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"the model server exited with {self.process.returncode}:\n{self.log_tail()}")
            if ping(self.url):
                return
            time.sleep(1.0)
        raise ServerError(f"the model server did not answer /ping within {self.startup_seconds:.0f} s:\n"
                          f"{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server and its workers: the whole process group it leads."""
        process = self.process
        if process is None:
            return
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

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# How a malformed request spoils its record: (field, kind); run_load cycles through them.
BAD_KINDS: tuple[tuple[str, str], ...] = (("context", "empty"), ("question", "null"), ("context", "oversized"),
                                          ("question", "empty"), ("context", "null"))


def spoil(record: Mapping[str, Any], field_name: str, kind: str, oversized_words: int = 200_000) -> dict[str, Any]:
    """A copy of ``record`` with one field made invalid: ``empty`` (""), ``null`` (None) or ``oversized`` (its
    text repeated to ``oversized_words`` words)."""
    spoilt = dict(record)
    if kind == "empty":
        spoilt[field_name] = ""
    elif kind == "null":
        spoilt[field_name] = None
    elif kind == "oversized":
        words = str(record[field_name]).split() or ["word"]
        spoilt[field_name] = " ".join((words * math.ceil(oversized_words / len(words)))[:oversized_words])
    else:
        raise ValueError(f"unknown kind of malformed record {kind!r} (allowed: empty, null, oversized)")
    return spoilt


@dataclass
class LoadResult:
    """What :func:`run_load` counted.

    Attributes:
        valid, ok: well-formed requests, and those answered 200 with one answer per record, each a span of its
            context.
        bad, bad_rejected: malformed requests, and those answered 400 with a one-line message that names the record
            and the field (and nothing else in the body: no stack trace).
        other: every request counted in neither ``ok`` nor ``bad_rejected``; ``problems`` describes each.
        seconds: wall time from the first request sent to the last answer.
        latencies: seconds of every request, in the order sent.
        kinds: what each request carried, in the order sent: ``valid``, or the spoilt field and how (``context
            oversized``).
        server_errors: requests answered 5xx (or not at all).
    """

    valid: int = 0
    ok: int = 0
    bad: int = 0
    bad_rejected: int = 0
    other: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    server_errors: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return self.valid + self.bad

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """The ``q``-th percentile (0-100, nearest rank) of the request latencies, in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return 1000 * ordered[rank - 1]


def _answered(reply: Reply, records: Sequence[Mapping[str, Any]]) -> str | None:
    """None when ``reply`` answers every record with a span of its context, else what is wrong."""
    if reply.status != 200:
        return f"status {reply.status}: {str(reply.body)[:300]}"
    predictions = reply.body.get("predictions") if isinstance(reply.body, dict) else reply.body
    if not isinstance(predictions, list) or len(predictions) != len(records):
        return f"expected {len(records)} predictions, got {str(reply.body)[:300]}"
    for prediction, record in zip(predictions, records):
        answer = prediction.get("answer") if isinstance(prediction, dict) else None
        if not isinstance(answer, str) or not answer or answer not in record["context"]:
            return f"answer {answer!r} is not a span of its context"
    return None


def _rejected(reply: Reply, expected: str) -> str | None:
    """None when ``reply`` is a 400 whose body is only a one-line message starting with ``expected``."""
    body = reply.body
    if reply.status != 400 or not isinstance(body, dict):
        return f"status {reply.status}: {str(body)[:300]}"
    message = body.get("message")
    if set(body) != {"error_code", "message"} or not isinstance(message, str):
        return f"400 with the body keys {sorted(body)}"
    if "\n" in message or not message.startswith(expected):
        return f"400 with the message {message[:300]!r} (expected one line starting {expected!r})"
    return None


def run_load(base_url: str, records: Sequence[Mapping[str, Any]], requests: int = 300, clients: int = 8,
             bad_fraction: float = 0.05, seed: int = 0, oversized_words: int = 200_000,
             timeout: float = 120.0) -> LoadResult:
    """Send ``requests`` one-record requests from ``clients`` concurrent clients and count the answers.

    Request ``i`` carries ``records[i % len(records)]``. ``round(requests * bad_fraction)`` requests, at positions
    drawn with ``seed``, carry the record spoilt instead (:func:`spoil`, cycling through :data:`BAD_KINDS`); each
    of those must get a 400 naming ``record 0`` and the spoilt field.
    """
    if not records:
        raise ValueError("run_load needs at least one record")
    if requests <= 0 or clients <= 0 or not 0 <= bad_fraction <= 1:
        raise ValueError(f"run_load: requests and clients must be positive and bad_fraction in [0, 1], got "
                         f"{requests}, {clients}, {bad_fraction}")
    rng = random.Random(seed)
    bad_at = sorted(rng.sample(range(requests), round(requests * bad_fraction)))
    kinds = {position: BAD_KINDS[k % len(BAD_KINDS)] for k, position in enumerate(bad_at)}
    plan: list[tuple[list[dict[str, Any]], str | None]] = []
    labels: list[str] = []
    for i in range(requests):
        record = dict(records[i % len(records)])
        if i in kinds:
            field_name, kind = kinds[i]
            plan.append(([spoil(record, field_name, kind, oversized_words)], f"record 0: {field_name}"))
            labels.append(f"{field_name} {kind}")
        else:
            plan.append(([record], None))
            labels.append("valid")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        replies = list(pool.map(lambda item: invoke(base_url, item[0], timeout=timeout), plan))
    result = LoadResult(seconds=time.perf_counter() - start, latencies=[reply.seconds for reply in replies],
                        kinds=labels)
    for i, ((sent, expected), reply) in enumerate(zip(plan, replies)):
        if expected is None:
            result.valid += 1
            problem = _answered(reply, sent)
            result.ok += problem is None
        else:
            result.bad += 1
            problem = _rejected(reply, expected)
            result.bad_rejected += problem is None
        if reply.status == 0 or reply.status >= 500:
            result.server_errors += 1
        if problem is not None:
            result.other += 1
            result.problems.append(f"request {i} ({'valid' if expected is None else expected}): {problem}")
    return result
