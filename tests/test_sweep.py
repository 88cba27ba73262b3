"""The smoke sweep end to end: real local Ray, real SQLite MLflow store, every trial killed once and retried."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import sqlite_store
from workflows.sweep import CHECKPOINT_KIND, trial_scratch

ROOT = Path(__file__).resolve().parents[1]


def _sweep_argv(space: dict, tmp_path: Path, name: str, *options: str) -> tuple[list[str], str]:
    """The command line of ``fineprune sweep`` of ``space`` (written to ``tmp_path/name.yaml``), with a SQLite store
    and Tune storage under ``tmp_path`` and any further ``options``; and the tracking URI."""
    space_path = tmp_path / f"{name}.yaml"
    space_path.write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return [sys.executable, "-m", "workflows.cli", "sweep", "--space", str(space_path), "--tracking-uri", uri,
            "--storage-path", str(tmp_path / "ray"), *options], uri


def sweep_command(space: dict, tmp_path: Path, name: str, *options: str) -> tuple[subprocess.CompletedProcess, str]:
    """``fineprune sweep`` as a user runs it (see :func:`_sweep_argv`), in ``tmp_path``; the finished process and
    the tracking URI."""
    argv, uri = _sweep_argv(space, tmp_path, name, *options)
    # What the command line sets for Ray's output when the user has not: a command run in this process has set them
    # here, for the rest of the session.
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_DEDUP_LOGS", "RAY_COLOR_PREFIX")}
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**env, "PYTHONPATH": str(ROOT)})
    return proc, uri


def _worker_progress_bars(stderr: str) -> list[str]:
    """The tqdm bars in a sweep's stderr that Ray forwarded from a worker (a bar starts with a carriage return,
    which text mode reads as a line break after the worker's prefix)."""
    return re.findall(r"\((?:trial_main|_dense_teacher) pid=\d+\)\S* *[\r\n]?[^\r\n]*?\d+%\|[^\r\n]*", stderr)


@pytest.fixture(scope="module")
def retried_sweep(tmp_path_factory):
    """The smoke space with one retry per trial, and a fault that kills every trial's worker once."""
    from workflows.sweep import FAULT_ENV, run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    space.update(name="retried", max_failures=1, scheduler=None)
    space_path = tmp / "retried.yaml"
    space_path.write_text(yaml.safe_dump(space))
    faults = tmp / "faults"
    os.environ[FAULT_ENV] = str(faults)
    try:
        summary = run_sweep(space_path, tracking_uri=f"sqlite:///{tmp}/mlflow.db", storage_path=str(tmp / "ray"),
                            report_dir=tmp / "report", address="local")
    finally:
        os.environ.pop(FAULT_ENV, None)
    return {"summary": summary, "tmp": tmp, "space": space_path, "faults": faults}


def _client(summary):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=summary["tracking_uri"])


def _runs(summary):
    from workflows import tracking

    return tracking.trial_runs(_client(summary), summary["experiment"], summary["parent_run_id"],
                               include_baseline=True)


def test_every_trial_was_killed_once_retried_and_finished(retried_sweep):
    summary = retried_sweep["summary"]
    runs = _runs(summary)
    trials = [r for r in runs if r.data.tags["fineprune.kind"] == "trial"]
    assert len(trials) == 4
    assert len(list(retried_sweep["faults"].glob("*.failed"))) == 4  # each worker died once ...
    for run in trials:  # ... and each trial resumed from its checkpoint and finished, in one MLflow run
        assert run.info.status == "FINISHED"
        assert run.data.tags["fineprune.status"] == "finished"
        for key in ("exact_match", "f1", "linear_density", "total_density", "heads_removed", "speedup",
                    "max_logit_diff", "params_before", "params_after"):
            assert math.isfinite(run.data.metrics[key]), key
        assert run.data.metrics["params_after"] < run.data.metrics["params_before"]
        assert run.data.metrics["max_logit_diff"] <= 1e-3
        assert run.data.params["method"] == "topk"
        assert "searched.target_density" in run.data.params
        assert run.data.tags.get("fineprune.packed_artifact") == "packed_model"
    densities = sorted(round(r.data.metrics["linear_density"], 3) for r in trials)
    assert len(set(densities)) > 1  # the search spread the trials over density
    parent = _client(summary).get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in _client(summary).list_artifacts(summary["parent_run_id"])}
    # The frontier tables and the report (whose plots draw the frontier) are logged on the parent run.
    assert {"frontier.json", "frontier_speedup.json", "report"} <= artifacts
    # A trial's scratch files (training checkpoints, the masked model) are gone once its packed model is in the
    # sweep's storage: a long sweep must not fill the temporary directory.
    scratch = trial_scratch(Path(summary["sweep_dir"]).name)
    assert not list(scratch.glob("*/run")) and not list(scratch.glob("*/restored"))


def test_frontier_tags_are_exactly_the_non_dominated_runs(retried_sweep):
    summary = retried_sweep["summary"]
    runs = [r for r in _runs(summary) if r.data.tags.get("fineprune.status") == "finished"]
    points = [(r.data.metrics["f1"], r.data.metrics["linear_density"]) for r in runs]

    def dominated(p):
        return any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)

    for run, point in zip(runs, points):
        assert run.data.tags["pareto"] == ("false" if dominated(point) else "true")
    tagged = {r.info.run_id for r in runs if r.data.tags["pareto"] == "true"}
    assert {row["run_id"] for row in summary["frontier"]} == tagged
    baseline = [r for r in runs if r.data.tags["fineprune.kind"] == "baseline"]
    assert len(baseline) == 1 and baseline[0].data.metrics["linear_density"] == 1.0


