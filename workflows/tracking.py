"""MLflow tracking for sweeps: one parent run per sweep, one nested run per trial, all logged from the driver.

Trials never talk to MLflow. Their metrics reach the driver through ``tune.report``; a Tune callback logs them,
attaches the packed model (the trial's final checkpoint) as an artifact, and ends each run with the trial: finished,
stopped early by the scheduler, or failed. No run is left RUNNING. Runs are found again by tags, so a resumed sweep
reuses its parent run and its trials' runs instead of duplicating them.

The callback logs through a :class:`workflows.retry.LogQueue`, so a tracking server that goes away for a while
neither stops the Tune loop nor loses a result. When a sweep is resumed after its driver died, the callback joins
what MLflow holds with what Tune restored (:meth:`MlflowTrialCallback.on_experiment_end`): every trial Tune knows
ends in one run with its last result, a run that a lost trial left behind is taken over by the trial that runs the
same configuration again, and a run that nothing takes over is ended KILLED (``fineprune.status=orphaned``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import mlflow
from mlflow.tracking import MlflowClient
from ray import tune

from pruning import atomic
from pruning.errors import path_hint

from workflows.frontier import hypervolume_progress
from workflows.record import (ARTIFACT_PACKED_MODEL, EXACT_MATCH, F1, HEADS_REMOVED, HYPERVOLUME, HYPERVOLUME_COMPUTE,
                              KIND_BASELINE, KIND_SWEEP, KIND_TRIAL, LINEAR_DENSITY, PARAM_SEARCHED, PAUSED_S,
                              SEARCH_REPEATS, SEARCH_STEERED, SPEEDUP, STATUS_FAILED, STATUS_FINISHED,
                              STATUS_INTERRUPTED, STATUS_ORPHANED, STATUS_STOPPED_EARLY, STEP, SWEEP_COMPLETE,
                              SWEEP_INTERRUPTED, SWEEP_RUNNING, TAG_CONFIGURATION, TAG_EARLIER_ENDS, TAG_ERROR,
                              TAG_ERROR_FILE,
                              TAG_FINEPRUNE_VERSION, TAG_KIND, TAG_MODEL_DIR, TAG_NODE, TAG_PACKED_ARTIFACT, TAG_PARENT,
                              TAG_PID, TAG_PRECISION, TAG_RETRIES, TAG_RUN_NAME, TAG_SEARCH_OVER, TAG_STATUS, TAG_SWEEP,
                              TAG_SWEEP_STATE, TAG_TOOK_OVER, TAG_TRIAL, TAG_WARM_START, TAG_WARM_START_STORE,
                              TAG_WARM_START_TRIALS, TOTAL_DENSITY, TRIAL_COMPUTE, RecordError, deleted_experiment,
                              deleted_run, figure, file_uri_path, fineprune_version, flat_params, latest_sweep_left,
                              restore_command, sqlite_database, sqlite_uri)
from workflows.retry import (DEFAULT_OUTAGE_LIMIT_S, LogQueue, TrackingUnavailable, call_with_retries, error_lines,
                             is_transient, quick_http_failures)
from workflows.user_errors import output_path_problem

__all__ = [
    "TrackingStoreError",
    "client_for",
    "check_writable_store",
    "check_readable_store",
    "check_reachable",
    "find_sweep",
    "sweep_state",
    "start_parent_run",
    "open_parent_run",
    "log_baseline",
    "MlflowTrialCallback",
    "trial_runs",
    "tag_runs",
    "tag_frontiers",
    "finish_parent_run",
    "hypervolume_series",
    "earlier_ends",
    "log_hypervolume",
    "log_search",
]

logger = logging.getLogger(__name__)


class TrackingStoreError(ValueError):
    """The tracking URI names a store MLflow cannot open or a server that refuses the client; one line naming it."""


def _store_error(uri: str, err: BaseException) -> TrackingStoreError:
    lines = error_lines(err)
    what = lines[0] if lines else ""
    if not isinstance(err, mlflow.exceptions.MlflowException):
        what = f"{type(err).__name__}: {what}" if what else type(err).__name__
    return TrackingStoreError(f"tracking URI {uri}: {what}")


def _file_store_refused(uri: str, err: BaseException) -> TrackingStoreError | None:
    """MLflow's refusal of a file store (a path, or a ``file:`` URI: often a SQLite database given without its
    scheme), said in one line with the URI of a database at that path; None for any other error."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("", "file") or _FILE_STORE_SWITCH not in str(err):
        return None
    try:  # a file: URI's escapes decoded, as MLflow reads them
        path = file_uri_path(uri) if parsed.scheme else uri
    except ValueError:  # of another host
        path = parsed.path
    return TrackingStoreError(f"tracking URI {uri}: a path, which MLflow opens as a file store, and only with "
                              f"{_FILE_STORE_SWITCH}=true; for a SQLite database there give {sqlite_uri(path)}")


# What MLflow's refusal of a file store tells a user to set to open one anyway.
_FILE_STORE_SWITCH = "MLFLOW_ALLOW_FILE_STORE"


def check_writable_store(tracking_uri: str) -> None:
    """Refuse, before any work, a ``sqlite:///`` store a sweep cannot write: its database a directory or under a
    file, or where no file can be made (a directory without write permission, an immutable or read-only one, where
    SQLite also writes its journal). MLflow would retry opening it for a minute and a half, then stop on
    SQLAlchemy's "unable to open database file". Other stores are checked by :func:`check_reachable`.

    Raises:
        TrackingStoreError: one line naming the tracking URI and the database.
    """
    database = sqlite_database(tracking_uri)
    if database is None:
        return
    problem = (output_path_problem(database, directory=False, writable=True, staged=False)
               or _foreign_database(database))
    if problem is not None:
        raise TrackingStoreError(f"tracking URI {tracking_uri}: the database {database}: {problem} (pass another "
                                 "--tracking-uri)")


# Tables of every MLflow database, from its first schema on (any one of them: a database whose creation was cut
# short is still MLflow's, which MLflow completes).
_MLFLOW_TABLES = frozenset({"alembic_version", "experiments", "runs", "registered_models"})


