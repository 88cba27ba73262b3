"""The record of a sweep in MLflow: what tracking writes is what the registry, the report and the CLI read back.

Real SQLite MLflow stores in temporary directories; runs written with the writers of ``workflows.tracking``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from workflows import frontier, record, tracking
from workflows.cli import main
from workflows.record import RecordError, RegistrySpec
from workflows.report import collect_report_data, render_markdown
from workflows.space import load_space

from conftest import sqlite_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(tmp_path) -> MlflowClient:
    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    client.create_experiment("exp", artifact_location=(tmp_path / "artifacts").as_uri())
    return client


def _trial(client: MlflowClient, parent: str, name: str, metrics: dict[str, float], searched: dict[str, str],
           status: str | None = "finished") -> str:
    tags = {record.TAG_KIND: record.KIND_TRIAL, record.TAG_PARENT: parent, record.TAG_RUN_NAME: name}
    if status is not None:
        tags[record.TAG_STATUS] = status
    experiment_id = client.get_experiment_by_name("exp").experiment_id
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for key, value in searched.items():
        client.log_param(run_id, f"{record.PARAM_SEARCHED}{key}", value)
    return run_id


def test_the_registry_spec_round_trips_through_the_sweeps_parent_run(client):
    """Written as the sweep writes its space, read back as the same dataclass, for every policy."""
    space = load_space(ROOT / "tune_spaces" / "smoke.yaml")
    for spec in (space.registry, RegistrySpec("m", "min_density_within_f1_drop", max_f1_drop=2.5),
                 RegistrySpec("m", "best_f1_under_latency", max_latency_ms=12.0),
                 RegistrySpec("m", max_density=0.3, onnx=False),
                 RegistrySpec("m", max_int8_f1_drop=None), RegistrySpec("m", max_int8_f1_drop=2.5)):
        summary = {**space.summary(), "registry": asdict(spec)}
        parent = tracking.start_parent_run(client, "exp", f"/sweeps/{spec.policy}", summary, resume=False)
        params = client.get_run(parent).data.params
        assert RegistrySpec.from_params(params) == spec
        assert record.params_under(params, record.PARAM_REGISTRY) == \
            record.params_under(spec.to_params(), record.PARAM_REGISTRY)
        assert record.sweep_objectives(params) == space.objectives
    with pytest.raises(RecordError, match="registry.name"):
        RegistrySpec.from_params({"registry.policy": "best_f1_under_density"})
    with pytest.raises(RecordError, match="registry.max_density: not a number"):
        RegistrySpec.from_params({"registry.name": "m", "registry.max_density": "half"})
    with pytest.raises(RecordError, match="registry.onnx: not true or false: 'maybe'"):
        RegistrySpec.from_params({"registry.name": "m", "registry.onnx": "maybe"})
    # A record another release wrote: `register` stopped with select_champion's ValueError and its traceback.
    with pytest.raises(RecordError, match=r"^param registry.policy: unknown policy 'best_f1_ever' \(allowed: "
                                          r"best_f1_under_density, "):
        RegistrySpec.from_params({"registry.name": "m", "registry.policy": "best_f1_ever"})


def test_trials_is_the_sweeps_runs_table(client):
    parent = tracking.start_parent_run(client, "exp", "/sweeps/a", {}, resume=False)
    first = _trial(client, parent, "trial-1", {"f1": 50.0, "linear_density": 0.3}, {"target_density": "0.3"})
    second = _trial(client, parent, "trial-2", {"f1": 40.0}, {"target_density": "0.5", "temperature": "2"},
                    status=None)  # a run the sweep did not end: what MLflow says
    client.set_terminated(second, "KILLED")
    client.set_tag(first, record.TAG_PARETO, "true")
    client.set_tag(first, record.TAG_PACKED_ARTIFACT, record.ARTIFACT_PACKED_MODEL)
    baseline = tracking.log_baseline(client, "exp", parent, {"f1": 60.0}, {"model": "m"}, None)
    failed = _trial(client, parent, "trial-3", {}, {}, status="failed")
    client.set_tag(failed, record.TAG_ERROR, "ValueError: bad <input>")
    client.set_tag(failed, record.TAG_ERROR_FILE, "/sweeps/a/trial-3/error.txt")
    other = tracking.start_parent_run(client, "exp", "/sweeps/b", {}, resume=False)
    _trial(client, other, "elsewhere", {"f1": 1.0}, {})  # another sweep's trial: not in this table

    table = record.trials(client, parent)
    assert isinstance(table, pd.DataFrame)
    assert list(table["run_id"]) == [baseline, first, second, failed]  # the baseline, then trials as they started
    assert list(table.columns[:len(record.COLUMNS)]) == list(record.COLUMNS)
    by_id = table.set_index("run_id")
    assert list(by_id["kind"]) == ["baseline", "trial", "trial", "trial"]
    assert list(by_id["status"]) == ["finished", "finished", "stopped_early", "failed"]
    assert by_id.loc[failed, "error"] == "ValueError: bad <input>" and pd.isna(by_id.loc[first, "error"])
    assert by_id.loc[failed, "error_file"] == "/sweeps/a/trial-3/error.txt"
    # The runs the tracking writers make record the release that made them; a run made otherwise (or before runs
    # recorded it) has none.
    release = record.fineprune_version()
    assert release != "unknown" and client.get_run(parent).data.tags[record.TAG_FINEPRUNE_VERSION] == release
    assert by_id.loc[baseline, "fineprune_version"] == release and pd.isna(by_id.loc[first, "fineprune_version"])
    assert by_id.loc[first, "pareto"] and not by_id.loc[second, "pareto"] and by_id.loc[first, "packed"]
    assert table["pareto"].dtype == bool and table["packed"].dtype == bool
    assert by_id.loc[baseline, "speedup"] == 1.0 and math.isnan(by_id.loc[second, "linear_density"])
    assert by_id.loc[second, "searched.temperature"] == "2" and pd.isna(by_id.loc[first, "searched.temperature"])
    assert list(record.trials(client, parent, include_baseline=False)["run_id"]) == [first, second, failed]


def test_an_infinite_metric_reads_back_as_logged_and_the_report_shows_none(client):
    """MLflow's SQL store keeps an infinite value as the largest float: the trial table showed it as a 309-digit
    number and the speedup plot's axis ran to 1e308."""
    parent = tracking.start_parent_run(client, "exp", "/sweeps/a", {}, resume=False)
    run = _trial(client, parent, "trial-1", {"f1": 50.0, "speedup": math.inf, "loss": -math.inf}, {})
    assert client.get_run(run).data.metrics["speedup"] == 1.7976931348623157e308  # what the store gives back
    row = record.trials(client, parent).set_index("run_id").loc[run]
    assert row["speedup"] == math.inf and row["loss"] == -math.inf and row["f1"] == 50.0
    assert "179769313" not in render_markdown(collect_report_data("exp", client.tracking_uri, parent))