def test_champion_is_registered_once_and_answers(retried_sweep):
    import mlflow
    import pandas as pd

    from workflows.registry import register_from_experiment

    summary = retried_sweep["summary"]
    champion = summary["champion"]
    assert champion["registered"] and champion["model_uri"] == "models:/fineprune-smoke@champion"
    client = _client(summary)
    version = client.get_model_version_by_alias("fineprune-smoke", "champion")
    assert version.tags["sweep_run_id"] == summary["parent_run_id"]
    assert float(version.tags["linear_density"]) <= 0.8 + 1e-9  # the policy's density cap
    before = len(client.search_model_versions("name = 'fineprune-smoke'"))
    again = register_from_experiment(summary["experiment"], tracking_uri=summary["tracking_uri"])
    assert again["version"] == champion["version"]
    assert len(client.search_model_versions("name = 'fineprune-smoke'")) == before

    mlflow.set_tracking_uri(summary["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/fineprune-smoke@champion")
    context = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy."
    out = model.predict(pd.DataFrame({"question": ["Who gave their name to Normandy?"], "context": [context]}))
    assert list(out.columns) == ["answer", "score"]
    assert out["answer"][0] and out["answer"][0] in context


def test_every_run_of_the_sweep_records_the_release_that_made_it_and_the_report_says_it(retried_sweep):
    from workflows.record import fineprune_version

    summary = retried_sweep["summary"]
    release = fineprune_version()
    parent = _client(summary).get_run(summary["parent_run_id"])
    runs = _runs(summary)
    assert {r.data.tags["fineprune.kind"] for r in runs} == {"trial", "baseline"}
    assert [r.data.tags.get("fineprune.version") for r in [parent, *runs]] == [release] * (1 + len(runs))
    report = (retried_sweep["tmp"] / "report" / "report.md").read_text(encoding="utf-8")
    assert f"- **fineprune**: {release}\n" in report


def test_resume_reruns_nothing_and_duplicates_no_runs(retried_sweep):
    from workflows.sweep import ResumeError, run_sweep

    summary = retried_sweep["summary"]
    tmp = retried_sweep["tmp"]
    results = sorted(Path(summary["sweep_dir"]).glob("*/result.json"))
    lines_before = [len(p.read_text().splitlines()) for p in results]
    runs_before = {r.info.run_id for r in _runs(summary)}
    resumed = run_sweep(retried_sweep["space"], tracking_uri=summary["tracking_uri"],
                        storage_path=str(tmp / "ray"), resume=True, report_dir=tmp / "report2", address="local")
    assert resumed["status"] == "already finished"
    assert resumed["parent_run_id"] == summary["parent_run_id"]
    assert resumed["sweep_dir"] == summary["sweep_dir"]
    assert {r.info.run_id for r in _runs(resumed)} == runs_before
    assert [len(p.read_text().splitlines()) for p in results] == lines_before
    assert all(r.info.status != "RUNNING" for r in _runs(resumed))
    # Another space is refused for a finished sweep as for one to continue: "already finished" took it for its own.
    other = yaml.safe_load(retried_sweep["space"].read_text())
    other["base"]["seed"] = int(other["base"].get("seed", 42)) + 1
    other_path = tmp / "retried-other.yaml"
    other_path.write_text(yaml.safe_dump(other))
    with pytest.raises(ResumeError, match=rf"^--resume {summary['parent_run_id']}: {other_path}: base\.seed is "):
        run_sweep(other_path, tracking_uri=summary["tracking_uri"], storage_path=str(tmp / "ray"), resume=True,
                  report_dir=tmp / "report3", address="local")
    assert {r.info.run_id for r in _runs(resumed)} == runs_before and not (tmp / "report3").exists()
    # Neither the sweep nor its resumption wrote TensorBoard files, and the setting that kept Tune from it went with
    # each run.
    assert results and not list(Path(summary["sweep_dir"]).rglob("events.out.tfevents*"))
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ


def test_an_invalid_space_fails_before_ray_starts(tmp_path):
    import ray

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsearch:\n  target_density: {type: uniform, low: 0.9, high: 0.1}\nbase: {method: topk}\n")
    from workflows.space import SpaceError
    from workflows.sweep import run_sweep

    with pytest.raises(SpaceError, match="search.target_density"):
        run_sweep(bad, tracking_uri=f"sqlite:///{tmp_path}/m.db", storage_path=str(tmp_path / "ray"))
    assert not ray.is_initialized()
    assert not (tmp_path / "ray").exists() and not (tmp_path / "m.db").exists()
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "sweep", "--space", str(bad)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "bad.yaml" in lines[-1] and "search.target_density" in lines[-1]


def test_frontier_follows_the_space_objectives(tmp_path):
    """The `pareto` tag and frontier.json use the objectives the space declares, not a fixed pair."""
    from mlflow.tracking import MlflowClient

    from workflows import record
    from workflows.space import load_space
    from workflows.sweep import frontier_summary

    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    space["objectives"] = [["exact_match", "max"], ["total_density", "min"]]
    space_path = tmp_path / "em_total.yaml"
    space_path.write_text(yaml.safe_dump(space))
    loaded = load_space(space_path)

    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    experiment = client.create_experiment("objectives")
    metrics = {  # name: (exact_match, total_density, f1, linear_density, speedup)
        "a": (50.0, 0.50, 60.0, 0.30, 2.0),  # on both fronts of f1/linear_density, only a is on the EM one too
        "b": (55.0, 0.60, 55.0, 0.45, 1.5),  # EM/total front only
        "c": (40.0, 0.70, 65.0, 0.60, 1.2),  # dominated on EM/total by a and b
    }
    runs = []
    for name, (em, total, f1, linear, speed) in metrics.items():
        run = client.create_run(experiment, run_name=name, tags={record.TAG_KIND: "trial",
                                                                  record.TAG_STATUS: "finished"})
        for key, value in (("exact_match", em), ("total_density", total), ("f1", f1),
                           ("linear_density", linear), ("speedup", speed)):
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        runs.append(client.get_run(run.info.run_id))

    summary = frontier_summary(client, runs, loaded)
    assert [row["name"] for row in summary["frontier"]] == ["a", "b"]  # sorted by total_density
    tags = {client.get_run(r.info.run_id).data.tags["mlflow.runName"]: client.get_run(r.info.run_id).data.tags
            for r in runs}
    assert {name for name, t in tags.items() if t["pareto"] == "true"} == {"a", "b"}
    assert {name for name, t in tags.items() if t["pareto_speedup"] == "true"} == {"a", "c"}
    assert [row["name"] for row in summary["frontier_speedup"]] == ["a", "c"]
    assert summary["trials"] == 3


def test_the_summary_counts_every_trial_as_the_report_does(tmp_path):
    """A trial ASHA stopped early and one that failed are trials of the sweep: the summary's `trials` is the
    count the report gives ("Trials: 3 (1 finished, 1 stopped early, 1 failed)"), not only the finished ones."""
    from mlflow.tracking import MlflowClient

    from workflows import record, tracking
    from workflows.report import collect_report_data, render_markdown
    from workflows.space import load_space
    from workflows.sweep import frontier_summary

    loaded = load_space(ROOT / "tune_spaces" / "smoke.yaml")
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("counts")
    parent = client.create_run(experiment, tags={record.TAG_KIND: record.KIND_SWEEP}).info.run_id
    baseline = client.create_run(experiment, tags={record.TAG_KIND: record.KIND_BASELINE, record.TAG_PARENT: parent,
                                                   record.TAG_STATUS: record.STATUS_FINISHED}).info.run_id
    client.log_metric(baseline, "f1", 50.0)
    client.log_metric(baseline, "linear_density", 1.0)
    client.set_terminated(baseline)
    for status, f1 in ((record.STATUS_FINISHED, 40.0), (record.STATUS_STOPPED_EARLY, 10.0),
                       (record.STATUS_FAILED, None)):
        run_id = client.create_run(experiment, tags={record.TAG_KIND: record.KIND_TRIAL, record.TAG_PARENT: parent,
                                                     record.TAG_STATUS: status}).info.run_id
        if f1 is not None:
            client.log_metric(run_id, "f1", f1)
            client.log_metric(run_id, "linear_density", 0.4)
        client.set_terminated(run_id, "FAILED" if status == record.STATUS_FAILED else "FINISHED")

    runs = tracking.trial_runs(client, "counts", parent, include_baseline=True)
    summary = frontier_summary(client, runs, loaded)
    assert summary["trials"] == 3
    report = render_markdown(collect_report_data("counts", tracking_uri=uri, sweep_run_id=parent))
    assert "- **Trials**: 3 (1 finished, 1 stopped early, 1 failed)" in report


def test_the_frontier_the_sweep_logs_is_named_by_the_space_objectives(caplog):
    """A sweep over exact match and total density logs its frontier as such, each point with its total density,
    not as 'f1 up, linear_density down' over points sorted by another density."""
    from workflows.sweep import _log_summary

    frontier = [{"name": "trial-a", "f1": 60.0, "exact_match": 50.0, "linear_density": 0.3, "total_density": 0.5,
                 "speedup": 2.0},
                {"name": "trial-b", "f1": 55.0, "exact_match": 55.0, "linear_density": 0.45, "total_density": 0.6,
                 "speedup": None}]
    with caplog.at_level(logging.INFO, logger="workflows.sweep"):
        _log_summary({"frontier": frontier, "ui": "-"}, [("exact_match", "max"), ("total_density", "min")])
    lines = [r.getMessage() for r in caplog.records if r.name == "workflows.sweep"]
    assert lines[0] == "frontier (exact_match up, total_density down):"
    # Each metric with its own decimals, a whole score too (it read "exact_match 42" beside "f1 34.67").
    assert lines[1].split() == ["trial-a", "f1", "60.00", "exact_match", "50.00", "linear_density", "0.300",
                                "speedup", "2.00", "total_density", "0.500"]
    assert lines[2].split()[-4:] == ["speedup", "-", "total_density", "0.600"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="workflows.sweep"):
        _log_summary({"frontier": frontier[:1], "ui": "-"}, [("f1", "max"), ("linear_density", "min")])
    assert caplog.records[0].getMessage() == "frontier (f1 up, linear_density down):"


@pytest.mark.parametrize("champion,says", [
    ({"onnx_variant": "fp32", "served_f1": 40.391008}, " (version 1; serves ONNX Runtime fp32, F1 40.39 on its "
                                                       "trial's questions)"),
    ({"onnx_variant": "int8", "served_f1": None}, " (version 1; serves ONNX Runtime int8)"),  # unchecked
    ({"onnx_variant": "none", "served_f1": None}, " (version 1; serves PyTorch)"),
    ({"served_by": "onnxruntime-int8", "onnx_variant": "int8", "served_f1": 48.2574},  # a latency policy's
     " (version 1; serves ONNX Runtime int8, F1 48.26 on its trial's questions)"),
    ({"served_by": "torch-bf16", "onnx_variant": "none", "served_f1": None}, " (version 1; serves PyTorch)"),
    ({"onnx_variant": None, "served_f1": None}, " (version 1)"),  # a version made before the check
])
def test_the_closing_lines_say_what_the_champion_serves(caplog, champion, says):
    from workflows.sweep import _log_summary

    summary = {"frontier": [], "ui": "-",
               "champion": {"model_uri": "models:/m@champion", "version": "1", "registered": True, **champion}}
    with caplog.at_level(logging.INFO, logger="workflows.sweep"):
        _log_summary(summary)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("champion")]
    assert lines == [f"champion: models:/m@champion{says}"]


