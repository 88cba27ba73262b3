"""The store as a person leaves it: runs, versions, experiments and files deleted or edited by hand (the MLflow UI,
``mlflow`` commands) between fineprune commands. Each command skips what is gone with a warning, or stops with one
line naming it (exit 2); none restores, registers or reports what was deleted as if it were there.

Real SQLite MLflow stores in a temporary directory, edited with MlflowClient as the UI edits them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from workflows import record, tracking
from workflows.cli import main

from conftest import sqlite_store, sweep_record

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


def _last_error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    return err.strip().splitlines()[-1]


def _sweeps_with_the_later_deleted(tmp_path: Path, summary: dict | None = None) -> tuple[str, MlflowClient, str, str,
                                                                                         str]:
    """Experiment 'smoke' with a finished sweep and a later, interrupted one deleted by hand, both of the space
    ``summary`` (default: none recorded): (uri, client, experiment id, finished sweep run, deleted sweep run)."""
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("smoke", artifact_location=(tmp_path / "artifacts").as_uri())
    done = tracking.start_parent_run(client, "smoke", "/sweeps/done", summary or {}, resume=False)
    tracking.finish_parent_run(client, done)
    later = tracking.start_parent_run(client, "smoke", "/sweeps/later", summary or {}, resume=False)
    tracking.finish_parent_run(client, later, status="KILLED", state=record.SWEEP_INTERRUPTED)
    client.delete_run(later)
    return uri, client, experiment_id, done, later


def test_a_new_sweep_into_a_deleted_experiment_is_refused_and_leaves_its_runs_deleted(tmp_path, monkeypatch, capsys):
    """MLflow keeps a deleted experiment's name: restoring it would bring back every run it held (one deleted by hand
    before the experiment, too) and mix the new sweep into them."""
    uri = sqlite_store(tmp_path / "mlflow.db")
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


def test_resuming_a_misspelt_experiment_names_the_one_there_and_makes_nothing(tmp_path, monkeypatch, capsys):
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    tracking.start_parent_run(client, "smoke", "/sweeps/a", {}, resume=False)
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--space", str(SPACES / "smoke.yaml"), "--tracking-uri", uri, "--experiment", "smoek",
                 "--resume"]) == 2
    assert _last_error(capsys) == (f"fineprune sweep: error: --resume: experiment 'smoek' in {uri} has no sweep to "
                                   "resume; did you mean 'smoke'?")
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "smoke"]  # no experiment made


def test_a_deleted_sweep_run_named_by_id_is_one_line(tmp_path, monkeypatch, capsys):
    """``--resume RUN_ID`` of a deleted sweep would start another parent run beside it (whose trials would run
    again in new runs); ``report --sweep-run`` would report it as if it were there."""
    uri, client, experiment_id, kept, gone = _sweeps_with_the_later_deleted(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--space", str(SPACES / "smoke.yaml"), "--tracking-uri", uri, "--resume", gone]) == 2
    line = _last_error(capsys)
    assert line == (f"fineprune sweep: error: --resume {gone}: run {gone} (a sweep of experiment 'smoke') was deleted; "
                    f"restore it (`{record.restore_command(uri, gone)}`) to use it again")
    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [kept]  # no parent run made beside it
    assert main(["report", "--experiment", "smoke", "--tracking-uri", uri, "--out", "r", "--sweep-run", gone]) == 2
    assert _last_error(capsys) == (f"fineprune report: error: run {gone} (a sweep of experiment 'smoke') was deleted; "
                                   f"restore it (`{record.restore_command(uri, gone)}`) to use it again")
    assert not (tmp_path / "r" / "report.md").exists()


def test_the_restore_command_a_line_gives_restores_the_run_in_the_store_it_was_deleted_from(tmp_path, monkeypatch,
                                                                                             capsys):
    """The line told a user of `--tracking-uri sqlite:///other.db` to run `mlflow runs restore --run-id RUN`, which
    reads MLFLOW_TRACKING_URI only: it "restored" the run in the default store and left it deleted in theirs. The
    command it gives now names the store, and run as given it brings the run back."""
    uri, client, _, _, gone = _sweeps_with_the_later_deleted(tmp_path)
    elsewhere = tmp_path / "elsewhere"  # where the user types it: mlflow's default store would be ./mlflow.db here
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["report", "--experiment", "smoke", "--tracking-uri", uri, "--out", "r", "--sweep-run", gone]) == 2
    command = re.search(r"restore it \(`(.*?)`\)", _last_error(capsys)).group(1)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(["bash", "-c", command], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert client.get_run(gone).info.lifecycle_stage == "active"
    assert not (elsewhere / "mlflow.db").exists()


@pytest.mark.parametrize("command", [["register"], ["report", "--out", "r"]])
def test_register_and_report_say_the_experiment_was_deleted(command, tmp_path, monkeypatch, capsys):
    """An experiment deleted in the UI is still in the store (MLflow keeps its name): "not found" sent the user
    looking for a typo; the line now says it was deleted, and how to have it back."""
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("smoke", artifact_location=(tmp_path / "artifacts").as_uri())
    tracking.finish_parent_run(client, tracking.start_parent_run(client, "smoke", "/sweeps/a", {}, resume=False))
    client.delete_experiment(experiment_id)
    monkeypatch.chdir(tmp_path)
    assert main([command[0], "--experiment", "smoke", "--tracking-uri", uri, *command[1:]]) == 2
    assert _last_error(capsys) == f"fineprune {command[0]}: error: " + record.deleted_experiment("smoke", experiment_id,
                                                                                                 uri)
    assert client.get_experiment(experiment_id).lifecycle_stage == "deleted"
    assert not (tmp_path / "r").exists()


def test_resume_says_it_passes_over_a_deleted_latest_sweep(tmp_path, monkeypatch, capsys, caplog):
    """`sweep --resume` after the experiment's latest sweep run was deleted in the UI went on with the sweep before
    it without a word (as `register` and `report` did); it still takes the latest sweep left, but says which, and
    that the later one was deleted; with none left, it says the latest was deleted rather than that there is none."""
    from workflows.space import load_space

    # Sweeps of the space resumed: a finished one resumed with another is refused as another space.
    uri, client, _, done, later = _sweeps_with_the_later_deleted(tmp_path, load_space(SPACES / "smoke.yaml").summary())
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "--space", str(SPACES / "smoke.yaml"), "--tracking-uri", uri, "--resume"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["parent_run_id"] == done
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "workflows.record"] == [
        f"experiment 'smoke': using sweep run {done}, the latest left: the later sweep run {later} was deleted "
        f"(restore one with `{record.restore_command(uri, 'RUN_ID')}`, or pass --resume RUN_ID)"]
    client.delete_run(done)
    assert main(argv) == 2
    assert _last_error(capsys) == ("fineprune sweep: error: --resume: experiment 'smoke' has no sweep left to resume: "
                                   + record.deleted_run(later, "its latest sweep", uri))


# ---- a sweep's record with registered versions ---------------------------------------------------------------

NAME = "store-edits"
# trial name -> (heads kept per layer, FFN width kept, F1, linear density, on the density frontier)
TRIALS = {"wide": (2, 64, 80.0, 0.5, True), "narrow": (1, 32, 60.0, 0.3, True), "dominated": (1, 16, 20.0, 0.4, False)}


def _sweep_record(root: Path, tokenizer) -> dict:
    """A sweep's parent run (registry policy best_f1_under_density 0.6, no ONNX export), its dense baseline and three
    finished trials whose packed models are tiny packed BERTs; ``wide`` is the policy's champion."""
    uri = sqlite_store(root / "mlflow.db")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("exp", artifact_location=(root / "artifacts").as_uri())
    return {"client": client, "uri": uri, **sweep_record(client, root, tokenizer, NAME, "sweep", TRIALS)}


