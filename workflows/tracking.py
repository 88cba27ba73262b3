"""MLflow tracking for sweeps: one parent run per sweep, one nested run per trial, all logged from the driver.

Trials never talk to MLflow. Their metrics reach the driver through ``tune.report``; a Tune callback logs them,
attaches the packed model (the trial's final checkpoint) as an artifact, and ends each run with the trial: finished,
stopped early by the scheduler, or failed. No run is left RUNNING. Runs are found again by tags, so a resumed sweep
reuses its parent run and its trials' runs instead of duplicating them.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune

__all__ = [
    "DEFAULT_TRACKING_URI",
    "TAG_KIND",
    "TAG_TRIAL",
    "TAG_SWEEP",
    "TAG_PARETO",
    "FINAL_METRICS",
    "client_for",
    "start_parent_run",
    "log_baseline",
    "MlflowTrialCallback",
    "trial_runs",
    "finish_parent_run",
    "METRIC_HYPERVOLUME",
    "METRIC_HYPERVOLUME_COMPUTE",
    "hypervolume_series",
    "log_hypervolume",
]

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_KIND = "fineprune.kind"  # sweep | trial | baseline
TAG_SWEEP = "fineprune.sweep"  # the sweep's storage path: identifies a sweep across resumes
TAG_TRIAL = "fineprune.trial_id"
TAG_STATUS = "fineprune.status"  # finished | stopped_early | failed
TAG_PARETO = "pareto"
TAG_PARETO_SPEED = "pareto_speedup"
TAG_NODE = "fineprune.node_id"
PARENT = "mlflow.parentRunId"
FINAL_METRICS = ("exact_match", "f1", "linear_density", "total_density", "heads_removed", "speedup")
METRIC_HYPERVOLUME = "hypervolume"  # on the parent run, step = trials completed
METRIC_HYPERVOLUME_COMPUTE = "hypervolume_by_compute_s"  # the same values, step = trial seconds spent so far


def client_for(tracking_uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store, else the server's default.

    Without this, a SQLite-backed experiment writes its artifacts to ``./mlruns`` of whatever directory the
    driver happens to run in.
    """
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///"):]).resolve()
        return (database.parent / "mlartifacts" / experiment).as_uri()
    return None


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _find_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    return client.search_runs([experiment_id], filter_string=filter_string, max_results=1000)


def start_parent_run(client: MlflowClient, experiment: str, sweep_key: str, params: dict[str, Any],
                     resume: bool) -> str:
    """The sweep's parent run: created, or (on resume) the existing one for the same sweep reopened."""
    experiment_id = _experiment_id(client, experiment)
    if resume:
        existing = _find_runs(client, experiment_id, f"tags.`{TAG_SWEEP}` = '{sweep_key}' and "
                                                     f"tags.`{TAG_KIND}` = 'sweep'")
        if existing:
            run_id = existing[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            logger.info("resuming MLflow parent run %s", run_id)
            return run_id
    run = client.create_run(experiment_id, tags={TAG_KIND: "sweep", TAG_SWEEP: sweep_key,
                                                 "mlflow.runName": f"sweep-{Path(sweep_key).name}"})
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def finish_parent_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(run_id, status=status)


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    flat = _flat(params)
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
    """The dense model as a run of its own: the frontier's baseline point (density 1, speedup 1)."""
    experiment_id = _experiment_id(client, experiment)
    existing = _find_runs(client, experiment_id, f"tags.`{PARENT}` = '{parent_run_id}' and "
                                                 f"tags.`{TAG_KIND}` = 'baseline'")
    if existing:
        return existing[0].info.run_id
    run = client.create_run(experiment_id, tags={TAG_KIND: "baseline", PARENT: parent_run_id,
                                                 "mlflow.runName": "dense-baseline", TAG_STATUS: "finished"})
    run_id = run.info.run_id
    _log_params(client, run_id, params)
    values = {"linear_density": 1.0, "total_density": 1.0, "heads_removed": 0.0, "speedup": 1.0,
              **_numeric(metrics)}
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in values.items()])
    if model_dir:
        client.set_tag(run_id, "fineprune.model_dir", str(model_dir))
    client.set_terminated(run_id, "FINISHED")
    return run_id