def test_the_frontier_tags_are_written_once_per_run_and_not_again(tmp_path):
    """A sweep tags its frontiers at each end (a resumed sweep ends again): each run whose tags change is written
    once, for both tags, and a run whose tags hold is not written at all."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from conftest import CountingClient
    from workflows import record
    from workflows.space import load_space
    from workflows.sweep import frontier_summary

    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    experiment = client.create_experiment("tags", artifact_location=(tmp_path / "artifacts").as_uri())
    space = load_space(ROOT / "tune_spaces" / "smoke.yaml")
    ids = []
    for i in range(30):
        density = (i + 1) / 31
        tags = {record.TAG_KIND: "trial", record.TAG_STATUS: "finished"}
        run_id = client.create_run(experiment, tags=tags).info.run_id
        client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in (
            ("f1", 90 * density ** (0.2 if i % 2 else 0.5)), ("linear_density", density),
            ("speedup", 1 / density ** (0.5 if i % 3 else 0.6)))])
        ids.append(run_id)

    def conclude() -> dict:
        counting = CountingClient(client, "set_tag", "log_batch")
        summary = frontier_summary(counting, [client.get_run(run_id) for run_id in ids], space)
        return {**counting.calls, "front": {row["run_id"] for row in summary["frontier"]}}

    first = conclude()
    assert first["set_tag"] == 0 and first["log_batch"] == 30  # one write per run, both tags in it
    again = conclude()
    assert again == {"set_tag": 0, "log_batch": 0, "front": first["front"]}
    tags = {run_id: client.get_run(run_id).data.tags for run_id in ids}
    assert {run_id for run_id, t in tags.items() if t["pareto"] == "true"} == first["front"]
    assert all(t["pareto_speedup"] in ("true", "false") for t in tags.values())
    client.set_tag(ids[0], "pareto", "stale")  # one run's tag changed since: only that run is written
    assert conclude()["log_batch"] == 1
    assert client.get_run(ids[0]).data.tags["pareto"] in ("true", "false")


def test_a_used_up_finite_space_is_a_finished_sweep_whose_stdout_is_one_json_line(tmp_path):
    """Four configurations and six samples asked for: the search ends when all four ran, and the sweep is finished
    (not 'interrupted', nothing to resume). The command's stdout is its one JSON line: Tune's progress tables and
    the workers' output go to stderr. Warm-started from an earlier sweep of the four configurations, in another
    tracking store: its trials teach the sampler and are no trials of this sweep (all four still run), and that
    store is only read."""
    from mlflow.tracking import MlflowClient
    from test_warm_start import record_sweep

    from workflows import record

    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    space.update(name="finite", scheduler=None, num_samples=6, sampler={"type": "random"},
                 search={"target_density": {"type": "choice", "values": [0.3, 0.7]},
                         "temperature": {"type": "choice", "values": [1, 4]}})
    earlier_uri = sqlite_store(tmp_path / "earlier.db")
    earlier = record_sweep(MlflowClient(tracking_uri=earlier_uri), "earlier", [
        ({"target_density": d, "temperature": t}, {"f1": 10.0 * t, "linear_density": d}, record.STATUS_FINISHED)
        for d in (0.3, 0.7) for t in (1, 4)])
    earlier_db = (tmp_path / "earlier.db").read_bytes()
    proc, uri = sweep_command(space, tmp_path, "finite", "--warm-start", "earlier",
                              "--warm-start-tracking-uri", earlier_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout[:2000]
    summary = json.loads(lines[0])
    assert summary["status"] == "finished" and summary["trials"] == 4
    assert not (trial_scratch(Path(summary["sweep_dir"]).name)).exists()
    assert "Configuration for experiment" in proc.stderr  # Tune's table, on stderr
    # Its columns of metrics are the objectives and what else a reader of a pruning sweep looks for, not the step,
    # the epoch and the state of the threshold schedule (the first four a trial reported).
    headers = [line.split("total time (s)")[1].split() for line in proc.stderr.splitlines()
               if "Trial name" in line and "total time (s)" in line]
    assert headers and all(columns[:3] == ["f1", "linear_density", "exact_match"] for columns in headers), headers
    assert not {"step", "epoch", "threshold"} & {name for columns in headers for name in columns}, headers
    # Each trial's last result, printed as a table when it ends, holds what a reader compares, not all fifty-odd
    # metrics a trial reports (MLflow keeps them).
    results = re.findall(r"Trial trial_main_\w+ result.*?\n(?:.*\n)*?╰", proc.stderr)
    assert len(results) == 4, proc.stderr[-5000:]
    assert all(re.search(r"│ f1 +\d", table) and re.search(r"│ speedup +\d", table) for table in results), results[0]
    assert not [table for table in results if "loss_ce" in table or "ffn_kept_layer_0" in table], results[0]
    assert "the search ended after 4 of 6 trials" in proc.stderr
    # The trials train and score on the same dev questions: said once by the sweep, not by the teacher and each trial.
    assert proc.stderr.count("evaluation questions are training questions too") == 1, proc.stderr[-5000:]
    # Ray forwards every redraw of a worker's progress bar as a line: the teacher and the trials draw none.
    assert not _worker_progress_bars(proc.stderr), _worker_progress_bars(proc.stderr)[:5]
    assert "Checkpoint successfully created" not in proc.stderr  # Ray's repr of each checkpoint reported
    assert "snapshotting has been triggered multiple times" not in proc.stderr  # Tune's advice to snapshot less
    assert "A new study created" not in proc.stderr  # Optuna's notice as the sampler starts
    assert "Token authentication is enabled" not in proc.stderr  # Ray's, as the sweep starts its private Ray
    # Every trial's lines are printed as they come, not folded into another's ("[repeated 3x across cluster]").
    assert "across cluster" not in proc.stderr, re.findall(r".*across cluster.*", proc.stderr)[:3]
    started = re.findall(r"\(trial_main pid=\d+\).* INFO workflows\.sweep: trial (\w+): target_density=",
                         proc.stderr)
    assert len(started) == len(set(started)) == 4, started
    assert "\x1b[" not in proc.stderr, re.findall(r".*\x1b\[.*", proc.stderr)[:3]  # no colour codes in a pipe
    # The record is MLflow's: no hint to run TensorBoard, and no event files for it; Tune's own files of each trial
    # are still written beside its checkpoints.
    assert "TensorBoard" not in proc.stderr, proc.stderr[:3000]
    trial_dirs = [path for path in Path(summary["sweep_dir"]).iterdir() if path.is_dir()]
    assert len(trial_dirs) == 4 and all((path / "result.json").is_file() and (path / "progress.csv").is_file()
                                        for path in trial_dirs), sorted(Path(summary["sweep_dir"]).rglob("*"))
    assert not list(Path(summary["sweep_dir"]).rglob("events.out.tfevents*"))
    # A finished trial keeps its packed model alone: the training checkpoint before it (a model and its optimizer
    # state, three quarters of a trial's storage) is of no use once it is packed.
    finished = [path for path in trial_dirs if any(json.loads(kind.read_text())["kind"] == "packed"
                                                   for kind in path.glob(f"checkpoint_*/{CHECKPOINT_KIND}"))]
    assert finished and all(len(list(path.glob("checkpoint_*"))) == 1 for path in finished), \
        sorted(str(p.relative_to(summary["sweep_dir"])) for p in Path(summary["sweep_dir"]).glob("*/checkpoint_*"))
    parent = MlflowClient(tracking_uri=uri).get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[record.TAG_SWEEP_STATE] == record.SWEEP_COMPLETE
    search = summary["search"]
    assert search["over"] == "exhausted" and 0 <= search["steered"] <= search["repeats"]
    assert parent.data.tags[record.TAG_SEARCH_OVER] == "exhausted"
    assert summary["warm_start"] == {"sweep_run_id": earlier, "trials": 4, "tracking_uri": earlier_uri}
    assert parent.data.tags[record.TAG_WARM_START] == earlier and parent.data.tags[record.TAG_WARM_START_TRIALS] == "4"
    assert parent.data.tags[record.TAG_WARM_START_STORE] == earlier_uri
    assert (f"the sampler starts from 4 trials of sweep run {earlier} (experiment 'earlier', tracking URI "
            f"{earlier_uri})" in proc.stderr)
    assert (tmp_path / "earlier.db").read_bytes() == earlier_db  # only read
    report = Path(summary["report"]["markdown"]).read_text()
    assert (f"- **Warm start**: the sampler was told 4 trials of sweep run {earlier} (tracking URI {earlier_uri}) "
            "before its first suggestion" in report), report[:1500]
    assert parent.data.metrics[record.SEARCH_REPEATS] == search["repeats"]
    assert parent.data.metrics[record.SEARCH_STEERED] == search["steered"]


def test_a_worker_stopped_inside_a_finalizer_prints_no_traceback_and_other_reports_are_printed(monkeypatch, capsys):
    """Ray stops a worker it no longer needs with SIGTERM, raised as SystemExit where the worker is: in a finalizer
    Python cannot raise it and printed "Exception ignored in ... SystemExit: 1" among the sweep's output. A worker's
    hook drops that report; an error in a finalizer is still printed."""
    from workflows.sweep import _worker_unraisable

    class Finalized:
        def __init__(self, error: BaseException) -> None:
            self.error = error

        def __del__(self) -> None:
            raise self.error

    monkeypatch.setattr(sys, "unraisablehook", _worker_unraisable)
    capsys.readouterr()
    Finalized(SystemExit(1))  # dropped at once, its finalizer run
    assert capsys.readouterr().err == ""
    Finalized(KeyError("a real error"))
    err = capsys.readouterr().err
    assert "Exception ignored" in err and "KeyError: 'a real error'" in err, err


@pytest.mark.parametrize("statuses,over,complete", [
    (["TERMINATED"] * 4, None, True),                     # all the samples asked for
    (["TERMINATED"] * 3, None, False),                    # stopped short: resumable
    (["TERMINATED"] * 3, "exhausted", True),              # the space had three configurations
    (["TERMINATED"] * 3, "converged", True),              # the sampler had nothing new
    (["TERMINATED", "ERROR", "TERMINATED"], "exhausted", False),  # a failed trial: resume retries it
    ([], "exhausted", False),
])
def test_a_sweep_is_complete_when_every_trial_ended_and_the_search_did(statuses, over, complete):
    from workflows.sweep import sweep_complete

    assert sweep_complete(statuses, 4, over) is complete


def test_every_metric_a_trial_reports_has_its_better_direction():
    """The space checks objectives and scheduler modes against record.METRIC_MODES: it must know every metric a
    trial reports, and nothing else."""
    from workflows.record import METRIC_MODES
    from workflows.sweep import TRIAL_METRICS

    assert set(TRIAL_METRICS) == set(METRIC_MODES)


@pytest.mark.parametrize("statuses,expected", [
    (["TERMINATED", "ERROR", "TERMINATED"], "1 of 3 trials failed (the fineprune.error tag of each run says why)"),
    (["TERMINATED", "ERROR", "RUNNING"], "1 of 3 trials failed (the fineprune.error tag of each run says why); "
                                         "the sweep stopped before all its trials ended"),
    (["TERMINATED", "PENDING"], "the sweep stopped before all its trials ended"),
    (["TERMINATED"] * 2, "the sweep stopped before all its trials ended"),
])
def test_an_incomplete_sweep_says_whether_trials_failed_or_it_was_stopped(statuses, expected):
    from workflows.sweep import _what_is_left

    assert _what_is_left(statuses) == expected


def test_resuming_with_a_changed_space_is_refused_before_anything_runs(tmp_path):
    """A resume whose space differs in what trials compute (here base.max_steps) would mix trials of two sweeps under
    one record: one line naming the key, its value then and now; nothing started. A registry change is fine."""
    import ray
    import yaml
    from mlflow.tracking import MlflowClient

    from workflows import record, tracking
    from workflows.space import load_space
    from workflows.sweep import ResumeError, run_sweep

    values = yaml.safe_load((Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml").read_text())
    first = tmp_path / "smoke.yaml"
    first.write_text(yaml.safe_dump(values))
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    sweep_dir = str(tmp_path / "ray" / "smoke-1")
    parent = tracking.start_parent_run(client, "smoke", sweep_dir, load_space(first).summary(), resume=False)
    tracking.finish_parent_run(client, parent, status="KILLED", state=record.SWEEP_INTERRUPTED)

    values["base"]["max_steps"] = 8
    values["registry"]["max_density"] = 0.7
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(values))
    with pytest.raises(ResumeError) as info:
        run_sweep(changed, experiment="smoke", tracking_uri=uri, resume=parent, address="local")
    message = str(info.value)
    assert "\n" not in message and f"{changed}: base.max_steps is 8 but the sweep started with 6" in message
    assert not ray.is_initialized() and not (tmp_path / "ray").exists()
    run = client.get_run(parent)
    assert run.info.status == "KILLED" and run.data.params["base.max_steps"] == "6"


def test_a_teacher_that_cannot_be_had_stops_the_sweep_in_one_line_and_ends_its_run(tmp_path):
    """teacher.path names a directory the teacher's Ray task cannot load (a missing one is refused before Ray starts):
    the error raised in that task reaches the user as its own one-line error (not Ray's multi-line wrapper), and the
    sweep's MLflow run ends FAILED, resumable, not RUNNING forever."""
    import logging

    import ray
    from mlflow.tracking import MlflowClient

    from workflows import record
    from workflows.sweep import run_sweep

    values = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    (tmp_path / "not_a_qa_model").mkdir()
    (tmp_path / "not_a_qa_model" / "config.json").write_text('{"model_type": "gpt2"}')
    values["teacher"] = {"path": str(tmp_path / "not_a_qa_model"), "student_init": True}
    space = tmp_path / "smoke.yaml"
    space.write_text(yaml.safe_dump(values))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with pytest.raises(Exception) as info:
            run_sweep(space, experiment="smoke", tracking_uri=uri, storage_path=str(tmp_path / "ray"),
                      address="local")
        # The Ray this caller started is theirs: the sweep ran on it and leaves it running (it shut it down).
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert type(info.value).__name__ == "CheckpointError"
    assert str(info.value).startswith(f"{tmp_path / 'not_a_qa_model' / 'config.json'}: model_type 'gpt2' is not "
                                      "supported")
    client = MlflowClient(tracking_uri=uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert parent.info.status == "FAILED"
    assert parent.data.tags[record.TAG_SWEEP_STATE] == record.SWEEP_INTERRUPTED


@pytest.mark.parametrize("edit,message", [
    (lambda v: v["base"].update(fill_steps=2), "base.fill_steps is 2 but the sweep started with it not given"),
    (lambda v: v["base"].pop("eval_limit"), "base.eval_limit is not given but the sweep started with 12"),
    (lambda v: v["teacher"]["config"].pop("max_steps"),
     "teacher.config.max_steps is not given but the sweep started with 6"),
    (lambda v: v["search"].pop("temperature"),
     "search.temperature is not searched but the sweep started with it searched"),
    # A restored sweep keeps the scheduler and sampler it started with: adding or removing one would be ignored.
    (lambda v: v.pop("scheduler"), "scheduler is not given but the sweep started with one"),
    (lambda v: v.update(sampler={"type": "gp"}), "sampler is given but the sweep started with none"),
    # ... and its concurrency limit, each trial's retries and its reuse of workers.
    (lambda v: v.update(max_concurrent=1), "max_concurrent is 1 but the sweep started with 2"),
    (lambda v: v.update(max_failures=2), "max_failures is 2 but the sweep started with 0"),
    (lambda v: v.update(reuse_workers=False), "reuse_workers is false but the sweep started with true"),
    (lambda v: v["base"].update(eval_limit=None), "base.eval_limit is null but the sweep started with 12"),
])
def test_resuming_with_a_key_added_to_or_removed_from_the_space_is_refused(tmp_path, edit, message):
    """A key given on one side only changes what trials compute as much as a changed value does."""
    import yaml
    from mlflow.tracking import MlflowClient

    from workflows import record, tracking
    from workflows.space import load_space
    from workflows.sweep import ResumeError, run_sweep

    values = yaml.safe_load((Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml").read_text())
    first = tmp_path / "smoke.yaml"
    first.write_text(yaml.safe_dump(values))
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    parent = tracking.start_parent_run(client, "smoke", str(tmp_path / "ray" / "smoke-1"),
                                       load_space(first).summary(), resume=False)
    tracking.finish_parent_run(client, parent, status="KILLED", state=record.SWEEP_INTERRUPTED)

    edit(values)
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(values))
    with pytest.raises(ResumeError, match=re.escape(f"{changed}: {message}")):
        run_sweep(changed, experiment="smoke", tracking_uri=uri, resume=parent, address="local")
    assert not (tmp_path / "ray").exists()


def test_a_sweep_whose_trials_diverge_ends_incomplete_with_each_reason_and_exit_3(tmp_path):
    """Every trial trains at a learning rate that sends its loss to nan: each stops at that step and its run fails
    with the one line that says so; the sweep prints its summary and exits 3, which a script tells from 0."""
    from mlflow.tracking import MlflowClient

    from workflows import record

    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    space["base"]["learning_rate"] = 1e30
    space["teacher"]["config"]["learning_rate"] = 1e-3  # the teacher trains as usual
    space.update(name="diverge", scheduler=None, num_samples=1, max_concurrent=1)
    proc, uri = sweep_command(space, tmp_path, "diverge")
    assert proc.returncode == 3, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["status"] == "interrupted" and summary["champion"]["registered"] is False
    client = MlflowClient(tracking_uri=uri)
    (trial,) = [r for r in client.search_runs([client.get_experiment_by_name("diverge").experiment_id])
                if r.data.tags.get(record.TAG_KIND) == "trial"]
    assert trial.info.status == "FAILED"
    assert re.search(r"TrainingDiverged: step \d+: the training loss is nan .*training diverged at learning_rate "
                     r"1e\+30", trial.data.tags[record.TAG_ERROR])
    # The failed trial's local files (its checkpoints) are gone with it.
    assert not (trial_scratch(Path(summary["sweep_dir"]).name)).exists()


def _machine_cpus() -> int:
    from ray._private.utils import get_num_cpus

    return get_num_cpus()


# Sweeps the command line refuses before Ray starts, by case: the edit each makes to the smoke space, given the
# space and a directory for data files (see the tests below for what each must say).
REFUSED = {
    "train-data-not-here": lambda s, d: s["base"].update(train_data="data/train.json"),
    "eval-data-not-here": lambda s, d: s["teacher"]["config"].update(eval_data="nowhere.json"),
    "teacher-not-here": lambda s, d: s["teacher"].update(path="models/teacher", config={}),
    "model-not-here": lambda s, d: (s["base"].pop("model_config"), s["base"].update(model="models/nowhere")),
    "gpu": lambda s, d: (s["base"].update(device="cuda"), s.update(resources={"cpu": 1, "gpu": 0.5})),
    "cpus": lambda s, d: s.update(resources={"cpu": _machine_cpus() + 1, "gpu": 0}),
    "bf16-base": lambda s, d: s["base"].update(precision="bf16"),
    "bf16-teacher": lambda s, d: s["teacher"]["config"].update(precision="bf16"),
    "blocks": lambda s, d: s["base"].update(attention_block=[24, 24]),
    "no-answers-train": lambda s, d: s["base"].update(train_data=_small_squad(d / "bad.json", no_answers=True),
                                                      train_limit=None),
    "teacher-train-offsets": lambda s, d: s["teacher"]["config"].update(
        train_data=_small_squad(d / "drift.json", drift=1)),
    "eval-json-lines": lambda s, d: s["base"].update(eval_data=_written(d / "dev.jsonl", '{"id": "1"}\n{"id": "2"}\n')),
}


@pytest.fixture
def refused_sweep(tmp_path, monkeypatch, capsys):
    """Runs the sweep of a case of ``REFUSED`` by the command line, in this process (each would otherwise be a
    process importing torch, transformers and Ray to read its space), from a directory of its own holding its space
    file and nothing else but its data. Case -> (that directory; the command's exit status and stderr, as a
    finished process)."""
    import ray

    from workflows import cli

    def run(case: str) -> tuple[Path, subprocess.CompletedProcess]:
        directory = tmp_path / case
        directory.mkdir()
        space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
        REFUSED[case](space, directory / "data")
        argv, _ = _sweep_argv(space, directory, "space")
        args = argv[argv.index("sweep"):]
        monkeypatch.chdir(directory)
        capsys.readouterr()
        status = cli.main(args)
        out, err = capsys.readouterr()
        assert not ray.is_initialized()
        return directory, subprocess.CompletedProcess(args, status, out, err)

    return run


@pytest.mark.parametrize("case, needle", [
    ("train-data-not-here", "base.train_data: data/train.json: SQuAD data file not found"),
    ("eval-data-not-here", "teacher.config.eval_data: nowhere.json: SQuAD data file not found"),
    ("teacher-not-here", "teacher.path: models/teacher: model directory not found"),
    ("model-not-here", "base.model: models/nowhere: model directory not found"),
])
def test_a_local_sweep_whose_paths_are_not_here_fails_before_ray_starts(refused_sweep, case, needle):
    """On a private local Ray the trials run here: a path that is not here is one line naming the key, exit 2, with
    nothing written (not a failed teacher or trial after Ray and the sweep's run started)."""
    directory, proc = refused_sweep(case)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"fineprune sweep: error: {directory / 'space.yaml'}: {needle}"
    assert sorted(p.name for p in directory.iterdir()) == ["space.yaml"]


@pytest.mark.skipif(__import__("torch").cuda.device_count() > 0, reason="this machine has a GPU")
def test_a_local_sweep_asking_a_gpu_per_trial_on_a_machine_without_one_fails_before_ray_starts(refused_sweep):
    """The private local Ray has no GPU to give: the teacher and the trials would wait for one forever. The sweep
    says so in one line naming the key, exit 2, with nothing written."""
    directory, proc = refused_sweep("gpu")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fineprune sweep: error: {directory / 'space.yaml'}: resources.gpu: 0.5 per trial, but this machine has no "
        "GPU and the trials run here (a sweep without --address starts a private local Ray): set gpu: 0 with "
        "base.device cpu or auto, or join a cluster with GPUs with --address")
    assert sorted(p.name for p in directory.iterdir()) == ["space.yaml"]


@pytest.mark.skipif(__import__("pruning.precision").precision.cpu_supports_bf16(), reason="this CPU computes bf16")
@pytest.mark.parametrize("case, key", [("bf16-base", "base.precision"), ("bf16-teacher", "teacher.config.precision")])
def test_a_local_cpu_sweep_in_bf16_on_a_cpu_without_it_fails_before_ray_starts(refused_sweep, case, key):
    """fineprune train refuses bf16 on a CPU without bf16 matrix instructions before it reads anything; a sweep
    passed its checks (--check too), started Ray, MLflow and its parent run, and stopped when the teacher refused it,
    with a line naming neither the space nor the key, leaving a failed sweep that report and register then took
    for the latest one."""
    directory, proc = refused_sweep(case)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fineprune sweep: error: {directory / 'space.yaml'}: {key}: bf16 asked for, but this CPU has no bf16 matrix "
        "instructions (avx512_bf16 or AMX); use fp32 or auto (the trials and the teacher run on the CPUs here: "
        "resources ask for no GPU)")
    assert sorted(p.name for p in directory.iterdir()) == ["space.yaml"]


def test_a_local_sweep_asking_more_cpus_per_trial_than_the_machine_has_fails_before_ray_starts(refused_sweep):
    """The private local Ray cannot give a trial more CPUs than the machine has: the teacher and the trials would
    wait for them forever. The sweep says so in one line naming the key, exit 2, with nothing written."""
    cpus = _machine_cpus()
    directory, proc = refused_sweep("cpus")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fineprune sweep: error: {directory / 'space.yaml'}: resources.cpu: {cpus + 1:g} per trial, but this "
        f"machine has {cpus:g} and the trials run here (a sweep without --address starts a private local Ray): ask "
        f"for at most {cpus:g}, or join a cluster with larger nodes with --address")
    assert sorted(p.name for p in directory.iterdir()) == ["space.yaml"]