def _foreign_database(database: Path) -> str | None:
    """What is wrong with ``database`` as an MLflow store, when it is another application's SQLite database: one
    with tables, none of them MLflow's, into which MLflow would write its own (some 60 tables, the first time it is
    opened). None for anything else: no file, an empty one, a new database without tables, an MLflow database, or
    one that cannot be read now (a lock; the store's own errors say more)."""
    if not database.is_file() or database.stat().st_size == 0:
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return None
    if not tables or tables & _MLFLOW_TABLES:
        return None
    shown = ", ".join(sorted(tables)[:3]) + (f" and {len(tables) - 3} more" if len(tables) > 3 else "")
    return f"a SQLite database of something else (tables {shown}), not an MLflow database: it is left as it is"


def check_readable_store(tracking_uri: str, hint: str = "pass the sweep's --tracking-uri") -> None:
    """Refuse a ``sqlite:///`` store that holds no record to read: no database file there (MLflow would make one),
    or an empty file (MLflow would make its tables in it, and read it as an empty record). Other stores are checked
    by :func:`check_reachable`.

    Raises:
        TrackingStoreError: one line naming the tracking URI and the database, ending with ``hint``.
    """
    database = sqlite_database(tracking_uri)
    if database is None:
        return
    if not database.is_file():
        raise TrackingStoreError(f"tracking URI {tracking_uri}: no MLflow database at {database}"
                                 f"{path_hint(database)} ({hint})")
    if database.stat().st_size == 0:
        raise TrackingStoreError(f"tracking URI {tracking_uri}: {database} is an empty file, not an MLflow database "
                                 f"({hint})")
    problem = _foreign_database(database)
    if problem is not None:
        raise TrackingStoreError(f"tracking URI {tracking_uri}: {database} is {problem} ({hint})")


def client_for(tracking_uri: str, current: bool = True, limit: float = DEFAULT_OUTAGE_LIMIT_S) -> MlflowClient:
    """A client of ``tracking_uri`` (see :func:`check_reachable` for whether anything answers there), whose model
    registry is the same store: a sweep registers its versions where ``fineprune register``, ``select`` and
    ``report`` look for them, whatever ``MLFLOW_REGISTRY_URI`` says. With ``current``, it also becomes the
    process's tracking URI (where ``mlflow.log_*`` and ``mlflow.pyfunc.load_model`` go); a store read beside it
    (an earlier sweep's, to warm-start from) is opened with ``current=False``.

    Raises:
        TrackingStoreError: MLflow cannot open a store of that kind (a file store it refuses, a database without
            its driver).
        TrackingUnavailable: the database stayed locked by another process (a long write) for ``limit`` seconds.
    """
    with _store_lock(tracking_uri):
        try:
            # MLflow reads (and may upgrade) the database's schema when it opens it: a lock another process holds
            # is waited out as a tracking server that does not answer is, not taken for a store that cannot be.
            client = call_with_retries(lambda: MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri),
                                       tracking_uri, limit, what="opening the tracking store", transient=_locked)
        except TrackingUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - permanent: the URI names no store MLflow opens
            raise (_file_store_refused(tracking_uri, err) or _store_error(tracking_uri, err)) from err
        if tracking_uri.startswith("sqlite:///"):
            with contextlib.suppress(Exception):  # said by the caller's first request, which retries a locked one
                client.search_registered_models(max_results=1)  # the registry's tables, made on first use
    if current:
        mlflow.set_tracking_uri(tracking_uri)
    return client


def _locked(err: BaseException) -> bool:
    """Whether opening a store failed because another process holds its SQLite database locked."""
    return "database is locked" in str(err)


@contextlib.contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
    """Open a ``sqlite:///`` store one process at a time.

    MLflow creates (and upgrades) a database's tables when a process first opens it, with no lock of its own: two
    sweeps started at once on a new store both created them, and one stopped with "duplicate column name" or "table
    already exists". While a process opens the store it holds a lock file beside the database; the others wait for
    it and find the tables made. Other stores (a server, which makes its tables once) take no lock.
    """
    database = sqlite_database(tracking_uri)
    if database is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(atomic.locked(
                database.with_name(f".{database.name}.lock"), str(database), wait=True,
                waiting=f"{database}: waiting while another process creates or upgrades its tables"))
        except OSError:  # no lock file can be made there (a read-only directory): MLflow says what it makes of it
            pass
        yield


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store, else the server's default.

    Without this, a SQLite-backed experiment writes its artifacts to ``./mlruns`` of whatever directory the
    driver happens to run in.
    """
    database = sqlite_database(tracking_uri)
    if database is not None:
        return (database.resolve().parent / "mlartifacts" / experiment).as_uri()
    return None


def _experiment_id(client: MlflowClient, name: str, new_sweep: bool = False) -> str:
    """The id of the experiment ``name``, made when the store does not hold it.

    An experiment deleted by hand (the MLflow UI, ``mlflow experiments delete``) keeps its name, and restoring it
    brings back every run it held, those deleted one by one before included: a sweep starting (``new_sweep``) is
    refused in one line (:class:`~workflows.record.RecordError`) rather than mixed into them; one deleted while its
    sweep runs is restored for the rest of the sweep, with a warning.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))
        except mlflow.exceptions.MlflowException as err:
            # Made meanwhile by another process (two sweeps or commands started together on a new experiment).
            experiment = client.get_experiment_by_name(name) if err.error_code == "RESOURCE_ALREADY_EXISTS" else None
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        if new_sweep:
            raise RecordError(deleted_experiment(name, experiment.experiment_id, client.tracking_uri))
        logger.warning("experiment %r was deleted while its sweep ran: restored, with the runs it held",
                       name)
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _find_runs(client: MlflowClient, experiment_id: str, filter_string: str, page_size: int = 1000,
               deleted: bool = False) -> list:
    """Every run of the experiment that matches the filter, in MLflow's order (latest started first), page by
    page: a sweep may hold more runs than one search returns. ``deleted``: the runs deleted by hand too."""
    runs: list = []
    token = None
    view = mlflow.entities.ViewType.ALL if deleted else mlflow.entities.ViewType.ACTIVE_ONLY
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, run_view_type=view,
                                  max_results=page_size, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def check_reachable(client: MlflowClient, limit: float = DEFAULT_OUTAGE_LIMIT_S) -> None:
    """Wait (with backoff, at most ``limit`` seconds) until the tracking store answers.

    Raises:
        TrackingUnavailable: it did not answer in time; the message names the URI.
        TrackingStoreError: the URI names no store MLflow can open (a file store MLflow refuses, a database
            without its driver) or the server refuses the request (not an MLflow server, no access).
    """
    try:
        with quick_http_failures():
            call_with_retries(lambda: client.search_experiments(max_results=1), client.tracking_uri, limit,
                              what="reaching the tracking server")
    except TrackingUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - permanent: no store behind the URI (a retry cannot change that)
        raise _store_error(client.tracking_uri, err) from err