def _register(capsys, uri: str, *flags: str) -> tuple[int, str, str]:
    status = main(["register", "--experiment", "exp", "--tracking-uri", uri, *flags])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def _version_of(client, run_id: str):
    return next(v for v in client.search_model_versions(f"name = '{NAME}'") if v.tags[record.TAG_TRIAL_RUN] == run_id)


def test_a_version_whose_files_were_deleted_is_never_made_champion_again(tmp_path, tokenizer, capsys, caplog):
    """The packed model of the champion's version removed from the artifact store by hand: `register` reused the
    version as it was and pointed the alias at a model that no longer loads; it now stops with one line (the alias
    stays where it was), `register --frontier` leaves that point out with a warning, and once the version is
    deleted, registering makes it anew from the trial's packed model."""
    import shutil

    made = _sweep_record(tmp_path, tokenizer)
    client, uri, runs = made["client"], made["uri"], made["runs"]
    status, out, _ = _register(capsys, uri, "--frontier")
    assert status == 0
    wide, narrow = _version_of(client, runs["wide"]), _version_of(client, runs["narrow"])
    client.set_registered_model_alias(NAME, "champion", narrow.version)  # moved by hand meanwhile
    files = client.get_model_version_download_uri(NAME, wide.version)
    shutil.rmtree(Path(files.replace("file://", "")) / "artifacts" / "packed_model")

    status, out, err = _register(capsys, uri)
    assert status == 2 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"fineprune register: error: version {wide.version} of {NAME} (trial run {runs['wide']}) "
                           "cannot be served: its model_dir (artifacts/packed_model) is gone from ")
    assert line.endswith("alias 'champion' left where it was")
    assert client.get_model_version_by_alias(NAME, "champion").version == narrow.version

    status, out, err = _register(capsys, uri, "--frontier")
    assert status == 2
    assert [r.getMessage().split(" cannot be served")[0] for r in caplog.records if r.levelname == "WARNING"
            and r.name == "workflows.registry"] == [f"version {wide.version} of {NAME} (trial run {runs['wide']})"]
    assert _version_of(client, runs["wide"]).tags["pareto"] == "true"  # still a point of the frontier

    client.delete_model_version(NAME, wide.version)
    status, out, _ = _register(capsys, uri)
    assert status == 0
    again = _version_of(client, runs["wide"])
    assert int(again.version) > int(narrow.version) and client.get_model_version_by_alias(NAME, "champion").version \
        == again.version
    from workflows.version_files import lost_files

    assert lost_files(client.get_model_version_download_uri(NAME, again.version), uri) is None


