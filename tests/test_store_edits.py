"""The store as a person leaves it: runs, versions, experiments and files deleted or edited by hand (the MLflow UI,
``mlflow`` commands) between fineprune commands. Each command skips what is gone with a warning, or stops with one
line naming it (exit 2); none restores, registers or reports what was deleted as if it were there.

Real SQLite MLflow stores in a temporary directory, edited with MlflowClient as the UI edits them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from workflows import record, tracking
from workflows.cli import main

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


def _last_error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_new_sweep_into_a_deleted_experiment_is_refused_and_leaves_its_runs_deleted(tmp_path, monkeypatch, capsys):
    """MLflow keeps a deleted experiment's name: restoring it would bring back every run it held (one deleted by hand
    before the experiment, too) and mix the new sweep into them."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("smoke", artifact_location=(tmp_path / "artifacts").as_uri())
    old = tracking.start_parent_run(client, "smoke", "/sweeps/old", {}, resume=False)
    removed = client.create_run(experiment_id).info.run_id
    client.delete_run(removed)
    client.delete_experiment(experiment_id)
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--space", str(SPACES / "smoke.yaml"), "--tracking-uri", uri]) == 2
    line = _last_error(capsys)
    assert line.startswith(f"fineprune sweep: error: experiment 'smoke' in {uri} was deleted (id {experiment_id}): ")
    assert "mlflow experiments restore" in line and "--experiment" in line
    assert client.get_experiment(experiment_id).lifecycle_stage == "deleted"
    assert {client.get_run(run_id).info.lifecycle_stage for run_id in (old, removed)} == {"deleted"}
    assert len(client.search_runs([experiment_id], run_view_type=3)) == 2  # no new run
    # --resume finds no sweep to continue there either, and says why.
    assert main(["sweep", "--space", str(SPACES / "smoke.yaml"), "--tracking-uri", uri, "--resume"]) == 2
    assert "experiment 'smoke'" in (line := _last_error(capsys)) and "was deleted" in line
    assert main(["sweep", "--space", str(SPACES / "smoke.yaml"), "--tracking-uri", uri, "--resume", old]) == 2
    assert f"--resume {old}: experiment 'smoke'" in _last_error(capsys)
    assert client.get_experiment(experiment_id).lifecycle_stage == "deleted"


def test_a_deleted_sweep_run_named_by_id_is_one_line(tmp_path, monkeypatch, capsys):
    """``--resume RUN_ID`` of a deleted sweep would start another parent run beside it (whose trials would run
    again in new runs); ``report --sweep-run`` would report it as if it were there."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("smoke", artifact_location=(tmp_path / "artifacts").as_uri())
    kept = tracking.start_parent_run(client, "smoke", "/sweeps/kept", {}, resume=False)
    tracking.finish_parent_run(client, kept)
    gone = tracking.start_parent_run(client, "smoke", "/sweeps/gone", {}, resume=False)
    tracking.finish_parent_run(client, gone, status="KILLED", state=record.SWEEP_INTERRUPTED)
    client.delete_run(gone)
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--space", str(SPACES / "smoke.yaml"), "--tracking-uri", uri, "--resume", gone]) == 2
    line = _last_error(capsys)
    assert line == (f"fineprune sweep: error: --resume {gone}: run {gone} (a sweep of experiment 'smoke') was deleted; "
                    f"restore it (`mlflow runs restore --run-id {gone}`) to use it again")
    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [kept]  # no parent run made beside it
    assert main(["report", "--experiment", "smoke", "--tracking-uri", uri, "--out", "r", "--sweep-run", gone]) == 2
    assert _last_error(capsys) == (f"fineprune report: error: run {gone} (a sweep of experiment 'smoke') was deleted; "
                                   f"restore it (`mlflow runs restore --run-id {gone}`) to use it again")
    assert not (tmp_path / "r" / "report.md").exists()