def find_sweep(client: MlflowClient, experiment: str, run_id: str | None = None, flag: str = "--resume"):
    """The sweep to resume: the parent run ``run_id``, or else the last sweep started in ``experiment`` that was
    not deleted by hand (a warning names it and the later ones deleted). Errors begin with ``flag``, the option
    that named the sweep.

    Returns:
        The parent run, or None when ``experiment`` has no sweep.

    Raises:
        ValueError: ``run_id`` is not a sweep's parent run, or it (or the experiment) was deleted.
    """
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except mlflow.exceptions.MlflowException as err:
            raise ValueError(f"{flag} {run_id}: no such run in {client.tracking_uri}") from err
        if run.data.tags.get(TAG_KIND) != KIND_SWEEP or not run.data.tags.get(TAG_SWEEP):
            raise ValueError(f"{flag} {run_id}: run {run_id} is not a sweep (tag {TAG_KIND}={KIND_SWEEP})")
        found = client.get_experiment(run.info.experiment_id)
        if found.lifecycle_stage == "deleted":
            raise ValueError(f"{flag} {run_id}: " + deleted_experiment(found.name, found.experiment_id,
                                                                     client.tracking_uri))
        if run.info.lifecycle_stage == "deleted":
            raise ValueError(f"{flag} {run_id}: " + deleted_run(run_id, f"a sweep of experiment {found.name!r}",
                                                              client.tracking_uri))
        return run
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    if found.lifecycle_stage == "deleted":
        raise ValueError(f"{flag}: " + deleted_experiment(experiment, found.experiment_id, client.tracking_uri))
    run, deleted = latest_sweep_left(client, found.experiment_id, experiment, flag=f"{flag} RUN_ID")
    if run is None and deleted:
        use = flag.lstrip("-").replace("-", " ")  # resume, warm start
        raise ValueError(f"{flag}: experiment {experiment!r} has no sweep left to {use}: "
                         + deleted_run(deleted[0], "its latest sweep", client.tracking_uri))
    return run


def sweep_state(run) -> str:
    """``running`` (or its driver died), ``interrupted`` or ``complete``: whether ``--resume`` has work to do."""
    state = run.data.tags.get(TAG_SWEEP_STATE)
    if state:
        return state
    return SWEEP_COMPLETE if run.info.status == "FINISHED" else SWEEP_INTERRUPTED  # a sweep from before the tag existed


def start_parent_run(client: MlflowClient, experiment: str, sweep_key: str, params: dict[str, Any],
                     resume: bool) -> str:
    """The sweep's parent run: created, or (on resume) the existing one for the same sweep reopened."""
    experiment_id = _experiment_id(client, experiment, new_sweep=True)
    if resume:
        existing = _find_runs(client, experiment_id, f"tags.`{TAG_SWEEP}` = '{sweep_key}' and "
                                                     f"tags.`{TAG_KIND}` = '{KIND_SWEEP}'")
        if existing:
            run_id = existing[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, TAG_SWEEP_STATE, SWEEP_RUNNING)
            logger.info("resuming MLflow parent run %s", run_id)
            return run_id
    run = client.create_run(experiment_id, tags={TAG_KIND: KIND_SWEEP, TAG_SWEEP: sweep_key,
                                                 TAG_SWEEP_STATE: SWEEP_RUNNING,
                                                 TAG_RUN_NAME: f"sweep-{Path(sweep_key).name}",
                                                 TAG_FINEPRUNE_VERSION: fineprune_version()})
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def open_parent_run(client: MlflowClient, experiment: str, sweep_key: str, params: dict[str, Any], resume: bool,
                    limit: float = DEFAULT_OUTAGE_LIMIT_S) -> str:
    """:func:`start_parent_run`, the sweep's first writes: retried while the store is away or locked (at most
    ``limit`` seconds; a retry finds the run an earlier attempt made rather than making another).

    Raises:
        TrackingUnavailable: the store stayed away or locked for longer than ``limit``.
        TrackingStoreError: the store refuses the writes (a read-only database, a server that refuses them).
    """
    attempts = []

    def start() -> str:
        attempts.append(None)
        return start_parent_run(client, experiment, sweep_key, params, resume or len(attempts) > 1)

    # MLflow logs each database error with its traceback before raising it; the retries, or the one line, say it.
    database_log = logging.getLogger("mlflow.store.db.utils")
    level = database_log.level
    database_log.setLevel(logging.CRITICAL)
    try:
        with quick_http_failures():
            return call_with_retries(start, client.tracking_uri, limit, what="starting the sweep's MLflow run")
    except mlflow.exceptions.MlflowException as err:  # permanent (a transient one ends as TrackingUnavailable)
        raise _store_error(client.tracking_uri, err) from err
    finally:
        database_log.setLevel(level)


def tag_warm_start(client: MlflowClient, run_id: str, sweep_run_id: str, trials: int,
                   store: str | None = None) -> None:
    """Record on a sweep's parent run the earlier sweep whose ``trials`` outcomes its sampler was told first, and
    the tracking URI of the store it is in when that is not the sweep's own (``store``)."""
    client.set_tag(run_id, TAG_WARM_START, sweep_run_id)
    client.set_tag(run_id, TAG_WARM_START_TRIALS, str(trials))
    if store is not None:
        client.set_tag(run_id, TAG_WARM_START_STORE, store)


def finish_parent_run(client: MlflowClient, run_id: str, status: str = "FINISHED", state: str = SWEEP_COMPLETE) -> None:
    client.set_tag(run_id, TAG_SWEEP_STATE, state)
    client.set_terminated(run_id, status=status)