@pytest.mark.parametrize("given", ["more CPUs than the machine", "fewer CPUs than the machine"])
def test_a_sweep_on_a_ray_already_running_here_checks_the_cpus_that_ray_has(tmp_path, given):
    """A sweep run from Python where the caller started Ray (``ray.init(num_cpus=N)``), which it runs on, compared a
    trial's CPUs with the machine's: a space that fits the Ray given more CPUs than the machine was refused, and one
    asking more than a Ray given fewer passed, the trials then waiting forever. It compares them with that Ray's."""
    import ray
    from ray._private.utils import get_num_cpus

    from conftest import frozen
    from workflows.space import SpaceError
    from workflows.sweep import run_sweep
    from workflows.tracking import TrackingStoreError

    machine = get_num_cpus()
    ray_cpus, cpu = (machine + 2, machine + 1) if given.startswith("more") else (1, 2)
    values = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    values["resources"] = {"cpu": cpu, "gpu": 0}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(values))
    store = tmp_path / "store"
    store.mkdir()
    ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with frozen(store):  # a check after the resources' stops the sweep there, before anything starts
            with pytest.raises((SpaceError, TrackingStoreError)) as stopped:
                run_sweep(space, tracking_uri=f"sqlite:///{store / 'mlflow.db'}", storage_path=str(tmp_path / "ray"))
    finally:
        ray.shutdown()
    if given.startswith("more"):
        assert isinstance(stopped.value, TrackingStoreError), stopped.value
    else:
        assert str(stopped.value) == (f"{space}: resources.cpu: 2 per trial, but the Ray running in this process has "
                                      "1 and the trials run there: ask for at most 1, or join a cluster with larger "
                                      "nodes with --address")