def test_register_and_report_name_the_sweep_they_use_when_a_later_one_was_deleted(tmp_path, tokenizer, monkeypatch,
                                                                                   capsys, caplog):
    """The experiment's latest sweep run deleted in the UI: `register` took the sweep before it and moved the alias
    to that sweep's champion without a word of which sweep it used. A deleted sweep is one set aside, so the
    latest left is still used, by `register` and `report` alike, but each names it and the deleted one, and
    `register`'s result names the sweep; `--sweep-run` picks another."""
    made = _sweep_record(tmp_path, tokenizer)
    client, uri, first = made["client"], made["uri"], made["parent"]
    later = tracking.start_parent_run(client, "exp", str(tmp_path / "later"), {}, resume=False)
    tracking.finish_parent_run(client, later)
    client.delete_run(later)
    warning = (f"experiment 'exp': using sweep run {first}, the latest left: the later sweep run {later} was deleted "
               f"(restore one with `{record.restore_command(uri, 'RUN_ID')}`, or pass --sweep-run)")

    status, out, _ = _register(capsys, uri)
    assert status == 0 and json.loads(out)["sweep_run_id"] == first
    assert client.get_model_version_by_alias(NAME, "champion").tags[record.TAG_TRIAL_RUN] == made["runs"]["wide"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "workflows.record"] \
        == [warning]
    caplog.clear()
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--experiment", "exp", "--tracking-uri", uri, "--out", "r"]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "workflows.record"] \
        == [warning]
    assert first in (tmp_path / "r" / "report.md").read_text()
    capsys.readouterr()

    status, out, _ = _register(capsys, uri, "--sweep-run", later)
    assert status == 2 and out == ""
    client.delete_run(first)
    status, out, err = _register(capsys, uri)
    assert status == 2 and err.strip().splitlines()[-1] == (
        f"fineprune register: error: experiment 'exp' in {uri} has no sweep run left: "
        + record.deleted_run(later, "its latest sweep", uri))