def discard_parent_run(client: MlflowClient, run_id: str) -> None:
    """End and delete the run of a new sweep that could not start (Ray did not take it): it holds nothing, and
    ``--resume`` must find the experiment's last sweep that ran instead."""
    finish_parent_run(client, run_id, status="FAILED", state=SWEEP_INTERRUPTED)
    client.delete_run(run_id)


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any],
                existing: Mapping[str, str] | None = None) -> None:
    """Log those of ``params`` the run lacks; ``existing``: its params as just read (default: read here)."""
    flat = flat_params(params)
    if existing is None:
        existing = client.get_run(run_id).data.params
    batch = [mlflow.entities.Param(k[:250], v[:6000]) for k, v in flat.items() if k[:250] not in existing]
    for i in range(0, len(batch), 100):
        client.log_batch(run_id, params=batch[i:i + 100])


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


def log_baseline(client: MlflowClient, experiment: str, parent_run_id: str, metrics: dict[str, Any],
                 params: dict[str, Any], model_dir: str | None) -> str:
    """The dense model as a run of its own: the frontier's baseline point (density 1, speedup 1). A baseline run an
    earlier call left unfinished (the store went away as it was written; the call is retried) is completed."""
    experiment_id = _experiment_id(client, experiment)
    existing = _find_runs(client, experiment_id, f"tags.`{TAG_PARENT}` = '{parent_run_id}' and "
                                                 f"tags.`{TAG_KIND}` = '{KIND_BASELINE}'")
    if existing and existing[0].info.status == "FINISHED":
        return existing[0].info.run_id
    run = existing[0] if existing else client.create_run(experiment_id, tags={
        TAG_KIND: KIND_BASELINE, TAG_PARENT: parent_run_id, TAG_RUN_NAME: "dense-baseline",
        TAG_STATUS: STATUS_FINISHED, TAG_FINEPRUNE_VERSION: fineprune_version()})
    run_id = run.info.run_id
    _log_params(client, run_id, params, run.data.params)
    values = {LINEAR_DENSITY: 1.0, TOTAL_DENSITY: 1.0, HEADS_REMOVED: 0.0, SPEEDUP: 1.0, **_numeric(metrics)}
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in values.items()
                                      if k not in run.data.metrics])
    if model_dir:
        client.set_tag(run_id, TAG_MODEL_DIR, str(model_dir))
    client.set_terminated(run_id, "FINISHED")
    return run_id


@dataclass(frozen=True)
class TrialSnapshot:
    """What the callback needs of a Tune trial, copied in the Tune loop for the logging thread."""

    trial_id: str
    config: dict[str, Any]
    status: str  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    last_result: dict[str, Any]
    checkpoint: Any  # ray.tune.Checkpoint or None
    error_file: str | None  # the error file's name within the sweep's storage (``<trial dir>/error.txt``)
    num_failures: int
    error: str | None = None  # the last line of the trial's error: the exception that ended it

    @classmethod
    def of(cls, trial) -> "TrialSnapshot":
        error_file, error = None, None
        if getattr(trial, "error_file", None):  # the driver's staging copy, under Ray's session directory
            staged = Path(trial.error_file)
            # The copy that outlives the driver is the one Tune syncs to the sweep's storage, beside the checkpoints.
            error_file = f"{trial.storage.trial_dir_name}/{staged.name}"
            try:
                lines = [line.strip() for line in staged.read_text(errors="replace").splitlines() if line.strip()]
            except OSError:
                lines = []
            error = lines[-1] if lines else None
        return cls(trial.trial_id, dict(trial.config), trial.status, dict(trial.last_result or {}), trial.checkpoint,
                   error_file, int(getattr(trial, "num_failures", 0) or 0), error)


def _config_key(params: dict[str, str]) -> tuple:
    """A trial's searched values as logged (``searched.*`` params): equal keys, equal configuration."""
    return tuple(sorted((k, v) for k, v in params.items() if k.startswith(PARAM_SEARCHED)))


def _trial_config_key(config: dict[str, Any]) -> tuple:
    """The key of a trial's config (what Tune sampled), in the form :func:`_config_key` reads back."""
    return _config_key(flat_params({f"{PARAM_SEARCHED}{k}": v for k, v in config.items()}))


def _run_config_key(run) -> tuple:
    """The configuration a trial run belongs to: its ``fineprune.configuration`` tag, set with the run itself.

    The tag makes a run and its configuration one write; a driver that dies between creating a run and logging its
    params leaves a run that the next trial of that configuration still finds. Runs without the tag (written before
    it existed) are keyed by their params.
    """
    tagged = run.data.tags.get(TAG_CONFIGURATION)
    if tagged:
        try:
            return tuple(tuple(pair) for pair in json.loads(tagged))
        except (ValueError, TypeError):
            logger.warning("run %s: unreadable %s tag; keyed by its params", run.info.run_id, TAG_CONFIGURATION)
    return _config_key(run.data.params)