def test_a_sweep_whose_blocks_do_not_fit_its_model_fails_before_ray_starts(refused_sweep):
    """Blocks that do not divide the model's attention matrices would fail every trial once Ray, the teacher and
    the model had started; the sweep refuses them in one line naming the key, exit 2, with nothing written."""
    directory, proc = refused_sweep("blocks")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fineprune sweep: error: {directory / 'space.yaml'}: base.attention_block: 24x24 does not divide the 32x32 "
        "attention matrices of the model_config (hidden_size 32)")
    assert sorted(p.name for p in directory.iterdir()) == ["space.yaml"]


def _written(path: Path, text: str) -> str:
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


def _small_squad(path: Path, drift: int = 0, no_answers: bool = False) -> str:
    """Three dev questions as a SQuAD file, their answer_start moved by ``drift``, the third without answers and
    not marked unanswerable (no ``is_impossible``) when ``no_answers``."""
    from pruning import squad
    from pruning.resources import squad_file

    qas = [{"id": ex.id, "question": ex.question, "context": ex.context,
            "answers": [{"text": ex.answers[0], "answer_start": ex.answer_starts[0] + drift}]}
           for ex in squad.load_squad(squad_file("dev"), limit=3)]
    if no_answers:
        qas[2].update(answers=[])
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": qa.pop("context"), "qas": [qa]} for qa in qas]}]}))
    return str(path)


