"""Tracking that outlives a tracking server going away: calls retried with backoff, in order, off the Tune loop.

A sweep's MLflow calls go through a :class:`LogQueue`: one background thread runs them in the order they were
submitted, and retries a call that fails for a reason that can pass (the server is down or restarting, the SQLite
file is locked) with exponential backoff. Meanwhile the Tune loop goes on and the trials keep running. An outage
that lasts longer than the queue's limit ends it: :attr:`LogQueue.failure` holds a :class:`TrackingUnavailable`
whose message is one line naming the tracking URI, and nothing more is logged. What was not logged is logged by a
later ``fineprune sweep --resume``, from Tune's own record of the trials.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

__all__ = ["TrackingUnavailable", "LogQueue", "call_with_retries", "is_transient", "error_lines", "quick_http_failures",
           "outage_limit", "OutageLimitError", "DEFAULT_OUTAGE_LIMIT_S", "OUTAGE_LIMIT_ENV"]

logger = logging.getLogger(__name__)

DEFAULT_OUTAGE_LIMIT_S = 300.0
OUTAGE_LIMIT_ENV = "FINEPRUNE_TRACKING_TIMEOUT"
# MLflow error codes that no retry can change: the call itself is wrong.
PERMANENT_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                             "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND",
                             "ENDPOINT_NOT_FOUND", "FEATURE_DISABLED"})
# A database error that is about the store itself, not a passing state of it: no retry changes it.
PERMANENT_DATABASE_ERRORS = ("attempt to write a readonly database", "unable to open database file")
# What SQLAlchemy puts before the database's own message when an autoflush failed.
_AUTOFLUSH_NOTE = "(raised as a result of Query-invoked autoflush"
# OSErrors about a local path (a checkpoint to upload, a local artifact store), not about the connection.
_LOCAL_FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 10.0

T = TypeVar("T")


class OutageLimitError(ValueError):
    """The tracking timeout given (flag or ``FINEPRUNE_TRACKING_TIMEOUT``) is not a positive number of seconds."""


def outage_limit(given: float | None = None, flag: str = "tracking_timeout") -> float:
    """How long the tracking server may be away, in seconds: ``given``, else ``$FINEPRUNE_TRACKING_TIMEOUT``, else
    :data:`DEFAULT_OUTAGE_LIMIT_S`. ``flag`` names ``given`` in the error.

    Raises:
        OutageLimitError: the value is not a positive, finite number.
    """
    if given is None:
        text = os.environ.get(OUTAGE_LIMIT_ENV)
        if not text:
            return DEFAULT_OUTAGE_LIMIT_S
        try:
            given = float(text)
        except ValueError:
            raise OutageLimitError(f"{OUTAGE_LIMIT_ENV}={text!r} is not a number of seconds") from None
        flag = OUTAGE_LIMIT_ENV
    if not (given > 0 and math.isfinite(given)):
        raise OutageLimitError(f"{flag} must be a positive number of seconds, got {given:g}")
    return float(given)


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer for longer than the limit; the message is one line naming its URI."""


def is_transient(err: BaseException) -> bool:
    """Whether a failed MLflow call may succeed later (connection refused, timeouts, 5xx, a locked SQLite file).

    An MLflow error is, unless its code says the request itself is wrong; so are network and database errors.
    A missing, existing or refused local file is not, and neither is anything else (a bug).
    """
    code = getattr(err, "error_code", None)
    if any(text in str(err) for text in PERMANENT_DATABASE_ERRORS):  # MLflow calls every database error transient
        return False
    if code is not None:
        return code not in PERMANENT_CODES
    if isinstance(err, _LOCAL_FILE_ERRORS):  # a file that is missing or refused here stays so
        return False
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in ("requests", "urllib3", "sqlalchemy")