class MlflowTrialCallback(tune.Callback):
    """Logs every trial as a nested MLflow run of the sweep's parent run.

    MLflow calls run on a :class:`~workflows.retry.LogQueue` (in order, retried while the server is away); once an
    outage outlasts ``outage_limit``, the next Tune step raises the queue's :class:`TrackingUnavailable`.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name.
        parent_run_id: the sweep's run.
        params_of: maps a trial's config to the parameters to log (the full RunConfig of the trial).
        outage_limit: how long (seconds) the tracking server may be away before the sweep stops.
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, params_of,
                 outage_limit: float = DEFAULT_OUTAGE_LIMIT_S) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.params_of = params_of
        self.outage_limit = outage_limit
        self._reset()

    def _reset(self) -> None:
        self._runs: dict[str, str] = {}  # trial id -> run id; touched by the logging thread only
        self._described: set[str] = set()  # trials whose run has its params (logging thread only)
        self._orphans: dict[str, tuple] = {}  # run id -> config key of runs no trial of this Tune run owns
        self._deleted: set[str] = set()  # trials whose run was deleted by hand: left out (logging thread only)
        self._earlier: dict[str, str] = {}  # trial id -> run id that earlier sessions of the sweep made (Tune's state)
        self._listed: dict[str, Any] = {}  # run id -> the run as the sweep's last listing read it (logging thread)
        self._client: MlflowClient | None = None
        self._queue: LogQueue | None = None
        self._known: set[str] | None = None
        self._seen: dict[str, str] = {}  # trial id -> status at the end of the last Tune step
        self.trial_statuses: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the Tuner: the settings travel, the thread and the client do not.
        return {k: self.__dict__[k] for k in ("tracking_uri", "experiment", "parent_run_id", "params_of",
                                              "outage_limit")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def get_state(self) -> dict[str, Any]:
        """What Tune saves with the sweep's state: the run each trial was logged in, so that a resume knows a trial
        whose run is no longer in the store at all (removed for good by ``mlflow gc``) from one that never had one."""
        return {"runs": {**self._earlier, **dict(self._runs)}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._earlier = dict((state or {}).get("runs") or {})

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def failure(self) -> TrackingUnavailable | None:
        """Set once the tracking server stayed away longer than ``outage_limit``."""
        return self._queue.failure if self._queue is not None else None

    def flush(self) -> None:
        """Wait until every MLflow call queued so far ran (or the queue gave up on an outage)."""
        if self._queue is not None:
            self._queue.drain()

    def _submit(self, fn, what: str) -> None:
        if self._queue is None:
            self._queue = LogQueue(self.tracking_uri, self.outage_limit)
        self._queue.submit(fn, what)

    # ---- Tune hooks (the Tune loop: copy what is needed, queue the MLflow work) --------------------------------

    def _start(self, trials) -> None:
        if self._known is None:  # the trials Tune restored (none in a new sweep): every other run is an orphan
            self._known = {t.trial_id for t in trials}
            known = set(self._known)
            self._submit(lambda: self._load_orphans(known), "reading the sweep's runs")

    def on_step_begin(self, iteration, trials, **info):
        self._start(trials)
        if self.failure is not None:
            raise self.failure

    def on_step_end(self, iteration, trials, **info):
        self._seen = {t.trial_id: t.status for t in trials}

    def on_trial_start(self, iteration, trials, trial, **info):
        self._start(trials)
        trial_id, config = trial.trial_id, dict(trial.config)
        self._submit(lambda: self._run_for(trial_id, config, reopen=True), f"starting the run of trial {trial_id}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        trial_id, config, result = trial.trial_id, dict(trial.config), dict(result)
        self._submit(lambda: self._log_result(trial_id, config, result), f"logging a result of trial {trial_id}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        trial_id, config, failures = trial.trial_id, dict(trial.config), int(trial.num_failures)
        logger.warning("trial %s lost its worker (failure %d); it goes on from its last checkpoint", trial_id, failures)
        self._submit(lambda: self._tag_retry(trial_id, config, failures), f"tagging the retry of trial {trial_id}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        snapshot = replace(TrialSnapshot.of(trial), status="TERMINATED")
        self._submit(lambda: self._finish(snapshot), f"ending the run of trial {trial.trial_id}")

    def on_trial_error(self, iteration, trials, trial, **info):
        snapshot = replace(TrialSnapshot.of(trial), status="ERROR")
        self._submit(lambda: self._finish(snapshot), f"ending the run of trial {trial.trial_id}")

    def on_experiment_end(self, trials, **info):
        self._start(trials)
        # Tune stops the trials an interruption left running (and calls them TERMINATED) before this hook, after
        # saving its state; what they were at the end of the last step is what a resume will find.
        snapshots = [replace(s, status=self._seen.get(s.trial_id, s.status)) for s in map(TrialSnapshot.of, trials)]
        self.trial_statuses = {s.trial_id: s.status for s in snapshots}
        if self.failure is not None:
            return
        self._submit(lambda: self._reconcile(snapshots), "reconciling the sweep's runs with Tune's trials")
        logger.info("waiting for MLflow to take every result")
        self._queue.drain()
        self._queue.close()

    # ---- MLflow work (the logging thread) ---------------------------------------------------------------------

    def _trial_runs(self) -> list:
        """The sweep's trial runs (not those deleted by hand), latest started first, in one paged listing."""
        experiment_id = _experiment_id(self.client, self.experiment)
        return _find_runs(self.client, experiment_id, f"tags.`{TAG_PARENT}` = '{self.parent_run_id}' and "
                                                      f"tags.`{TAG_KIND}` = '{KIND_TRIAL}'")

    def _load_orphans(self, known: set[str]) -> None:
        runs = self._trial_runs()
        self._orphans = {r.info.run_id: _run_config_key(r) for r in runs
                         if r.data.tags.get(TAG_TRIAL) not in known}
        if self._orphans:
            logger.info("%d run(s) of this sweep belong to trials its Tune state does not know (its driver died); "
                        "a trial with the same configuration continues each", len(self._orphans))

    def _tag_retry(self, trial_id: str, config: dict[str, Any], failures: int) -> None:
        run_id = self._run_for(trial_id, config)
        if run_id is not None:
            self.client.set_tag(run_id, TAG_RETRIES, str(failures))

    def _run_for(self, trial_id: str, config: dict[str, Any], reopen: bool = False) -> str | None:
        """The trial's run: its own, one a lost trial with the same configuration left, or a new one; None when its
        own run was deleted by hand (the MLflow UI) between sessions of the sweep: the trial is left out of the
        record, with one warning, rather than logged again in a new run (and registered again)."""
        if trial_id in self._deleted:
            return None
        run_id = self._runs.get(trial_id)
        earlier = False  # the run was found, not made, here: an earlier session of the sweep had it
        if run_id is None:
            experiment_id = _experiment_id(self.client, self.experiment)
            existing = _find_runs(self.client, experiment_id, f"tags.`{TAG_PARENT}` = '{self.parent_run_id}' and "
                                                              f"tags.`{TAG_TRIAL}` = '{trial_id}'", deleted=True)
            active = [r for r in existing if r.info.lifecycle_stage != "deleted"]
            if existing and not active:
                self._deleted.add(trial_id)
                logger.warning("trial %s: its MLflow run %s was deleted; the trial is left out of the sweep's record "
                               "(restore the run, `%s`, before a resume to keep it)", trial_id,
                               existing[0].info.run_id,
                               restore_command(self.client.tracking_uri, existing[0].info.run_id))
                return None
            if not existing and self._removed(self._earlier.get(trial_id)):
                self._deleted.add(trial_id)
                logger.warning("trial %s: its MLflow run %s was removed for good (`mlflow gc`); the trial is left out "
                               "of the sweep's record", trial_id, self._earlier[trial_id])
                return None
            existing = active
            run_id = existing[0].info.run_id if existing else self._take_over(trial_id, config)
            earlier = run_id is not None
            if run_id is None:
                run_id = self.client.create_run(experiment_id, tags={
                    TAG_PARENT: self.parent_run_id, TAG_KIND: KIND_TRIAL, TAG_TRIAL: trial_id,
                    TAG_RUN_NAME: f"trial-{trial_id}", TAG_FINEPRUNE_VERSION: fineprune_version(),
                    TAG_CONFIGURATION: json.dumps(_trial_config_key(config))}).info.run_id
            self._runs[trial_id] = run_id
        if trial_id not in self._described:
            try:
                params = self.params_of(config)
            except Exception as err:  # a trial config that cannot be rendered must not stop the sweep
                logger.warning("could not log params of trial %s: %s", trial_id, err)
            else:
                listed = self._listed.get(run_id)
                _log_params(self.client, run_id, params, listed.data.params if listed is not None else None)
            self._described.add(trial_id)
        if reopen:
            run = self.client.get_run(run_id)
            if earlier:
                self._note_earlier_end(run)  # first: the compute up to that end, before this pause is added
                self._log_pause(run)
            for stale in (TAG_ERROR, TAG_ERROR_FILE):  # a failed run that runs again: its last end no longer holds
                if stale in run.data.tags:
                    self.client.delete_tag(run_id, stale)
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _removed(self, run_id: str | None) -> bool:
        """Whether the run ``run_id``, which an earlier session of the sweep made, is no longer in the store."""
        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return True
            raise
        return False

    def _note_earlier_end(self, run) -> None:
        """A run that had ended (finished, stopped early or failed) and runs again (a resume runs failed trials
        again): its end stays a step of the hypervolume series, as the sweep logged it then
        (:data:`~workflows.record.TAG_EARLIER_ENDS`); without it, the series of the resumed sweep would reorder the
        steps logged before and log second values at them."""
        status = run.data.tags.get(TAG_STATUS)
        if run.info.status == "RUNNING" or not run.info.end_time or status not in (
                STATUS_FINISHED, STATUS_STOPPED_EARLY, STATUS_FAILED):
            return
        ends = earlier_ends(run)
        if ends and ends[-1][0] == run.info.end_time:  # noted already (this call is a retry)
            return
        ends.append([int(run.info.end_time), round(_compute_s(run), 3), status])
        self.client.set_tag(run.info.run_id, TAG_EARLIER_ENDS, json.dumps(ends))

    def _log_pause(self, run) -> None:
        """Add to the run's ``paused_s`` the time since an earlier session last had it: since it was ended (the
        sweep was interrupted), or since its last report (the driver died and left it RUNNING). That time is no
        trial's compute, and the hypervolume's compute steps leave it out."""
        if run.info.status == "RUNNING":
            reports = self.client.get_metric_history(run.info.run_id, STEP)
            last = max([m.timestamp for m in reports] + [run.info.start_time or 0])
        else:
            last = run.info.end_time or 0
        if not last:
            return
        paused = run.data.metrics.get(PAUSED_S, 0.0) + max(0.0, time.time() - last / 1000)
        self.client.log_metric(run.info.run_id, PAUSED_S, round(paused, 3))

    def _take_over(self, trial_id: str, config: dict[str, Any]) -> str | None:
        key = _trial_config_key(config)
        run_id = next((r for r, k in self._orphans.items() if k and k == key), None)
        if run_id is None:
            return None
        lost = self.client.get_run(run_id).data.tags.get(TAG_TRIAL, "")
        self.client.set_tag(run_id, TAG_TOOK_OVER, lost)
        self.client.set_tag(run_id, TAG_TRIAL, trial_id)
        self.client.set_tag(run_id, TAG_RUN_NAME, f"trial-{trial_id}")
        del self._orphans[run_id]
        logger.info("trial %s runs the configuration of lost trial %s again, in its MLflow run %s", trial_id, lost,
                    run_id)
        return run_id

    def _log_result(self, trial_id: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        run_id = self._run_for(trial_id, config)
        if run_id is None:
            return
        values = _numeric(result)
        step = int(values.get(STEP, result.get("training_iteration", 0)))
        keep = {k: v for k, v in values.items() if not k.startswith(("time_", "timestamp", "pid", "iterations_"))
                and k not in ("training_iteration", "done")}
        self.client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, int(result.get("timestamp", 0)) * 1000,
                                                                      step) for k, v in keep.items()])
        tags = {TAG_NODE: result.get("node_id"), TAG_PID: result.get("pid"), TAG_PRECISION: result.get("precision")}
        for key, value in tags.items():
            if value:
                self.client.set_tag(run_id, key, str(value))

    def _finish(self, trial: TrialSnapshot, log_result: bool = False) -> None:
        """End the trial's run as Tune ended the trial (TERMINATED: finished or stopped early; ERROR: failed).

        A finished trial's packed model is logged as the ``packed_model`` artifact; when that fails for a reason no
        retry can change (no checkpoint, a checkpoint that cannot be read, an artifact store that refuses it), the
        run ends FAILED with the reason in its ``fineprune.error`` tag: a trial without its model must not look
        finished. A transient failure (the server is away) is raised, and the queue retries the whole call.
        """
        run_id = self._run_for(trial.trial_id, trial.config)
        if run_id is None:
            return
        result = trial.last_result
        if log_result and result:
            self._log_result(trial.trial_id, trial.config, result)
        if trial.status == "ERROR":
            self.client.set_tag(run_id, TAG_STATUS, STATUS_FAILED)
            if trial.error_file:
                sweep = self.client.get_run(self.parent_run_id).data.tags.get(TAG_SWEEP)
                where = f"{sweep}/{trial.error_file}" if sweep else trial.error_file
                self.client.set_tag(run_id, TAG_ERROR_FILE, where)
            if trial.error:
                self.client.set_tag(run_id, TAG_ERROR, trial.error[:5000])
            self.client.set_terminated(run_id, "FAILED")
            logger.warning("trial %s failed: %s", trial.trial_id, trial.error or "see its error file")
            return
        final = bool(result.get("final"))
        if final:
            error = self._log_packed_model(run_id, trial)
            if error is not None:
                self.client.set_tag(run_id, TAG_STATUS, STATUS_FAILED)
                self.client.set_tag(run_id, TAG_ERROR, error[:5000])
                self.client.set_terminated(run_id, "FAILED")
                logger.error("trial %s failed: %s", trial.trial_id, error)
                return
        status = STATUS_FINISHED if final else STATUS_STOPPED_EARLY
        self.client.set_tag(run_id, TAG_STATUS, status)
        self.client.set_terminated(run_id, "FINISHED")
        logger.info("trial %s %s: %s", trial.trial_id, status, _summary(result))

    def _log_packed_model(self, run_id: str, trial: TrialSnapshot) -> str | None:
        """Log the trial's final checkpoint (its packed model); the reason in one line when that cannot be done.

        Raises:
            Exception: a transient failure (see :func:`workflows.retry.is_transient`), for the queue to retry.
        """
        if trial.checkpoint is None:
            return "the packed model was not logged: the trial's final result has no checkpoint"
        try:
            with trial.checkpoint.as_directory() as path:
                if not Path(path).is_dir() or not any(Path(path).iterdir()):
                    # MLflow would log a missing directory as an empty one, without a word.
                    return f"the packed model was not logged: its checkpoint directory {path} is missing or empty"
                self.client.log_artifacts(run_id, path, artifact_path=ARTIFACT_PACKED_MODEL)
        except Exception as err:  # noqa: BLE001 - classified: a transient error is raised again
            if is_transient(err):
                raise
            text = " ".join(str(err).split())
            return f"the packed model was not logged: {type(err).__name__}: {text}"
        self.client.set_tag(run_id, TAG_PACKED_ARTIFACT, ARTIFACT_PACKED_MODEL)
        return None

    def _reconcile(self, trials: list[TrialSnapshot]) -> None:
        """Make MLflow say what Tune says: each trial's run ended as the trial ended, nothing left RUNNING.

        Results a dead driver or an absent tracking server did not log are logged here from Tune's restored trials.
        The sweep's runs are read in one listing, not one search and two reads a trial: a resumed sweep of a
        thousand trials, most of them ended in earlier sessions, would otherwise take a minute here on a local store.
        """
        runs = self._trial_runs()
        self._listed = {run.info.run_id: run for run in runs}
        for run in runs:  # latest started first, as _run_for takes a trial's run
            trial_id = run.data.tags.get(TAG_TRIAL)
            if trial_id and trial_id not in self._deleted:
                self._runs.setdefault(trial_id, run.info.run_id)
        for trial in trials:
            run_id = self._run_for(trial.trial_id, trial.config)
            if run_id is None:
                continue
            run = self._listed.get(run_id) or self.client.get_run(run_id)
            tags = run.data.tags
            if trial.status == "TERMINATED":
                final = bool(trial.last_result.get("final"))
                logged = ((run.info.status == "FINISHED" and tags.get(TAG_STATUS) in (STATUS_FINISHED,
                                                                                      STATUS_STOPPED_EARLY)
                           and (not final or tags.get(TAG_PACKED_ARTIFACT)))
                          or (run.info.status == "FAILED" and tags.get(TAG_STATUS) == STATUS_FAILED))
                if not logged:
                    logger.info("logging trial %s, which ended while its result could not be logged", trial.trial_id)
                    self._finish(trial, log_result=True)
            elif trial.status == "ERROR":
                if run.info.status != "FAILED":
                    self._finish(trial, log_result=True)
            elif run.info.status == "RUNNING":  # the sweep was interrupted; a resume continues this run
                self.client.set_tag(run_id, TAG_STATUS, STATUS_INTERRUPTED)
                self.client.set_terminated(run_id, "KILLED")
        for run_id in list(self._orphans):
            run = self._listed.get(run_id) or self.client.get_run(run_id)
            if run.info.status == "RUNNING":
                logger.warning("run %s of lost trial %s: no trial ran its configuration again; ended as KILLED",
                               run_id, run.data.tags.get(TAG_TRIAL))
                self.client.set_tag(run_id, TAG_STATUS, STATUS_ORPHANED)
                self.client.set_terminated(run_id, "KILLED")