@pytest.mark.parametrize("case, needle", [
    ("no-answers-train",
     "base.train_data: {d}/bad.json: question 56be4db0acb8001400a502ee (data[0].paragraphs[2].qas[0]): no answers"),
    ("teacher-train-offsets",
     "teacher.config.train_data: {d}/drift.json: question 56be4db0acb8001400a502ec (data[0].paragraphs[0].qas[0]): "
     "answer 0 'Denver Broncos' is not at answer_start 178"),
    ("eval-json-lines", "base.eval_data: {d}/dev.jsonl: question 1 (line 1): missing 'context'"),
])
def test_a_local_sweep_whose_data_does_not_load_fails_before_ray_starts(refused_sweep, case, needle):
    """A data file the teacher or the trials would refuse is refused before Ray starts, naming the key, the file and
    the question: not found after a teacher is fine-tuned for nothing and every trial has failed on it."""
    directory, proc = refused_sweep(case)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"fineprune sweep: error: {directory / 'space.yaml'}: "
                           + needle.format(d=directory / "data")), line
    assert sorted(p.name for p in directory.iterdir()) == ["data", "space.yaml"]


def test_the_data_check_reads_as_many_training_questions_as_a_trial_may(tmp_path):
    """A searched train_limit: the file is checked up to the largest limit a trial may draw, no further."""
    from workflows.preflight import check_local_data
    from workflows.space import SpaceError, load_space

    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    space["base"]["train_data"] = _small_squad(tmp_path / "data" / "bad.json", no_answers=True)
    space["teacher"]["config"]["train_data"] = "dev"
    for values, refused in (([1, 2], False), ([2, 3], True), ([1, None], True)):
        space["search"]["train_limit"] = {"type": "choice", "values": values}
        (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
        if refused:
            with pytest.raises(SpaceError, match="base.train_data: .*bad.json: question .*: no answers"):
                check_local_data(load_space(tmp_path / "space.yaml"))
        else:
            check_local_data(load_space(tmp_path / "space.yaml"))


def test_the_data_check_says_once_that_the_trials_are_not_scored_on_held_out_questions(caplog, tmp_path):
    """The sweep says it for the trials (and for a teacher trained on other questions) before Ray starts; the
    teacher and the trials then do not say it again."""
    from workflows.preflight import check_local_data
    from workflows.space import load_space

    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    with caplog.at_level(logging.WARNING, logger="pruning.trainer"):
        check_local_data(load_space(tmp_path / "space.yaml"))
    said = [r.getMessage() for r in caplog.records if "training questions too" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("the EM and F1 of the trials are not held out"), said

    space["teacher"]["config"]["train_limit"] = 30  # the teacher trains on more questions than the trials
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pruning.trainer"):
        check_local_data(load_space(tmp_path / "space.yaml"))
    said = [r.getMessage() for r in caplog.records if "training questions too" in r.getMessage()]
    assert [m.rsplit("F1 ", 1)[1] for m in said] == ["of the trials are not held out",
                                                     "of the dense teacher are not held out"], said


def _eval_stdout(capsys, *args: str) -> dict:
    """``fineprune eval`` as a user runs it (in this process): its JSON line."""
    from workflows import cli

    capsys.readouterr()
    assert cli.main(["eval", *args, "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_dense_baseline_is_scored_on_the_trials_questions_whatever_the_teacher_was_trained_with(tmp_path,
                                                                                                     capsys):
    """teacher.config trains (and scores) the teacher on 6 questions with n_best 5, the trials are scored on 12 with
    n_best 20: the dense baseline the sweep records (its report, frontier and F1-drop policies read it) is what
    `fineprune eval` of the teacher gives with the trials' settings, not the teacher's own score. A later sweep
    that reuses the teacher with other evaluation settings scores it with those, not with a score cached earlier."""
    import ray

    from workflows.space import load_space
    from workflows.sweep import ensure_teacher, run_sweep

    values = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    values.update(name="baseline", num_samples=1, scheduler=None)
    values["teacher"]["config"] = {"max_steps": 6, "eval_limit": 6, "n_best": 5}
    values["registry"]["onnx"] = False
    del values["registry"]["max_int8_f1_drop"]  # an int8 check needs the export
    space_path = tmp_path / "baseline.yaml"
    space_path.write_text(yaml.safe_dump(values))
    import mlflow

    before = mlflow.get_tracking_uri()
    summary = run_sweep(space_path, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", storage_path=str(tmp_path / "ray"),
                        report_dir=tmp_path / "report", address="local")
    # MLflow's fluent API was left on the sweep's store: a notebook's next runs were logged there.
    assert mlflow.get_tracking_uri() == before
    (baseline,) = [r for r in _runs(summary) if r.data.tags["fineprune.kind"] == "baseline"]
    teacher = baseline.data.tags["fineprune.model_dir"]

    windows = ("--eval-data", "dev", "--max-seq-length", "64", "--doc-stride", "32", "--max-query-length", "64",
               "--max-answer-length", "30")
    trials = _eval_stdout(capsys, teacher, *windows, "--eval-limit", "12", "--n-best", "20")
    own = _eval_stdout(capsys, teacher, *windows, "--eval-limit", "6", "--n-best", "5")
    assert (own["exact_match"], own["f1"]) != (trials["exact_match"], trials["f1"])  # the two settings tell apart
    assert baseline.data.metrics["f1"] == pytest.approx(trials["f1"], abs=1e-9)
    assert baseline.data.metrics["exact_match"] == pytest.approx(trials["exact_match"], abs=1e-9)
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"**Dense baseline**: F1 {trials['f1']:.2f}, EM {trials['exact_match']:.2f}" in report

    # The same teacher (same fingerprint), trials scored on 9 questions: scored again, on those.
    values["base"]["eval_limit"] = 9
    space_path.write_text(yaml.safe_dump(values))
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        again_dir, again = ensure_teacher(load_space(space_path), tmp_path / "ray" / "teachers")
    finally:
        ray.shutdown()
    assert again_dir == teacher
    nine = _eval_stdout(capsys, teacher, *windows, "--eval-limit", "9", "--n-best", "20")
    assert again["f1"] == pytest.approx(nine["f1"], abs=1e-9)
    assert again["exact_match"] == pytest.approx(nine["exact_match"], abs=1e-9)


def test_a_question_too_long_for_the_trials_windows_names_its_file_when_a_given_teacher_is_scored(tmp_path):
    """A given teacher is scored on the trials' evaluation questions in a Ray task; a question too long for their
    windows (64 tokens overlapping by 32: 28 question tokens at most) named no file there, as it does elsewhere."""
    import ray
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    from pruning import squad
    from pruning.checkpoint import save_model
    from pruning.resources import shipped_model_dir
    from workflows.space import load_space
    from workflows.sweep import ensure_teacher

    values = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    teacher = tmp_path / "teacher"
    save_model(BertForQuestionAnswering(BertConfig(**values["base"]["model_config"])),
               AutoTokenizer.from_pretrained(shipped_model_dir()), teacher)
    qa = {"id": "long-q", "question": " ".join(["which"] * 40) + "?",
          "answers": [{"text": "the mat", "answer_start": 15}]}
    data = tmp_path / "eval.json"
    data.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "The cat sat on the mat.",
                                                                         "qas": [qa]}]}]}))
    values["base"].update(eval_data=str(data), eval_limit=None)
    values["teacher"] = {"path": str(teacher), "student_init": True}
    space = tmp_path / "smoke.yaml"
    space.write_text(yaml.safe_dump(values))
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with pytest.raises(squad.QuestionTooLong) as info:
            ensure_teacher(load_space(space), tmp_path / "teachers")
    finally:
        ray.shutdown()
    assert str(info.value).startswith(f"{data}: question long-q has 41 tokens: with max_seq_length 64 ")