def test_register_frontier_says_a_versions_trial_run_was_deleted(tmp_path, tokenizer, capsys, caplog):
    """A frontier version's trial run deleted in the UI: `register --frontier` turned its frontier tags false and
    logged that it "has left the frontier", which it had not; it now says its trial run was deleted."""
    made = _sweep_record(tmp_path, tokenizer)
    client, uri, runs, parent = made["client"], made["uri"], made["runs"], made["parent"]
    assert _register(capsys, uri, "--frontier")[0] == 0
    narrow = _version_of(client, runs["narrow"])
    client.delete_run(runs["narrow"])
    caplog.clear()
    caplog.set_level("INFO", logger="workflows.registry")
    status, out, _ = _register(capsys, uri, "--frontier")
    assert status == 0 and [row["run_id"] for row in json.loads(out)["frontier_versions"]] == [runs["wide"]]
    said = [r for r in caplog.records if r.name == "workflows.registry"
            and r.getMessage().startswith(f"version {narrow.version} of ")]
    assert [(r.levelname, r.getMessage().split(" (its")[0]) for r in said] == [(
        "WARNING", f"version {narrow.version} of {NAME}: its trial run {runs['narrow']} was deleted, so it is no "
                   f"longer a point of the frontier of sweep run {parent}")]
    assert _version_of(client, runs["narrow"]).tags["pareto"] == "false"


def _resumed_without_t1(tmp_path, remove) -> tuple[MlflowClient, str, dict[str, str]]:
    """A sweep interrupted with trial t1 finished and t2 running, ``remove(client, uri, t1's run id)`` done to t1's
    run, then resumed (Tune restoring t1, ended, and t2, which finishes, and the callback's state as Tune saved it):
    (the client, the sweep's run id, each trial's first run id)."""
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.tune.experiment import Trial

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("exp", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = tracking.start_parent_run(client, "exp", str(tmp_path / "sweep"), {}, resume=False)
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "config.json").write_text("{}")

    def params_of(config):
        return {"method": "topk", **{f"searched.{k}": v for k, v in config.items()}}

    def trial(trial_id: str, density: float, final: bool) -> Trial:
        t = Trial("trial_main", config={"target_density": density}, trial_id=trial_id, stub=True)
        result = {"step": 6 if final else 3, "f1": 50.0, "linear_density": density, "final": final}
        if final:
            t.run_metadata.checkpoint_manager.register_checkpoint(
                _TrainingResult(checkpoint=tune.Checkpoint.from_directory(str(packed)), metrics=result))
        t.update_last_result(result)
        t.set_status(Trial.TERMINATED if final else Trial.RUNNING)
        return t

    # The first session: t1 finished, t2 running when the sweep was interrupted.
    first = tracking.MlflowTrialCallback(uri, "exp", parent, params_of, outage_limit=30)
    t1, t2 = trial("t1", 0.3, True), trial("t2", 0.5, False)
    first.on_step_begin(iteration=0, trials=[])
    for t in (t1, t2):
        first.on_trial_start(iteration=0, trials=[t1, t2], trial=t)
        first.on_trial_result(iteration=0, trials=[t1, t2], trial=t, result=t.last_result)
    first.on_trial_complete(iteration=0, trials=[t1, t2], trial=t1)
    first.on_experiment_end(trials=[t1, t2])
    runs = {r.data.tags[record.TAG_TRIAL]: r.info.run_id for r in client.search_runs([experiment_id],
                                                                                   "tags.`fineprune.kind` = 'trial'")}
    remove(client, uri, runs["t1"])

    # The resume: Tune restored t1 (ended) and t2, which runs on and finishes, and the callback's state.
    t1, t2 = trial("t1", 0.3, True), trial("t2", 0.5, False)
    resumed = tracking.MlflowTrialCallback(uri, "exp", parent, params_of, outage_limit=30)
    resumed.set_state(first.get_state())
    resumed.on_step_begin(iteration=0, trials=[t1, t2])
    resumed.on_trial_start(iteration=0, trials=[t1, t2], trial=t2)
    t2 = trial("t2", 0.5, True)
    resumed.on_trial_result(iteration=0, trials=[t1, t2], trial=t2, result=t2.last_result)
    resumed.on_trial_complete(iteration=0, trials=[t1, t2], trial=t2)
    resumed.on_experiment_end(trials=[t1, t2])
    assert resumed.failure is None
    return client, parent, runs


def test_a_resumed_sweep_leaves_out_a_trial_whose_run_was_deleted(tmp_path, caplog):
    """A finished trial's run deleted in the UI while the sweep stood interrupted: the resumed sweep's callback,
    given the trial as Tune restored it, logged it again in a new run (its packed model uploaded again, so that
    the sweep's end tagged and registered it again); it now leaves the trial out, with one warning."""
    client, parent, runs = _resumed_without_t1(tmp_path, lambda client, uri, run_id: client.delete_run(run_id))
    table = record.trials(client, parent, include_baseline=False)
    assert list(table["run_id"]) == [runs["t2"]] and list(table["status"]) == ["finished"]
    assert client.get_run(runs["t1"]).info.lifecycle_stage == "deleted"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "was deleted" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"trial t1: its MLflow run {runs['t1']} was deleted")