def test_latest_sweep_names_what_is_missing(client, tmp_path):
    uri = client.tracking_uri
    with pytest.raises(RecordError, match=f"^experiment 'nope' not found in {uri}$"):
        record.latest_sweep(client, "nope")
    with pytest.raises(RecordError, match="has no sweep run"):
        record.latest_sweep(client, "exp")
    first = tracking.start_parent_run(client, "exp", "/sweeps/a", {}, resume=False)
    trial = _trial(client, first, "trial-1", {}, {})
    second = tracking.start_parent_run(client, "exp", "/sweeps/b", {}, resume=False)
    assert record.latest_sweep(client, "exp").info.run_id == second
    with pytest.raises(RecordError, match=f"^experiment 'exq' not found in {uri}; did you mean 'exp'\\?$"):
        record.latest_sweep(client, "exq")
    assert record.latest_sweep(client, "exp", first).info.run_id == first
    with pytest.raises(RecordError, match=f"run {trial} is not a sweep"):
        record.latest_sweep(client, "exp", trial)
    with pytest.raises(RecordError, match=f"run {'0' * 32} is not in {uri} \\(removed for good"):
        record.latest_sweep(client, "exp", "0" * 32)


@pytest.mark.parametrize("command", [["register", "--experiment", "nope"],
                                     ["report", "--experiment", "nope", "--out", "report"]])
def test_an_unknown_experiment_is_one_line_and_exit_2(command, tmp_path, monkeypatch, capsys):
    """Both commands read the store ``MLFLOW_TRACKING_URI`` names, as ``sweep`` does."""
    uri = f"sqlite:///{tmp_path}/env.db"
    MlflowClient(tracking_uri=uri).search_experiments()  # a store that holds no such experiment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == f"fineprune {command[0]}: error: experiment 'nope' not found in {uri}"
    assert not (tmp_path / "mlflow.db").exists()  # the default store was never touched