@pytest.mark.parametrize("given", [None, "0", "1"])
def test_tunes_default_loggers_are_off_in_a_sweep_unless_the_user_set_them(monkeypatch, given):
    """A sweep runs Tune without its default loggers (TensorBoard's files and the line about them); a user who set
    TUNE_DISABLE_AUTO_CALLBACK_LOGGERS (0 for TensorBoard's files) is obeyed, and the environment is as it was after."""
    from workflows.sweep import _without_tensorboard

    name = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
    if given is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, given)
    with _without_tensorboard():
        assert os.environ[name] == (given or "1")
    assert os.environ.get(name) == given


@pytest.mark.parametrize("given", ["ignore", "default"])
def test_the_sweep_s_own_ray_leaves_a_caller_s_ignored_sigterm_ignored(given):
    """ray.init makes SIGTERM a sys.exit; the caller's handler was set back, but not an "ignore", which is not a
    callable: a service that ignores SIGTERM was ended by the next one after its sweep. The default stays Ray's
    exit, which still ends the sweep's run and stops its Ray (the default would end the process at once)."""
    import signal

    import ray

    from workflows.sweep import _init_ray

    before = signal.signal(signal.SIGTERM, signal.SIG_IGN if given == "ignore" else signal.SIG_DFL)
    try:
        assert _init_ray(None) is True
        assert _init_ray(None) is False  # already running: not the sweep's to stop
        if given == "ignore":
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        else:
            assert callable(signal.getsignal(signal.SIGTERM))
        ray.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        signal.signal(signal.SIGTERM, before)


def test_a_ctrl_c_once_the_trials_ended_interrupts_the_sweep(tmp_path):
    """Tune takes SIGINT (and SIGUSR1) while it runs and puts the handler back only when one arrives: the first
    Ctrl-C after the trials, while a sweep exported, checked and registered its frontier (minutes for a real model),
    said "ending Ray Tune run", did nothing, and the sweep ended as finished with status 0. The handlers are the
    caller's again once the Tune loop ends."""
    import signal
    import time

    import ray
    from ray import tune

    from workflows.sweep import _fit

    def one_report(config):  # here, not at the module's top: Ray's workers cannot import a test module
        tune.report({"score": config["x"]})

    # Python's own handler, as the command line has it (a test runner's worker may ignore SIGINT).
    runners = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGUSR1)}
        ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
        try:
            tuner = tune.Tuner(one_report, param_space={"x": tune.grid_search([1])},
                               run_config=tune.RunConfig(storage_path=str(tmp_path), name="loop", verbose=0))
            _fit(tuner, str(tmp_path / "loop"))
        finally:
            ray.shutdown()
        assert {number: signal.getsignal(number) for number in before} == before
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, runners)