def test_a_resumed_sweep_leaves_out_a_trial_whose_run_was_removed_for_good(tmp_path, caplog):
    """A finished trial's run deleted and then removed for good with `mlflow gc` while the sweep stood interrupted:
    the resumed sweep found no run of the trial, deleted or not, so it logged the trial again in a new run, as if
    its result had never been logged ("logging trial t1, which ended while its result could not be logged"), and
    the sweep's end tagged and registered it again. The callback's state, which Tune saves with the sweep's, now
    names the run each trial was logged in: a trial whose run is gone from the store is left out, with one warning
    that says it was removed for good."""
    def gc(client, uri, run_id):
        client.delete_run(run_id)
        done = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "gc", "--backend-store-uri", uri,
                               "--tracking-uri", uri, "--run-ids", run_id], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr

    client, parent, runs = _resumed_without_t1(tmp_path, gc)
    table = record.trials(client, parent, include_baseline=False)
    assert list(table["run_id"]) == [runs["t2"]] and list(table["status"]) == ["finished"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "workflows.tracking"]
    assert warnings == [f"trial t1: its MLflow run {runs['t1']} was removed for good (`mlflow gc`); the trial is left "
                        "out of the sweep's record"]


def test_select_says_which_version_it_cannot_rank_for_an_f1_tag_edited_by_hand(tmp_path, tokenizer, capsys, caplog,
                                                                               monkeypatch):
    """The most accurate version's f1 tag set to text (or removed) in the UI: `select` passed it over without a word
    and chose a less accurate one; it still cannot rank it, but now says so, naming the version and the tag. The
    command the warning gives to write the tag again was "`fineprune register --frontier`", which stops on its
    required --experiment (and read the default store); it now names the experiment, the sweep and the store, and
    run as written elsewhere it writes the tags back."""
    made = _sweep_record(tmp_path, tokenizer)
    client, uri, runs = made["client"], made["uri"], made["runs"]
    assert _register(capsys, uri, "--frontier")[0] == 0
    wide, narrow = _version_of(client, runs["wide"]), _version_of(client, runs["narrow"])
    client.set_model_version_tag(NAME, wide.version, "f1", "high")
    client.delete_model_version_tag(NAME, narrow.version, "f1")
    status = main(["select", "--registered-model", NAME, "--max-latency-ms", "10000", "--repeats", "1",
                   "--seq-len", "32", "--tracking-uri", uri])
    out, err = capsys.readouterr()
    assert status == 2 and "Traceback" not in err
    warnings = sorted(r.getMessage().split(", so")[0] for r in caplog.records
                      if r.levelname == "WARNING" and r.name == "workflows.version_timing")
    assert warnings == sorted([f"version {wide.version} of {NAME}: its f1 tag 'high' is not a number",
                               f"version {narrow.version} of {NAME}: it has no f1 tag"])
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == str(wide.version)  # left as it was
    # Registering the frontier again, as the warnings say, writes the tags from the trials; then the most accurate
    # version is chosen.
    import shlex

    commands = {part for r in caplog.records if r.name == "workflows.version_timing"
                for part in r.getMessage().split("`")[1::2] if part.startswith("fineprune register")}
    assert commands == {f"fineprune register --experiment exp --sweep-run {made['parent']} --frontier "
                        f"--tracking-uri {uri}"}, commands
    monkeypatch.chdir(tmp_path / "artifacts")  # elsewhere, with no store of its own
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(shlex.split(commands.pop())[1:]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert float(client.get_model_version(NAME, wide.version).tags["f1"]) == 80.0
    assert main(["select", "--registered-model", NAME, "--max-latency-ms", "10000", "--repeats", "1",
                 "--seq-len", "32", "--tracking-uri", uri]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == str(wide.version)


def test_select_says_a_deleted_registered_model_does_not_exist(tmp_path, capsys):
    """A registered model deleted in the UI goes with its versions: `select` said it "has no versions", as of a model
    whose versions alone were deleted; it now says the model does not exist (the registry keeps no trace of it)."""
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, source=(tmp_path / "model").as_uri()).version
    argv = ["select", "--registered-model", NAME, "--max-latency-ms", "10", "--tracking-uri", uri]
    assert main(["select", "--registered-model", "store-edit", *argv[3:]]) == 2  # misspelt: the name that is there
    assert _last_error(capsys) == ("fineprune select: error: registered model 'store-edit' does not exist in "
                                   f"{uri} (it was deleted, or never registered); did you mean {NAME!r}?")
    client.delete_model_version(NAME, version)
    assert main(argv) == 2
    assert _last_error(capsys) == f"fineprune select: error: registered model {NAME!r} has no versions in {uri}"
    client.delete_registered_model(NAME)
    assert main(argv) == 2
    assert _last_error(capsys) == (f"fineprune select: error: registered model {NAME!r} does not exist in {uri} (it "
                                   "was deleted, or never registered)")


def test_the_report_names_no_deleted_trials_version_as_champion_and_says_where_the_alias_is(tmp_path):
    """`select` moved the alias to another version of the sweep (which then records its policy), and that version was
    deleted by hand, taking the alias with it: the report named the sweep's earlier champion and said the alias "has
    since moved to another version" (it points at none); once that trial's run was deleted too, the report still
    named its version as the champion. It now says the alias points at no version, and names no version of a
    deleted trial."""
    from dataclasses import asdict

    from workflows.record import RegistrySpec
    from workflows.report import collect_report_data, render_html, render_markdown

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = client.create_experiment("exp", artifact_location=(tmp_path / "artifacts").as_uri())
    spec = RegistrySpec(NAME, "best_f1_under_density", max_density=0.5)
    parent = tracking.start_parent_run(client, "exp", "/sweeps/a", {"registry": asdict(spec)}, resume=False)
    client.create_registered_model(NAME)
    versions = {}
    for name, policy in (("first", "best_f1_under_density"), ("chosen", "best_f1_under_latency")):
        trial = client.create_run(experiment_id, tags={record.TAG_KIND: record.KIND_TRIAL, record.TAG_PARENT: parent,
                                                       record.TAG_STATUS: "finished", record.TAG_RUN_NAME: name})
        client.set_terminated(trial.info.run_id)
        versions[name] = (trial.info.run_id, client.create_model_version(
            NAME, source=(tmp_path / name).as_uri(), run_id=trial.info.run_id,
            tags={"sweep_run_id": parent, "fineprune.trial_run_id": trial.info.run_id, "policy": policy}).version)
    client.set_registered_model_alias(NAME, "champion", versions["chosen"][1])
    client.delete_model_version(NAME, versions["chosen"][1])  # and the alias with it

    data = collect_report_data("exp", uri)
    assert data.champion.version == str(versions["first"][1]) and not data.champion.alias_current
    note = "alias points at no version now (the version it pointed at was deleted, or the alias removed)"
    assert note in render_markdown(data) and "has since moved" not in render_markdown(data)
    assert "<code>champion</code> alias points at no version now" in render_html(data)

    client.delete_run(versions["first"][0])
    data = collect_report_data("exp", uri)
    assert data.champion is None
    assert "- **Champion**: none registered" in render_markdown(data)


def test_the_command_a_deleted_experiments_line_gives_to_remove_it_for_good_works(tmp_path):
    """The line for a deleted experiment said to remove it for good with `mlflow gc --backend-store-uri URI
    --experiment-ids ID`, which MLflow stops with "Tracking URL is not set" unless MLFLOW_TRACKING_URI is set, and
    gave a store in a directory with a space in its name unquoted ("Got unexpected extra arguments"); the command it
    gives now runs as given and removes the experiment."""
    import os
    import shlex
    import subprocess
    import sys

    tmp_path = tmp_path / "my runs"
    tmp_path.mkdir()
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("smoke", artifact_location=(tmp_path / "artifacts").as_uri())
    client.delete_experiment(experiment_id)
    line = record.deleted_experiment("smoke", experiment_id, uri)
    command = next(part for part in line.split("`") if part.startswith("mlflow gc "))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    done = subprocess.run([str(Path(sys.executable).with_name("mlflow")), *shlex.split(command)[1:]], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert client.get_experiment_by_name("smoke") is None