@pytest.mark.parametrize("written", ["my%20runs/mlflow.db", "my%20runs/mlflow.db?timeout=20"])
def test_a_sqlite_uri_with_escapes_or_options_is_the_database_mlflow_opens(written, tmp_path, monkeypatch, capsys):
    # the database was taken as "my%20runs/mlflow.db" (or "mlflow.db?timeout=20"): report and register said there
    # was none, and a new experiment kept its artifacts in a directory named "my%20runs"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my runs").mkdir()
    uri = f"sqlite:///{written}"
    tracking.client_for(uri).search_experiments()
    assert (tmp_path / "my runs" / "mlflow.db").is_file()
    assert main(["report", "--experiment", "nope", "--out", "report", "--tracking-uri", uri]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"fineprune report: error: experiment 'nope' not found in {uri}"
    assert tracking.artifact_location(uri, "e") == (tmp_path / "my runs" / "mlartifacts" / "e").as_uri()
    assert record.sqlite_database(uri) == Path("my runs/mlflow.db")


def test_register_reads_the_spec_the_sweep_recorded(client, tmp_path, monkeypatch, capsys, caplog):
    """``fineprune register`` with the store from the environment: the recorded policy, nothing qualifies. The
    result is printed all the same, but the command exits 4, not 0: a script that goes on to serve the champion
    must not take a registration that chose nothing for one that did."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    spec = RegistrySpec("exp-model", "best_f1_under_density", max_density=0.2)
    parent = tracking.start_parent_run(client, "exp", "/sweeps/a", {"registry": asdict(spec)}, resume=False)
    run_id = _trial(client, parent, "trial-1", {"f1": 50.0, "linear_density": 0.5}, {})
    client.set_tag(run_id, record.TAG_PACKED_ARTIFACT, record.ARTIFACT_PACKED_MODEL)
    assert main(["register", "--experiment", "exp"]) == 4
    out, err = capsys.readouterr()
    assert json.loads(out) == {"registered": False, "policy": "best_f1_under_density", "name": "exp-model",
                               "reason": "no trial satisfies the registry policy best_f1_under_density "
                                         "(max_density 0.2)", "sweep_run_id": parent}
    assert "Traceback" not in err and any("satisfies the registry policy" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("policy", ["min_density_within_f1_drop", "fastest_within_f1_drop"])
def test_register_under_an_f1_drop_policy_without_a_dense_f1_is_one_line(client, monkeypatch, capsys, policy):
    """A sweep stopped before its teacher was scored has no baseline run: a policy measured from the dense F1
    cannot choose among its trials, which is one line naming the sweep and the policy (exit 2), not a traceback;
    with no trial to choose from, nothing meets the policy (exit 4)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    spec = RegistrySpec("exp-model", policy, max_f1_drop=2.0)
    parent = tracking.start_parent_run(client, "exp", "/sweeps/a", {"registry": asdict(spec)}, resume=False)
    assert main(["register", "--experiment", "exp"]) == 4
    assert json.loads(capsys.readouterr().out)["registered"] is False
    run_id = _trial(client, parent, "trial-1", {"f1": 50.0, "linear_density": 0.5, "speedup": 2.0}, {})
    client.set_tag(run_id, record.TAG_PACKED_ARTIFACT, record.ARTIFACT_PACKED_MODEL)
    assert main(["register", "--experiment", "exp"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"fineprune register: error: sweep run {parent} records no F1 of its dense baseline (no baseline run with an "
        f"f1 metric), which the registry policy {policy} needs; nothing registered as champion (pass --space with "
        "another policy)")


def test_the_report_shows_the_version_the_sweep_made_champion_after_the_alias_moved_on(client, tmp_path):
    """A later sweep under the same registered model moved the ``champion`` alias: an earlier sweep's report shows
    the version that sweep chose (tagged with its policy), pinned, not merely its newest frontier version; a sweep
    that chose none reports none, whatever versions its frontier got."""
    spec = RegistrySpec("shared-model", "best_f1_under_density", max_density=0.5)
    parents = [tracking.start_parent_run(client, "exp", f"/sweeps/{i}", {"registry": asdict(spec)}, resume=False)
               for i in range(3)]
    client.create_registered_model("shared-model")

    def version(parent: str, policy: bool) -> str:
        trial = _trial(client, parent, "trial", {"f1": 50.0, "linear_density": 0.4}, {})
        tags = {"sweep_run_id": parent, "fineprune.trial_run_id": trial, "pareto": "true",
                **({"policy": spec.policy} if policy else {})}
        return client.create_model_version("shared-model", source=(tmp_path / trial).as_uri(), run_id=trial,
                                           tags=tags).version

    chose, _ = version(parents[0], policy=True), version(parents[0], policy=False)  # the champion, then a frontier point
    version(parents[1], policy=False)  # a frontier, but no trial met the policy
    client.set_registered_model_alias("shared-model", "champion", version(parents[2], policy=True))

    card = collect_report_data("exp", client.tracking_uri, parents[0]).champion
    assert card is not None and card.version == str(chose) and not card.alias_current
    assert card.model_uri == f"models:/shared-model/{chose}"
    assert collect_report_data("exp", client.tracking_uri, parents[1]).champion is None
    assert collect_report_data("exp", client.tracking_uri, parents[2]).champion.alias_current


def test_the_report_draws_the_frontier_the_sweep_tagged_for_its_objectives(client):
    """A sweep over exact match and total density: the report's frontier is its ``pareto`` tags, not the
    frontier of F1 and linear density."""
    objectives = [("exact_match", "max"), ("total_density", "min")]
    parent = tracking.start_parent_run(client, "exp", "/sweeps/a", {"objectives": objectives}, resume=False)
    values = {  # name: (exact_match, total_density, f1, linear_density)
        "a": (50.0, 0.50, 60.0, 0.30),
        "b": (55.0, 0.60, 55.0, 0.45),  # on the EM/total frontier only
        "c": (40.0, 0.70, 65.0, 0.60),  # on the F1/linear frontier only
    }
    ids = {name: _trial(client, parent, name, dict(zip(("exact_match", "total_density", "f1", "linear_density"), v)),
                        {}) for name, v in values.items()}
    runs = [client.get_run(run_id) for run_id in ids.values()]
    front = frontier.pareto_front([r.data.metrics for r in runs], objectives)
    tracking.tag_runs(client, runs, record.TAG_PARETO, {runs[i].info.run_id for i in front})
    assert {client.get_run(i).data.tags[record.TAG_RUN_NAME] for i in ids.values()
            if client.get_run(i).data.tags[record.TAG_PARETO] == "true"} == {"a", "b"}

    data = collect_report_data("exp", tracking_uri=client.tracking_uri)
    assert data.objectives == objectives
    assert set(data.frontier()["name"]) == {"a", "b"}
    text = render_markdown(data)
    table = text.split("## Pareto frontier: exact match against total density", 1)[1].split("\n## ", 1)[0]
    assert [line.split(" | ")[0].strip("| ") for line in table.strip().splitlines()[2:]] == ["a", "b"]


def test_a_metric_is_shown_with_its_own_decimals_whole_or_not():
    """Scores with 2 decimals and fractions with 3 even when whole (a log read "exact_match 42" beside "f1 34.67"
    and "heads_removed=30.000"); counts whole; a missing or non-finite value as '-'."""
    from workflows.record import figure

    assert [figure("exact_match", 42), figure("f1", 41.0577), figure("linear_density", 0.3058449)] == [
        "42.00", "41.06", "0.306"]
    assert [figure("heads_removed", 30), figure("heads_removed", 30.0), figure("speedup", 1.8873)] == [
        "30", "30", "1.89"]
    assert [figure("f1", None), figure("f1", float("nan")), figure("f1", True), figure("f1", "41")] == ["-"] * 4


def test_a_store_in_a_directory_named_with_spaces_or_letters_gets_no_escaped_twin(tmp_path, monkeypatch):
    """The absolute URI a report and a suggested command hand on was percent-escaped whole: MLflow makes the
    database's directory from the URI as written, so a sweep run in "proj dir" made an empty "proj%20dir" beside it
    (and failed at its end where the parent took no new entries). Only "%" and "?" are escaped, which SQLAlchemy
    would misread; the URI reads back as the same database."""
    directory = tmp_path / "proj dir é日本 #&"
    directory.mkdir()
    monkeypatch.chdir(directory)
    uri = record.portable_uri("sqlite:///mlflow.db?timeout=20")
    assert uri == f"sqlite:///{directory}/mlflow.db?timeout=20"
    tracking.client_for(uri).search_experiments()
    assert (directory / "mlflow.db").is_file() and [p.name for p in tmp_path.iterdir()] == [directory.name]
    # "%" and "?" in a name are escaped (MLflow still makes a twin directory of the escaped name for those).
    odd = tmp_path / "pct%41 q?x"
    odd.mkdir()
    monkeypatch.chdir(odd)
    uri = record.portable_uri("sqlite:///mlflow.db")
    assert uri == f"sqlite:///{tmp_path}/pct%2541 q%3Fx/mlflow.db"
    assert record.sqlite_database(uri) == odd / "mlflow.db"
    tracking.client_for(uri).search_experiments()
    assert (odd / "mlflow.db").is_file()
