"""The Tune callback that writes a sweep's record: a trial whose packed model cannot be logged fails, visibly.

Real SQLite MLflow stores and Ray's own ``Trial`` objects, driven through the callback's Tune hooks.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from ray import tune
from ray.train._internal.session import _TrainingResult
from ray.tune.experiment import Trial

from workflows import record
from workflows.registry import register_champion
from workflows.tracking import MlflowTrialCallback, start_parent_run

from conftest import sqlite_store

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


def _params_of(config):
    return {"method": "topk", **{f"searched.{k}": v for k, v in config.items()}}


def _finished_trial(trial_id: str, density: float, checkpoint_dir=None) -> Trial:
    """A trial that ended with its final result (and the packed model as its last checkpoint, when given)."""
    trial = Trial("trial_main", config={"target_density": density}, trial_id=trial_id, stub=True)
    result = {"step": 6, "f1": 50.0 + 100 * density, "linear_density": density, "final": True,
              "timestamp": int(time.time())}
    if checkpoint_dir is not None:
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir))
        trial.run_metadata.checkpoint_manager.register_checkpoint(_TrainingResult(checkpoint=checkpoint,
                                                                                  metrics=result))
    trial.update_last_result(result)
    trial.set_status(Trial.TERMINATED)
    return trial


def _packed_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    return path


def _run_sweep_of(client: MlflowClient, experiment: str, sweep: str, trials: list[Trial], params_of=_params_of) -> str:
    parent = start_parent_run(client, experiment, sweep, {}, resume=False)
    callback = MlflowTrialCallback(client.tracking_uri, experiment, parent, params_of, outage_limit=30)
    callback.on_step_begin(iteration=0, trials=[])
    for trial in trials:
        callback.on_trial_start(iteration=0, trials=trials, trial=trial)
        callback.on_trial_result(iteration=0, trials=trials, trial=trial, result=trial.last_result)
        callback.on_trial_complete(iteration=0, trials=trials, trial=trial)
    callback.on_experiment_end(trials=trials)
    assert callback.failure is None  # the sweep itself goes on
    return parent


def _runs_by_trial(client: MlflowClient, parent: str) -> dict[str, object]:
    table = record.trials(client, parent, include_baseline=False)
    return {client.get_run(run_id).data.tags[record.TAG_TRIAL]: client.get_run(run_id) for run_id in table["run_id"]}


def test_a_trial_whose_packed_model_is_missing_fails(tmp_path):
    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    client.create_experiment("exp", artifact_location=(tmp_path / "artifacts").as_uri())
    emptied = tmp_path / "emptied"
    emptied.mkdir()
    trials = [_finished_trial("good", 0.3, _packed_dir(tmp_path / "good")),
              _finished_trial("no_checkpoint", 0.4),
              _finished_trial("emptied", 0.5, emptied)]  # its checkpoint directory lost its files
    parent = _run_sweep_of(client, "exp", str(tmp_path / "sweep"), trials)

    runs = _runs_by_trial(client, parent)
    good = runs["good"]
    assert good.info.status == "FINISHED" and good.data.tags[record.TAG_STATUS] == "finished"
    assert good.data.tags[record.TAG_PACKED_ARTIFACT] == "packed_model"
    assert {a.path for a in client.list_artifacts(good.info.run_id, "packed_model")} == {
        "packed_model/config.json", "packed_model/model.safetensors"}
    for trial_id, reason in (("no_checkpoint", "has no checkpoint"), ("emptied", "is missing or empty")):
        run = runs[trial_id]
        assert run.info.status == "FAILED" and run.data.tags[record.TAG_STATUS] == "failed", trial_id
        assert record.TAG_PACKED_ARTIFACT not in run.data.tags
        error = run.data.tags[record.TAG_ERROR]
        assert error.startswith("the packed model was not logged") and reason in error and "\n" not in error


def test_a_refused_upload_fails_its_trial_and_the_champion_is_chosen_without_it(tmp_path):
    """The artifact store refuses the upload (its location is a file): the trial fails with the reason, and the
    registry's selection sees a failed trial instead of a finished one without its model."""
    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    client.create_experiment("refused", artifact_location=blocked.as_uri())
    trials = [_finished_trial("t1", 0.3, _packed_dir(tmp_path / "t1"))]
    parent = _run_sweep_of(client, "refused", str(tmp_path / "sweep"), trials)

    run = _runs_by_trial(client, parent)["t1"]
    assert run.info.status == "FAILED" and run.data.tags[record.TAG_STATUS] == "failed"
    assert "NotADirectoryError" in run.data.tags[record.TAG_ERROR]
    assert run.data.metrics["f1"] == pytest.approx(80.0)  # its results stay in the record
    table = record.trials(client, parent)
    assert list(table["status"]) == ["failed"]
    chosen = register_champion(client, "refused", parent, record.RegistrySpec("m", max_density=1.0))
    assert chosen == {"registered": False, "policy": "best_f1_under_density", "name": "m",
                      "reason": "no trial to choose: its one trial did not finish with a packed model (failed)"}