class _Stopped(Exception):
    pass


def _stop_at_first_report(metrics, checkpoint):
    assert checkpoint is not None
    raise _Stopped


@pytest.mark.parametrize("damaged", [False, True])
def test_a_teacher_a_sweep_stopped_while_it_trained_goes_on_from_its_checkpoint(tmp_path, caplog, damaged):
    """A sweep stopped while its dense teacher fine-tuned (Ctrl-C, a lost worker; an hour for BERT-base on SQuAD)
    left the teacher's checkpoint, which the next sweep removed to train the teacher from the start. It goes on from
    there; a checkpoint that cannot be read is said in a line and the teacher trained from the start. A finished
    teacher keeps its final model alone: its checkpoint (the model and its optimizer state) was kept for nothing."""
    import dataclasses

    import ray
    import torch

    from pruning.checkpoint import load_model
    from pruning.trainer import train
    from workflows.fingerprint import teacher_fingerprint
    from workflows.space import load_space, teacher_config
    from workflows.sweep import ensure_teacher

    values = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    values["teacher"]["config"] = {"max_steps": 6, "save_every": 3, "eval_every": 3}
    space_path = tmp_path / "space.yaml"
    space_path.write_text(yaml.safe_dump(values))
    space = load_space(space_path)
    root = tmp_path / "teachers"
    run_dir = root / teacher_fingerprint(space)
    cfg = teacher_config(space, str(run_dir))
    with pytest.raises(_Stopped):
        train(cfg, report=_stop_at_first_report, progress=False)
    assert (run_dir / "checkpoint" / "trainer_state.json").is_file() and not (run_dir / "final").exists()
    if damaged:
        (run_dir / "checkpoint" / "model.safetensors").write_bytes(b"cut short")
    plain = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "plain")), progress=False)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with caplog.at_level(logging.INFO, logger="workflows.sweep"):
            model_dir, metrics = ensure_teacher(space, root)
    finally:
        ray.shutdown()
    said = [r.getMessage() for r in caplog.records if r.name == "workflows.sweep"]
    went_on = f"the dense teacher went on from the checkpoint {run_dir / 'checkpoint'}, where an earlier sweep stopped"
    restarted = [line for line in said if line.endswith("; the dense teacher was fine-tuned from the start")]
    assert (went_on in said, len(restarted)) == (not damaged, int(damaged)), said
    if damaged:
        assert restarted[0].startswith(f"{run_dir / 'checkpoint' / 'model.safetensors'}: "), restarted
    assert model_dir == str(run_dir / "final") and metrics["step"] == 6
    assert sorted(p.name for p in run_dir.iterdir()) == ["final", "metrics.json"]
    a, b = load_model(plain["model_dir"]), load_model(model_dir)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-5), name  # as the run that was never stopped


def test_a_storage_path_under_the_home_directory_given_from_python_is_read_so(tmp_path, monkeypatch):
    """run_sweep(storage_path="~/runs") wrote into a directory named `~` under the working directory (the command
    line read `~`, the library did not)."""
    from workflows.sweep import StorageError, _storage_roots

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    root, local = _storage_roots("~/runs", make=False)
    assert root == str(tmp_path / "home" / "runs") and local == tmp_path / "home" / "runs"
    monkeypatch.delenv("HOME")
    import pwd

    def unknown(uid):
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", unknown)
    with pytest.raises(StorageError, match=r"^--storage-path ~/runs: ~ is the home directory, and this process has "
                                           r"none \(HOME is not set\); give the path in full$"):
        _storage_roots("~/runs", make=False)
    assert not (tmp_path / "~").exists()


def test_a_trial_the_scheduler_stops_early_leaves_no_checkpoint_and_a_finished_one_keeps_its_own(tmp_path):
    """A trial ASHA stops keeps no training checkpoint (a model and its optimizer state, 1.3 GB for BERT-base, that
    nothing reads again); a trial that ran to its end keeps its last checkpoint. Four trials, one at a time, each
    reporting its value at each of two steps: the first is alone at the first rung and goes on, the next three
    report less than the best so far and are stopped there."""
    import logging
    import tempfile

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from workflows.sweep import StoppedEarlyCheckpoints

    def trainable(config):
        for step in (1, 2):
            directory = Path(tempfile.mkdtemp())
            (directory / "state.bin").write_bytes(b"\0" * 1024)
            tune.report({"score": config["score"], "final": step == 2}, checkpoint=tune.Checkpoint.from_directory(
                str(directory)))

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        tuner = tune.Tuner(
            trainable, param_space={"score": tune.grid_search([4.0, 3.0, 2.0, 1.0])},
            tune_config=tune.TuneConfig(max_concurrent_trials=1, scheduler=ASHAScheduler(
                metric="score", mode="max", grace_period=1, max_t=2, reduction_factor=2)),
            run_config=tune.RunConfig(name="asha", storage_path=str(tmp_path), verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      callbacks=[StoppedEarlyCheckpoints()]))
        results = tuner.fit()
    finally:
        ray.shutdown()
    ended = {result.config["score"]: result for result in results}
    assert {score: result.metrics["final"] for score, result in ended.items()} == {
        4.0: True, 3.0: False, 2.0: False, 1.0: False}
    checkpoints = {score: sorted(Path(result.path).glob("checkpoint_*")) for score, result in ended.items()}
    assert [len(checkpoints[score]) for score in (4.0, 3.0, 2.0, 1.0)] == [1, 0, 0, 0], checkpoints
    assert (checkpoints[4.0][0] / "state.bin").stat().st_size == 1024


def test_a_sweep_can_seek_speed_an_objective_reported_only_at_each_trial_s_end(tmp_path):
    """Speedup, which the tune_spaces README offers as an objective, is reported once, by the packed model at a
    trial's end: Tune refused each evaluation before it for lacking the objective, and the sweep stopped at its first
    (a ValueError), under Optuna and ASHA as in the smoke space. It runs; the frontier is F1 against speedup."""
    space = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    space.update(name="speed", num_samples=2, objectives=[["f1", "max"], ["speedup", "max"]],
                 reference_point={"f1": 0.0, "speedup": 0.0})
    proc, _ = sweep_command(space, tmp_path, "speed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["trials"] == 2 and "did not include the specified metric" not in proc.stderr, proc.stderr[-3000:]
    assert summary["frontier"] and all(row["speedup"] > 0 for row in summary["frontier"]), summary["frontier"]


def test_a_trial_whose_final_result_lacks_an_objective_fails_saying_which(tmp_path):
    """With Tune's check of every result off, a trial ending without an objective (a one-shot fisher run trains no
    step and reports no loss) was told to the sampler as None and left off the frontier, and the sweep ended as
    finished. The trial fails instead, in one line naming the objective."""
    from workflows.space import SpaceError, load_space
    from workflows.sweep import _check_objectives

    values = yaml.safe_load((ROOT / "tune_spaces" / "smoke.yaml").read_text())
    values.update(objectives=[["f1", "max"], ["loss", "min"]], reference_point={"f1": 0.0, "loss": 10.0})
    path = tmp_path / "loss.yaml"
    path.write_text(yaml.safe_dump(values))
    space = load_space(path)
    _check_objectives({"f1": 40.0, "loss": 2.5, "speedup": 1.5}, space)
    with pytest.raises(SpaceError) as err:
        _check_objectives({"f1": 40.0, "speedup": 1.5}, space)
    assert str(err.value) == (f"{path}: objectives: the trial's final result has no 'loss' (a run that trains no "
                              "step, such as fisher without fill_steps, reports no loss); give objectives every "
                              "trial reports")