def error_lines(err: BaseException) -> list[str]:
    """The lines of the error's message, without the note SQLAlchemy puts before the database's own words."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return [line for line in lines if not line.startswith(_AUTOFLUSH_NOTE)]


def _short(err: BaseException) -> str:
    text = " ".join(" ".join(error_lines(err)).split())
    return f"{type(err).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _unavailable(uri: str, seconds: float, err: BaseException | None) -> TrackingUnavailable:
    cause = f" (last error {_short(err)})" if err is not None else ""
    return TrackingUnavailable(f"the tracking server {uri} did not answer for {seconds:.0f} s{cause}")


def call_with_retries(fn: Callable[[], T], uri: str, limit: float, what: str = "MLflow call",
                      sleep: Callable[[float], None] = time.sleep,
                      transient: Callable[[BaseException], bool] = is_transient) -> T:
    """``fn()``, retried with exponential backoff while it fails transiently (``transient``), for at most ``limit``
    seconds.

    Raises:
        TrackingUnavailable: it kept failing for longer than ``limit``.
        Exception: the first permanent error (see :func:`is_transient`), unchanged.
    """
    started = None
    delay = BACKOFF_FIRST_S
    while True:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - classified just below
            if not transient(err):
                raise
            now = time.monotonic()
            if started is None:
                started = now
                logger.warning("%s to %s failed (%s); retrying for up to %.0f s", what, uri, _short(err), limit)
            if now - started >= limit:
                raise _unavailable(uri, now - started, err) from err
            sleep(min(delay, max(0.0, limit - (now - started))))
            delay = min(delay * 2, BACKOFF_MAX_S)
            continue
        if started is not None:
            logger.warning("%s answers again after %.0f s", uri, time.monotonic() - started)
        return result


# urllib3's line for each retry of a request, "Retrying (Retry(total=0, ...)) after connection broken by ...": the
# retries are MLflow's HTTP client's, and call_with_retries says once that the server does not answer, and for how
# long it keeps trying.
_URLLIB3_POOL = "urllib3.connectionpool"
_URLLIB3_RETRY = "Retrying ("


@contextlib.contextmanager
def quick_http_failures(retries: int = 1) -> Iterator[None]:
    """Within the block, an MLflow HTTP call gives up after ``retries`` quick retries instead of MLflow's default
    of about four minutes of backoff, so that :func:`call_with_retries` keeps the time (unless the user set these),
    and urllib3 does not log each retry."""
    from pruning.quiet import leaving_out, starting_with

    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    added = [name for name in settings if name not in os.environ]
    for name in added:
        os.environ[name] = settings[name]
    try:
        with leaving_out(_URLLIB3_POOL, starting_with(_URLLIB3_RETRY)):
            yield
    finally:
        for name in added:
            os.environ.pop(name, None)


class LogQueue:
    """Runs submitted calls one at a time, in order, on a background thread, each with :func:`call_with_retries`.

    A call that fails permanently is logged as a warning and skipped (one bad value must not stop a sweep). An outage
    longer than ``limit`` sets :attr:`failure` and drops everything still queued.

    Args:
        uri: the tracking URI (for messages).
        limit: how long one outage may last, in seconds.
    """

    def __init__(self, uri: str, limit: float) -> None:
        self.uri = uri
        self.limit = float(limit)
        self.failure: TrackingUnavailable | None = None
        self._calls: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="fineprune-tracking", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], what: str = "MLflow call") -> None:
        if self.failure is None:
            self._calls.put((fn, what))

    def drain(self) -> None:
        """Wait until every submitted call ran (or the queue failed)."""
        self._calls.join()

    def close(self) -> None:
        """Let the thread end once the calls submitted so far ran."""
        self._calls.put(None)

    def _work(self) -> None:
        while True:
            item = self._calls.get()
            try:
                if item is None:
                    return
                if self.failure is not None:
                    continue
                fn, what = item
                try:
                    call_with_retries(fn, self.uri, self.limit, what=what)
                except TrackingUnavailable as err:
                    logger.error("%s", err)
                    self.failure = err
                except Exception as err:  # noqa: BLE001 - a permanent error of one call; the sweep goes on
                    logger.warning("%s failed and is skipped: %s", what, _short(err))
            finally:
                self._calls.task_done()