def test_a_resumed_sweeps_hypervolume_extends_the_series_logged_before(tmp_path):
    """Session 1: trial a finishes, b is interrupted. Session 2 (a resume, 1.5 s later): c finishes, then b. The
    interrupted b is no step of the first series, so the second extends it; the 1.5 s b stood ended are no compute."""
    from workflows.frontier import reference_point
    from workflows.tracking import hypervolume_series, log_hypervolume, trial_runs

    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    client.create_experiment("resumed", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = start_parent_run(client, "resumed", str(tmp_path / "sweep"), {}, resume=False)
    objectives = record.DENSITY_OBJECTIVES
    reference = reference_point(objectives)

    def series():
        rows = hypervolume_series(trial_runs(client, "resumed", parent, include_baseline=True), objectives, reference)
        log_hypervolume(client, parent, rows)
        return rows

    a = _finished_trial("a", 0.5, _packed_dir(tmp_path / "a"))
    b = Trial("trial_main", config={"target_density": 0.2}, trial_id="b", stub=True)
    first = MlflowTrialCallback(client.tracking_uri, "resumed", parent, _params_of, outage_limit=30)
    first.on_step_begin(iteration=0, trials=[])
    for trial in (a, b):
        first.on_trial_start(iteration=0, trials=[a, b], trial=trial)
    b.update_last_result({"step": 3, "f1": 10.0, "linear_density": 0.2, "timestamp": int(time.time())})
    first.on_trial_result(iteration=0, trials=[a, b], trial=b, result=b.last_result)
    first.on_trial_result(iteration=0, trials=[a, b], trial=a, result=a.last_result)
    first.on_trial_complete(iteration=0, trials=[a, b], trial=a)
    first.on_experiment_end(trials=[a, b])  # b still runs: its run ends "interrupted"
    assert _runs_by_trial(client, parent)["b"].data.tags[record.TAG_STATUS] == "interrupted"
    before = series()
    assert [row["trials"] for row in before] == [0, 1]

    time.sleep(1.5)
    c = _finished_trial("c", 0.4, _packed_dir(tmp_path / "c"))
    b_again = _finished_trial("b", 0.2, _packed_dir(tmp_path / "b"))
    second = MlflowTrialCallback(client.tracking_uri, "resumed", parent, _params_of, outage_limit=30)
    second.on_step_begin(iteration=0, trials=[b_again])
    for trial in (b_again, c):
        second.on_trial_start(iteration=0, trials=[b_again, c], trial=trial)
    for trial in (c, b_again):
        second.on_trial_result(iteration=0, trials=[b_again, c], trial=trial, result=trial.last_result)
        second.on_trial_complete(iteration=0, trials=[b_again, c], trial=trial)
    second.on_experiment_end(trials=[b_again, c])
    after = series()

    assert [row["trials"] for row in after] == [0, 1, 2, 3]
    assert after[:2] == before  # the steps logged before keep their values
    runs = _runs_by_trial(client, parent)
    assert runs["b"].data.metrics[record.PAUSED_S] >= 1.4 and record.PAUSED_S not in runs["c"].data.metrics
    wall = {t: (r.info.end_time - r.info.start_time) / 1000 for t, r in runs.items()}
    assert after[-1]["compute_s"] == pytest.approx(sum(wall.values()) - runs["b"].data.metrics[record.PAUSED_S],
                                                   abs=0.01)
    for name in (record.HYPERVOLUME, record.HYPERVOLUME_COMPUTE):  # one value per step, never falling
        history = record.metric_history(client, parent, name)
        assert [value for _, value in history] == sorted(value for _, value in history), name
    assert len(record.metric_history(client, parent, record.HYPERVOLUME)) == 4


def test_a_failed_trial_run_again_by_a_resume_keeps_the_steps_logged_before(tmp_path):
    """Session 1: a finishes, b fails, c finishes. Session 2 (a resume runs the failed b again): b finishes. b's
    run ended again later than c, and the series, ordered by the runs' ends, moved c a step earlier: the parent run
    then held two hypervolume values at the steps between (a zigzag in its chart). b's first end stays a step where
    it was, and its second is a new one."""
    from workflows.frontier import reference_point
    from workflows.tracking import earlier_ends, hypervolume_series, log_hypervolume, trial_runs

    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    client.create_experiment("rerun", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = start_parent_run(client, "rerun", str(tmp_path / "sweep"), {}, resume=False)
    objectives = record.DENSITY_OBJECTIVES

    def series():
        rows = hypervolume_series(trial_runs(client, "rerun", parent, include_baseline=True), objectives,
                                  reference_point(objectives))
        log_hypervolume(client, parent, rows)
        return rows

    a = _finished_trial("a", 0.5, _packed_dir(tmp_path / "a"))
    b = Trial("trial_main", config={"target_density": 0.2}, trial_id="b", stub=True)
    c = _finished_trial("c", 0.3, _packed_dir(tmp_path / "c"))
    first = MlflowTrialCallback(client.tracking_uri, "rerun", parent, _params_of, outage_limit=30)
    first.on_step_begin(iteration=0, trials=[])
    for trial in (a, b, c):
        first.on_trial_start(iteration=0, trials=[a, b, c], trial=trial)
    first.on_trial_result(iteration=0, trials=[a, b, c], trial=a, result=a.last_result)
    first.on_trial_complete(iteration=0, trials=[a, b, c], trial=a)
    first.flush()
    time.sleep(0.05)
    b.update_last_result({"step": 3, "f1": 10.0, "linear_density": 0.2, "timestamp": int(time.time())})
    b.set_status(Trial.ERROR)
    first.on_trial_error(iteration=0, trials=[a, b, c], trial=b)
    first.flush()
    time.sleep(0.05)
    first.on_trial_result(iteration=0, trials=[a, b, c], trial=c, result=c.last_result)
    first.on_trial_complete(iteration=0, trials=[a, b, c], trial=c)
    first.on_experiment_end(trials=[a, b, c])
    before = series()
    assert [row["trials"] for row in before] == [0, 1, 2, 3]
    assert before[2]["hypervolume"] == before[1]["hypervolume"] < before[3]["hypervolume"]  # b failed: no volume
    failed_at = _runs_by_trial(client, parent)["b"].info.end_time

    time.sleep(0.5)
    b_again = _finished_trial("b", 0.2, _packed_dir(tmp_path / "b"))
    second = MlflowTrialCallback(client.tracking_uri, "rerun", parent, _params_of, outage_limit=30)
    second.on_step_begin(iteration=0, trials=[b_again])
    second.on_trial_start(iteration=0, trials=[b_again], trial=b_again)
    second.on_trial_result(iteration=0, trials=[b_again], trial=b_again, result=b_again.last_result)
    second.on_trial_complete(iteration=0, trials=[b_again], trial=b_again)
    second.on_experiment_end(trials=[b_again])
    after = series()

    run = _runs_by_trial(client, parent)["b"]
    assert run.info.status == "FINISHED" and [end[0] for end in earlier_ends(run)] == [failed_at]
    assert [row["trials"] for row in after] == [0, 1, 2, 3, 4]
    assert after[:4] == before and after[4]["hypervolume"] > after[3]["hypervolume"]
    runs = _runs_by_trial(client, parent)
    wall = {t: (r.info.end_time - r.info.start_time) / 1000 for t, r in runs.items()}
    assert after[-1]["compute_s"] == pytest.approx(sum(wall.values()) - run.data.metrics[record.PAUSED_S], abs=0.01)
    for name in (record.HYPERVOLUME, record.TRIAL_COMPUTE):  # one value per step
        steps = [step for step, _ in record.metric_history(client, parent, name)]
        assert len(steps) == len(set(steps)) == 5, name


@pytest.mark.parametrize("uri", ["file:///{tmp}/mlruns", "{tmp}/mlruns", "mysql://user@127.0.0.1/mlflow"])
def test_a_tracking_uri_with_no_store_behind_it_stops_the_sweep_in_one_line(tmp_path, monkeypatch, capsys, uri):
    """A file store (which MLflow refuses) or a database without its driver: exit 2, one line naming the URI,
    before anything is written."""
    from workflows import cli

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = uri.format(tmp=tmp_path)
    status = cli.main(["sweep", "--space", str(SPACES / "smoke.yaml"), "--tracking-uri", uri,
                       "--storage-path", str(tmp_path / "ray")])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"fineprune sweep: error: tracking URI {uri}: "), lines[-1]
    assert "Traceback" not in "\n".join(lines)
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlruns").exists()


def test_a_crashed_trial_fails_with_its_exception_and_an_error_file_that_outlives_the_driver(tmp_path):
    """A trial whose trainable raised: its run ends FAILED, tagged with the exception's line and the error file in
    the sweep's storage (not the driver's copy under Ray's session directory, which goes with the session); the
    other trial finishes. Run again by a resume, the run loses the stale error tags."""
    import logging

    import ray
    from ray.train._internal.storage import StorageContext

    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    client.create_experiment("crash", artifact_location=(tmp_path / "artifacts").as_uri())
    sweep = tmp_path / "storage" / "crash-1"
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        storage = StorageContext(storage_path=str(sweep.parent), experiment_dir_name=sweep.name,
                                 trial_dir_name="trial_main_bad")
        crashed = Trial("trial_main", config={"target_density": 0.6}, trial_id="bad", stub=True, storage=storage)
        Path(crashed.local_path).mkdir(parents=True)  # the driver's staging directory, as Tune makes it
        crashed.handle_error(RuntimeError("attention_block: 24x24 does not divide the 32x32 matrix"))
        crashed.set_status(Trial.ERROR)
        staged = crashed.error_file
        good = _finished_trial("good", 0.3, _packed_dir(tmp_path / "good"))
        parent = start_parent_run(client, "crash", str(sweep), {}, resume=False)
        callback = MlflowTrialCallback(client.tracking_uri, "crash", parent, _params_of, outage_limit=30)
        trials = [good, crashed]
        callback.on_step_begin(iteration=0, trials=[])
        for trial in trials:
            callback.on_trial_start(iteration=0, trials=trials, trial=trial)
        callback.on_trial_result(iteration=0, trials=trials, trial=good, result=good.last_result)
        callback.on_trial_complete(iteration=0, trials=trials, trial=good)
        callback.on_trial_error(iteration=0, trials=trials, trial=crashed)
        callback.on_experiment_end(trials=trials)
        assert callback.failure is None
    finally:
        ray.shutdown()

    runs = _runs_by_trial(client, parent)
    assert runs["good"].info.status == "FINISHED"
    failed = runs["bad"]
    assert failed.info.status == "FAILED" and failed.data.tags[record.TAG_STATUS] == "failed"
    assert failed.data.tags[record.TAG_ERROR] == "attention_block: 24x24 does not divide the 32x32 matrix"
    error_file = failed.data.tags[record.TAG_ERROR_FILE]
    assert error_file == f"{sweep}/trial_main_bad/error.txt" and error_file != staged

    # A resume runs the failed trial again in its run: the error of its last end is gone.
    callback = MlflowTrialCallback(client.tracking_uri, "crash", parent, _params_of, outage_limit=30)
    callback.on_step_begin(iteration=0, trials=[crashed])
    callback.on_trial_start(iteration=0, trials=[crashed], trial=crashed)
    callback.flush()
    tags = client.get_run(failed.info.run_id).data.tags
    assert record.TAG_ERROR not in tags and record.TAG_ERROR_FILE not in tags


def test_runs_are_found_past_one_page_of_search_results(tmp_path):
    """A sweep can hold more runs than one MLflow search returns: each page is read, in MLflow's order."""
    from workflows.tracking import _find_runs

    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    experiment_id = client.create_experiment("many", artifact_location=(tmp_path / "artifacts").as_uri())
    made = [client.create_run(experiment_id, tags={"mlflow.parentRunId": "p"}).info.run_id for _ in range(5)]
    client.create_run(experiment_id, tags={"mlflow.parentRunId": "other"})
    paged = _find_runs(client, experiment_id, "tags.`mlflow.parentRunId` = 'p'", page_size=2)
    whole = client.search_runs([experiment_id], filter_string="tags.`mlflow.parentRunId` = 'p'")
    assert [r.info.run_id for r in paged] == [r.info.run_id for r in whole]
    assert sorted(r.info.run_id for r in paged) == sorted(made)


def test_a_resume_reconciles_the_trials_ended_before_from_one_listing(tmp_path, monkeypatch):
    """A resumed sweep's end searched the store once for each trial its Tune state restored and read each run twice
    more (three calls a trial, doing nothing for the ended ones: a minute for a thousand trials on a local store,
    more through a server). One listing of the sweep's runs serves them all now, and a restored trial's run that
    lacks its params (its driver died before logging them) still gets them."""
    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    client.create_experiment("many", artifact_location=(tmp_path / "artifacts").as_uri())
    ended = [_finished_trial(f"t{i}", round(0.1 + i / 20, 2), _packed_dir(tmp_path / f"t{i}")) for i in range(8)]

    def params_of(config):  # the first driver got no params of t3 written
        if config["target_density"] == 0.25:
            raise RuntimeError("the driver died here")
        return _params_of(config)

    parent = _run_sweep_of(client, "many", str(tmp_path / "sweep"), ended, params_of)
    assert not _runs_by_trial(client, parent)["t3"].data.params

    searches, reads = [], []
    search_runs, get_run = MlflowClient.search_runs, MlflowClient.get_run

    def counted_search(self, *args, **kwargs):
        searches.append(kwargs.get("filter_string"))
        return search_runs(self, *args, **kwargs)

    def counted_read(self, run_id):
        reads.append(run_id)
        return get_run(self, run_id)

    monkeypatch.setattr(MlflowClient, "search_runs", counted_search)
    monkeypatch.setattr(MlflowClient, "get_run", counted_read)
    fresh = _finished_trial("new", 0.05, _packed_dir(tmp_path / "new"))
    trials = [*ended, fresh]
    resumed = MlflowTrialCallback(client.tracking_uri, "many", parent, _params_of, outage_limit=30)
    resumed.on_step_begin(iteration=0, trials=ended)
    resumed.on_trial_start(iteration=0, trials=trials, trial=fresh)
    resumed.on_trial_result(iteration=0, trials=trials, trial=fresh, result=fresh.last_result)
    resumed.on_trial_complete(iteration=0, trials=trials, trial=fresh)
    resumed.flush()
    searches.clear(), reads.clear()
    resumed.on_experiment_end(trials=trials)
    assert resumed.failure is None
    assert len(searches) == 1 and len(reads) <= 1, (searches, reads)  # the listing; not a search or read a trial
    monkeypatch.undo()
    runs = _runs_by_trial(client, parent)
    assert set(runs) == {f"t{i}" for i in range(8)} | {"new"}
    assert all(run.info.status == "FINISHED" for run in runs.values())
    assert runs["t3"].data.params["searched.target_density"] == "0.25"


def test_a_baseline_run_left_half_written_is_completed_when_logged_again(tmp_path):
    """The sweep logs its dense baseline again when the store went away as it was written: the run made before the
    store went away was taken for the baseline as it stood (no metrics, RUNNING), and the frontier lost its dense
    point. It is completed now."""
    from workflows.tracking import log_baseline

    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    experiment_id = client.create_experiment("half", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = start_parent_run(client, "half", str(tmp_path / "sweep"), {}, resume=False)
    half = client.create_run(experiment_id, tags={record.TAG_KIND: record.KIND_BASELINE, record.TAG_PARENT: parent})
    client.log_batch(half.info.run_id, metrics=[mlflow.entities.Metric("f1", 80.0, 0, 0)])
    run_id = log_baseline(client, "half", parent, {"f1": 80.0, "exact_match": 70.0}, {"model": "m"}, "teacher")
    assert run_id == half.info.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model"] == "m"
    assert run.data.metrics == {"f1": 80.0, "exact_match": 70.0, "linear_density": 1.0, "total_density": 1.0,
                                "heads_removed": 0.0, "speedup": 1.0}
    assert len(client.get_metric_history(run_id, "f1")) == 1
    assert log_baseline(client, "half", parent, {"f1": 1.0}, {}, None) == run_id  # finished: left as it is
    assert client.get_run(run_id).data.metrics["f1"] == 80.0