class MlflowTrialCallback(tune.Callback):
    """Logs every trial as a nested MLflow run of the sweep's parent run.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name.
        parent_run_id: the sweep's run.
        params_of: maps a trial's config to the parameters to log (the full RunConfig of the trial).
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, params_of) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.params_of = params_of
        self._runs: dict[str, str] = {}
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _run_for(self, trial) -> str:
        trial_id = trial.trial_id
        if trial_id in self._runs:
            return self._runs[trial_id]
        experiment_id = _experiment_id(self.client, self.experiment)
        existing = _find_runs(self.client, experiment_id, f"tags.`{PARENT}` = '{self.parent_run_id}' and "
                                                          f"tags.`{TAG_TRIAL}` = '{trial_id}'")
        if existing:
            run_id = existing[0].info.run_id
            if existing[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, tags={
                PARENT: self.parent_run_id, TAG_KIND: "trial", TAG_TRIAL: trial_id,
                "mlflow.runName": f"trial-{trial_id}"})
            run_id = run.info.run_id
            try:
                _log_params(self.client, run_id, self.params_of(trial.config))
            except Exception as err:  # a trial config that cannot be rendered must not stop the sweep
                logger.warning("could not log params of trial %s: %s", trial_id, err)
        self._runs[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        values = _numeric(result)
        step = int(values.get("step", result.get("training_iteration", 0)))
        keep = {k: v for k, v in values.items() if not k.startswith(("time_", "timestamp", "pid", "iterations_"))
                and k not in ("training_iteration", "done")}
        self.client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, int(result.get("timestamp", 0)) * 1000,
                                                                      step) for k, v in keep.items()])
        if result.get("node_id"):
            self.client.set_tag(run_id, TAG_NODE, str(result["node_id"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        result = trial.last_result or {}
        final = bool(result.get("final"))
        status = "finished" if final else "stopped_early"
        self.client.set_tag(run_id, TAG_STATUS, status)
        if final and trial.checkpoint is not None:
            try:
                with trial.checkpoint.as_directory() as path:
                    self.client.log_artifacts(run_id, path, artifact_path="packed_model")
                self.client.set_tag(run_id, "fineprune.packed_artifact", "packed_model")
            except Exception as err:
                logger.warning("could not log the packed model of trial %s: %s", trial.trial_id, err)
        self.client.set_terminated(run_id, "FINISHED")
        logger.info("trial %s %s: %s", trial.trial_id, status, _summary(result))

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self.client.set_tag(run_id, TAG_STATUS, "failed")
        error = getattr(trial, "error_file", None)
        if error:
            self.client.set_tag(run_id, "fineprune.error_file", str(error))
        self.client.set_terminated(run_id, "FAILED")
        logger.warning("trial %s failed", trial.trial_id)

    def on_experiment_end(self, trials, **info):
        # Anything the scheduler or an interruption left open is closed, never left RUNNING.
        for trial in trials:
            run_id = self._runs.get(trial.trial_id)
            if run_id and self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "KILLED")


def _summary(result: dict[str, Any]) -> str:
    parts = []
    for key in ("f1", "exact_match", "linear_density", "heads_removed", "speedup"):
        if key in result and isinstance(result[key], (int, float)):
            parts.append(f"{key}={result[key]:.3f}" if isinstance(result[key], float) else f"{key}={result[key]}")
    return " ".join(parts)


def trial_runs(client: MlflowClient, experiment: str, parent_run_id: str, include_baseline: bool = False) -> list:
    """The sweep's trial runs (and optionally its baseline run)."""
    experiment_id = _experiment_id(client, experiment)
    runs = _find_runs(client, experiment_id, f"tags.`{PARENT}` = '{parent_run_id}'")
    kinds = {"trial", "baseline"} if include_baseline else {"trial"}
    return [r for r in runs if r.data.tags.get(TAG_KIND) in kinds]


def log_json(client: MlflowClient, run_id: str, value: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
        client.log_artifact(run_id, str(path))


def tag_runs(client: MlflowClient, runs: Iterable, tag: str, chosen: set[str]) -> None:
    for run in runs:
        client.set_tag(run.info.run_id, tag, "true" if run.info.run_id in chosen else "false")


def hypervolume_series(runs: Iterable, objectives, reference: dict[str, float]) -> list[dict[str, float]]:
    """The frontier's hypervolume as the sweep's trials completed, from their runs.

    Trials count in the order they ended (any status: a failed or stopped trial adds a step but no volume); only
    finished trials take part in the frontier, as for the ``pareto`` tags. The dense baseline, when among ``runs``,
    is the starting point (step 0). Compute seconds are the summed wall time of the trial runs that ended so far.

    Returns:
        One ``{"trials", "compute_s", "hypervolume", "time_ms"}`` row per step, starting with step 0 (``time_ms``:
        when the step's trial ended; for step 0, when the baseline was logged or the first trial ended).
    """
    from workflows.frontier import hypervolume_progress

    runs = list(runs)
    baseline = [r for r in runs if r.data.tags.get(TAG_KIND) == "baseline"]
    ended = sorted((r for r in runs if r.data.tags.get(TAG_KIND) == "trial" and r.info.end_time),
                   key=lambda r: (r.info.end_time, r.info.run_id))

    def point(run) -> dict[str, Any]:
        if run.data.tags.get(TAG_STATUS, "finished") != "finished":
            return {}
        return dict(run.data.metrics)

    values = hypervolume_progress([point(r) for r in baseline[:1] + ended], objectives, reference)
    if not baseline:
        values = [0.0] + values
    start = baseline[0].info.end_time if baseline and baseline[0].info.end_time else None
    rows, seconds, when = [], 0.0, start or (ended[0].info.end_time if ended else 0)
    for n, value in enumerate(values):
        if n:
            run = ended[n - 1]
            seconds += max(0.0, (run.info.end_time - run.info.start_time) / 1000.0)
            when = run.info.end_time
        rows.append({"trials": n, "compute_s": round(seconds, 3), "hypervolume": value, "time_ms": int(when)})
    return rows


def log_hypervolume(client: MlflowClient, run_id: str, series: list[dict[str, float]]) -> None:
    """Log a :func:`hypervolume_series` on the sweep's parent run, twice: stepped by completed trials
    (:data:`METRIC_HYPERVOLUME`) and by trial compute seconds (:data:`METRIC_HYPERVOLUME_COMPUTE`).

    Entries already in the run's history (a resumed sweep) are not logged again.
    """
    for name, step_key in ((METRIC_HYPERVOLUME, "trials"), (METRIC_HYPERVOLUME_COMPUTE, "compute_s")):
        logged = {(m.step, m.value) for m in client.get_metric_history(run_id, name)}
        batch = [mlflow.entities.Metric(name, float(row["hypervolume"]), int(row.get("time_ms", 0)),
                                        int(round(row[step_key])))
                 for row in series if (int(round(row[step_key])), float(row["hypervolume"])) not in logged]
        for i in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[i:i + 1000])
