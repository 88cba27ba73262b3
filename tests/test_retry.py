"""Retries of tracking calls: transient errors retried with backoff up to a limit, permanent ones not at all."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from workflows.retry import LogQueue, TrackingUnavailable, call_with_retries, is_transient

URI = "http://127.0.0.1:5999"


def _refused() -> MlflowException:
    return MlflowException(f"API request to {URI}/api/2.0/mlflow/runs/create failed: Connection refused")


def test_transient_and_permanent_errors():
    assert is_transient(_refused()) and is_transient(ConnectionRefusedError())
    assert not is_transient(MlflowException("bad param", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(TypeError("a bug is not an outage"))
    for local in (FileNotFoundError(2, "No such file", "/ckpt"), NotADirectoryError(), PermissionError()):
        assert not is_transient(local)  # a local file no retry brings back


def test_a_transient_failure_is_retried_until_it_passes():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise _refused()
        return "ok"

    assert call_with_retries(flaky, URI, limit=60, sleep=sleeps.append) == "ok"
    assert len(calls) == 4 and sleeps == [1.0, 2.0, 4.0]  # exponential backoff


def test_an_outage_past_the_limit_names_the_uri_in_one_line():
    def down():
        raise _refused()

    with pytest.raises(TrackingUnavailable) as caught:
        call_with_retries(down, URI, limit=0.3)
    message = str(caught.value)
    assert URI in message and "\n" not in message


def test_a_permanent_error_is_raised_at_once():
    calls = []

    def wrong():
        calls.append(1)
        raise MlflowException("bad param", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException):
        call_with_retries(wrong, URI, limit=60, sleep=lambda s: pytest.fail("slept"))
    assert calls == [1]


def test_the_queue_runs_calls_in_order_skips_a_bad_one_and_stops_after_an_outage():
    done = []
    queue = LogQueue(URI, limit=0.3)
    queue.submit(lambda: done.append(1))
    queue.submit(lambda: (_ for _ in ()).throw(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE)))
    queue.submit(lambda: done.append(2))
    queue.drain()
    assert done == [1, 2] and queue.failure is None

    def down():
        raise _refused()

    queue.submit(down)
    queue.submit(lambda: done.append(3))
    queue.drain()
    assert isinstance(queue.failure, TrackingUnavailable) and URI in str(queue.failure)
    assert done == [1, 2]  # nothing after the outage ran
    queue.submit(lambda: done.append(4))  # refused once failed
    queue.close()
    assert done == [1, 2]