def _summary(result: dict[str, Any]) -> str:
    return " ".join(f"{key}={figure(key, result[key])}" for key in (F1, EXACT_MATCH, LINEAR_DENSITY,
                                                                             HEADS_REMOVED, SPEEDUP)
                    if isinstance(result.get(key), (int, float)) and not isinstance(result.get(key), bool))


def trial_runs(client: MlflowClient, experiment: str, parent_run_id: str, include_baseline: bool = False) -> list:
    """The sweep's trial runs (and optionally its baseline run)."""
    experiment_id = _experiment_id(client, experiment)
    runs = _find_runs(client, experiment_id, f"tags.`{TAG_PARENT}` = '{parent_run_id}'")
    kinds = {KIND_TRIAL, KIND_BASELINE} if include_baseline else {KIND_TRIAL}
    return [r for r in runs if r.data.tags.get(TAG_KIND) in kinds]


def log_json(client: MlflowClient, run_id: str, value: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
        client.log_artifact(run_id, str(path))


def tag_runs(client: MlflowClient, runs: Iterable, tag: str, chosen: set[str]) -> None:
    """Tag each of ``runs`` ``tag=true`` when it is in ``chosen``, else ``false`` (see :func:`tag_frontiers`)."""
    tag_frontiers(client, runs, {tag: chosen})


def tag_frontiers(client: MlflowClient, runs: Iterable, chosen: dict[str, set[str]]) -> None:
    """Tag each of ``runs`` with every ``tag`` of ``chosen``: ``true`` when the run is in its set, else ``false``.

    A run is written to only where one of its tags (as ``runs`` hold them) changes, and once for all of them: a
    sweep's runs are tagged again at every end of the sweep (each resume), and most of them keep their tags.
    """
    for run in runs:
        run_id = run.info.run_id
        tags = [mlflow.entities.RunTag(tag, value) for tag, value in
                ((tag, "true" if run_id in ids else "false") for tag, ids in chosen.items())
                if run.data.tags.get(tag) != value]
        if tags:
            client.log_batch(run_id, tags=tags)


def _compute_s(run) -> float:
    """The compute seconds of a trial run up to its (last) end: its wall time less the time it stood ended between
    sessions of the sweep (``paused_s``)."""
    wall = (run.info.end_time - run.info.start_time) / 1000.0
    return max(0.0, wall - run.data.metrics.get(PAUSED_S, 0.0))


def earlier_ends(run) -> list[list]:
    """The ends of a trial run before it ran again (:data:`~workflows.record.TAG_EARLIER_ENDS`): ``[end_ms,
    compute_s, status]`` each, oldest first; none for a run that ended once (or whose tag cannot be read)."""
    try:
        ends = json.loads(run.data.tags.get(TAG_EARLIER_ENDS) or "[]")
        return [[int(end), float(compute), str(status)] for end, compute, status in ends]
    except (TypeError, ValueError):
        logger.warning("run %s: unreadable %s tag; its earlier ends are left out", run.info.run_id, TAG_EARLIER_ENDS)
        return []


def hypervolume_series(runs: Iterable, objectives, reference: dict[str, float]) -> list[dict[str, float]]:
    """The frontier's hypervolume as the sweep's trials completed, from their runs.

    Trials count in the order they ended (any status: a failed or stopped trial adds a step but no volume); a trial
    run again after it ended (a resume runs failed trials again) counts each time it ended, its earlier ends where
    they were; an interrupted trial has not ended (a resume continues it). So a resumed sweep's series extends the
    one logged before. Only finished trials take part in the frontier, as for the ``pareto`` tags. The dense
    baseline, when among ``runs``, is the starting point (step 0). Compute seconds are the summed wall time of the
    trial runs up to each end, less the time a run stood ended between sessions (``paused_s``).

    Returns:
        One ``{"trials", "compute_s", "hypervolume", "time_ms"}`` row per step, starting with step 0 (``time_ms``:
        when the step's trial ended; for step 0, when the baseline was logged or the first trial ended).
    """
    runs = list(runs)
    baseline = [r for r in runs if r.data.tags.get(TAG_KIND) == KIND_BASELINE]

    def point(run, status: str) -> dict[str, Any]:
        return dict(run.data.metrics) if status == STATUS_FINISHED else {}

    ends = []  # (end_ms, run id, the point it adds, its compute seconds)
    for run in (r for r in runs if r.data.tags.get(TAG_KIND) == KIND_TRIAL):
        done = 0.0
        for end_ms, compute, status in earlier_ends(run):
            ends.append((end_ms, run.info.run_id, point(run, status), max(0.0, compute - done)))
            done = max(done, compute)
        status = run.data.tags.get(TAG_STATUS, STATUS_FINISHED)
        if run.info.end_time and status != STATUS_INTERRUPTED:
            ends.append((run.info.end_time, run.info.run_id, point(run, status), max(0.0, _compute_s(run) - done)))
    ends.sort(key=lambda end: (end[0], end[1]))

    values = hypervolume_progress([point(r, r.data.tags.get(TAG_STATUS, STATUS_FINISHED)) for r in baseline[:1]]
                                  + [end[2] for end in ends], objectives, reference)
    if not baseline:
        values = [0.0] + values
    start = baseline[0].info.end_time if baseline and baseline[0].info.end_time else None
    rows, seconds, when = [], 0.0, start or (ends[0][0] if ends else 0)
    for n, value in enumerate(values):
        if n:
            when, _, _, compute = ends[n - 1]
            seconds += compute
        rows.append({"trials": n, "compute_s": round(seconds, 3), "hypervolume": value, "time_ms": int(when)})
    return rows


def log_search(client: MlflowClient, run_id: str, search: dict[str, Any]) -> None:
    """Log how the sweep's search went on its parent run (:func:`workflows.sweep.run_sweep`'s ``search``): metrics
    ``search_repeats`` (suggestions of configurations that already ran, answered without a trial) and
    ``search_steered`` (untried configurations run in their place), and the tag ``fineprune.search_over`` when the
    search ended on its own before ``num_samples`` trials."""
    now = int(time.time() * 1000)
    metrics = [mlflow.entities.Metric(name, float(search[key]), now, 0)
               for name, key in ((SEARCH_REPEATS, "repeats"), (SEARCH_STEERED, "steered"))]
    tags = [mlflow.entities.RunTag(TAG_SEARCH_OVER, search["over"])] if search.get("over") else []
    client.log_batch(run_id, metrics=metrics, tags=tags)


def log_hypervolume(client: MlflowClient, run_id: str, series: list[dict[str, float]]) -> None:
    """Log a :func:`hypervolume_series` on the sweep's parent run, twice: stepped by completed trials
    (``hypervolume``) and by trial compute seconds (``hypervolume_by_compute_s``), and the compute seconds of each
    step by completed trials (``trial_compute_s``).

    MLflow's steps are whole numbers: the compute steps are whole seconds, where trials that end within the same
    second share one (the latest value), while ``trial_compute_s`` keeps each step's seconds as they are, which the
    report pairs with ``hypervolume``. Entries already in the run's history (a resumed sweep) are not logged again.
    """
    for name, step_key, value_key in ((HYPERVOLUME, "trials", "hypervolume"),
                                      (HYPERVOLUME_COMPUTE, "compute_s", "hypervolume"),
                                      (TRIAL_COMPUTE, "trials", "compute_s")):
        logged = {(m.step, m.value) for m in client.get_metric_history(run_id, name)}
        batch = [mlflow.entities.Metric(name, float(row[value_key]), int(row.get("time_ms", 0)),
                                        int(round(row[step_key])))
                 for row in series if (int(round(row[step_key])), float(row[value_key])) not in logged]
        for i in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[i:i + 1000])
