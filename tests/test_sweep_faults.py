"""Sweeps survive hard faults: real processes, real signals, a real ``mlflow server`` stopped and started again.

One experiment, two sweeps of the smoke space, driven through the ``fineprune sweep`` command:

1. Sweep A (4 trials, one retry each): the worker process of a running trial gets SIGKILL, and right after, the
   tracking server goes away for 20 s. The trial goes on from its checkpoint, the other trials keep running, and
   every result is in MLflow at the end.
2. Sweep B, same experiment (6 trials): the driver gets SIGKILL once 3 trials are FINISHED in MLflow. ``--resume``
   resumes B, not the finished A; while it runs, the tracking server goes away for good, and the sweep fails with one
   line naming the server. Once the server is back, ``--resume`` finishes B and logs what was missed; ``--resume``
   again says B already finished.

Every sweep runs with a stale record of a dead local Ray (what a Ray killed without ``ray stop`` leaves): a sweep
without ``--address`` must start a private Ray and never try to join it. Every process the test starts is stopped
by process id (and whatever is left of the sweeps' Ray by the test's own directory), never by name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import (MlflowServer, assert_each_trial_registered_once, free_port, handed_to_handlers,
                      processes_mentioning, sqlite_store)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENT = "faults"
OUTAGE_S = 20


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_until(condition, timeout: float, what: str, poll: float = 0.5, alive: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            err = getattr(alive, "err_path", None)  # a driver's stderr says why it ended
            tail = err.read_text(errors="replace")[-4000:] if err is not None and err.exists() else ""
            raise AssertionError(f"the process ended (status {alive.returncode}) while waiting for {what}\n{tail}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def world():
    """A short directory (Ray's socket paths) with the store, the storage, a stale Ray record and the server."""
    root = Path(tempfile.mkdtemp(prefix="fpf-", dir="/tmp" if os.path.isdir("/tmp") else None))
    ray_tmp = root / "rt"
    (ray_tmp / "ray").mkdir(parents=True)
    # A local Ray killed without `ray stop` leaves its address here; nothing answers there any more.
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    space = yaml.safe_load((REPO / "tune_spaces" / "smoke.yaml").read_text())
    space.update(max_failures=1, scheduler=None)  # every trial runs to its end; one retry after a lost worker
    spaces = {}
    # A's trials report every 3 of 12 steps: one killed after its first or second report has half its work ahead.
    for name, values in (("a", {"num_samples": 4, "base": {**space["base"], "max_steps": 12}}),
                         ("b", {"num_samples": 6})):
        spaces[name] = root / f"smoke_{name}.yaml"
        spaces[name].write_text(yaml.safe_dump({**space, **values}))
    server = MlflowServer(root, env)
    drivers: list[subprocess.Popen] = []
    try:
        server.start()
        yield {"root": root, "env": env, "server": server, "spaces": spaces, "drivers": drivers}
    finally:
        for driver in drivers:
            if driver.poll() is None:
                _kill([driver.pid], signal.SIGKILL)
                driver.wait(timeout=30)
        server.stop()
        _kill(processes_mentioning(root), signal.SIGKILL)  # what is left of the sweeps' private Ray
        _wait_until(lambda: not processes_mentioning(root), 30, "the test's processes to end")
        shutil.rmtree(root, ignore_errors=True)


def _sweep(world: dict, space: str, *args: str) -> subprocess.Popen:
    root = world["root"]
    name = f"driver-{len(world['drivers'])}"
    command = [sys.executable, "-m", "workflows.cli", "sweep", "--space", str(world["spaces"][space]),
               "--experiment", EXPERIMENT, "--tracking-uri", world["server"].uri, "--storage-path", str(root / "ray"),
               *args]
    with open(root / f"{name}.out", "wb") as out, open(root / f"{name}.err", "wb") as err:
        driver = subprocess.Popen(command, cwd=root, env=world["env"], stdout=out, stderr=err, start_new_session=True)
    driver.name, driver.err_path = name, root / f"{name}.err"
    world["drivers"].append(driver)
    return driver


def _finish(world: dict, driver: subprocess.Popen, timeout: float = 420) -> tuple[int, dict | None, list[str]]:
    """Wait for a driver; its exit status, its JSON summary (the last stdout line) and its stderr lines."""
    driver.wait(timeout=timeout)
    out = (world["root"] / f"{driver.name}.out").read_text().strip().splitlines()
    err = (world["root"] / f"{driver.name}.err").read_text(errors="replace").strip().splitlines()
    summary = json.loads(out[-1]) if out and out[-1].startswith("{") else None
    return driver.returncode, summary, err


def _client(world: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=world["server"].uri)


def _runs(world: dict, **tags: str) -> list:
    client = _client(world)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()) or None
    return client.search_runs([experiment.experiment_id], filter_string=query or "", max_results=1000)


def _trials(world: dict, parent: str) -> list:
    return _runs(world, **{"mlflow.parentRunId": parent, "fineprune.kind": "trial"})


def _sweeps(world: dict) -> list:
    return sorted(_runs(world, **{"fineprune.kind": "sweep"}), key=lambda r: r.info.start_time)


def _configuration(run) -> tuple:
    return tuple(sorted((k, v) for k, v in run.data.params.items() if k.startswith("searched.")))


def _assert_sweep_is_whole(world: dict, parent: str, samples: int, summary: dict) -> None:
    """Every trial FINISHED once, no configuration twice, the frontier tags consistent, each model registered once."""
    client = _client(world)
    trials = _trials(world, parent)
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(finished) == samples, [(r.info.run_id, r.info.status, r.data.tags.get("fineprune.status"))
                                      for r in trials]
    assert all(r.data.tags.get("fineprune.status") == "finished" for r in finished)
    configurations = [_configuration(r) for r in trials]
    table = [(r.data.tags.get("fineprune.trial_id"), r.data.tags.get("fineprune.took_over_trial_id"), r.info.status,
              r.data.tags.get("fineprune.status"), _configuration(r)) for r in trials]
    assert all(configurations), ("a trial run without its configuration", table)
    assert len(set(configurations)) == len(configurations), ("a configuration logged twice", table)
    assert len({r.data.tags["fineprune.trial_id"] for r in trials}) == len(trials)
    for run in finished:
        for key in ("exact_match", "f1", "linear_density", "speedup"):
            assert key in run.data.metrics, (run.info.run_id, key)
        assert run.data.tags.get("fineprune.packed_artifact") == "packed_model"
    assert summary["trials"] == samples

    baseline = _runs(world, **{"mlflow.parentRunId": parent, "fineprune.kind": "baseline"})
    points = [(r.info.run_id, r.data.metrics["f1"], r.data.metrics["linear_density"]) for r in [*finished, *baseline]]

    def dominated(p):
        return any(q[1] >= p[1] and q[2] <= p[2] and (q[1], q[2]) != (p[1], p[2]) for q in points)

    tagged = {r.info.run_id for r in [*finished, *baseline] if r.data.tags.get("pareto") == "true"}
    assert tagged == {p[0] for p in points if not dominated(p)}
    assert {row["run_id"] for row in summary["frontier"]} == tagged

    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["fineprune.sweep_state"] == "complete"
    champion = summary["champion"]
    assert champion["registered"] and champion["run_id"] in {r.info.run_id for r in finished}
    assert_each_trial_registered_once(client, champion["name"])


# Five sweep processes one after another: 208 to 283 s, the longest test by far, kept out of CI's 30 minutes
# (`make test-slow`); the suite's other fault tests stay in it.
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the sweeps' processes in /proc")
def test_sweeps_survive_killed_trials_killed_drivers_and_tracking_outages(world):
    client = _client(world)
    server: MlflowServer = world["server"]

    # ---- Sweep A: a trial's worker gets SIGKILL, then the tracking server goes away for 20 s ----------------------
    driver = _sweep(world, "a")
    _wait_until(lambda: _sweeps(world), 300, "sweep A's parent run", alive=driver)
    parent_a = _sweeps(world)[0].info.run_id

    def first_report():  # a running trial with a checkpoint and at least half its work ahead (step 3 or 6 of 12)
        for run in _trials(world, parent_a):
            tags, metrics = run.data.tags, run.data.metrics
            if run.info.status == "RUNNING" and metrics.get("step") in (3, 6) and tags.get("fineprune.pid"):
                return run
        return None

    try:
        victim = _wait_until(first_report, 300, "a trial's first report", poll=0.2, alive=driver)
    except AssertionError as err:  # say what the trials did meanwhile
        steps = {r.data.tags.get("fineprune.trial_id"): (r.info.status, [m.step for m in client.get_metric_history(
            r.info.run_id, "step")]) for r in _trials(world, parent_a)}
        raise AssertionError(f"{err}; the trials' statuses and reported steps: {steps}") from None
    victim_pid = int(victim.data.tags["fineprune.pid"])
    os.kill(victim_pid, signal.SIGKILL)
    killed_at = time.time()
    server.stop()
    time.sleep(OUTAGE_S)
    back_at = time.time()
    server.start()
    status, summary_a, err = _finish(world, driver)
    assert status == 0, "\n".join(err[-40:])

    _assert_sweep_is_whole(world, parent_a, 4, summary_a)
    retried = client.get_run(victim.info.run_id)
    assert retried.data.tags.get("fineprune.retries") == "1"  # the killed worker's trial went on once ...
    assert int(retried.data.tags["fineprune.pid"]) != victim_pid  # ... in a new worker, whose results are the last
    history = client.get_metric_history(victim.info.run_id, "step")
    assert max(m.step for m in history) == 12 and max(m.timestamp for m in history) / 1000 >= killed_at - 1
    # The trials kept running while the server was away: results from the outage reached MLflow afterwards.
    during = [m for r in _trials(world, parent_a) for m in client.get_metric_history(r.info.run_id, "step")
              if killed_at <= m.timestamp / 1000 <= back_at - 1]
    assert during, "no trial reported while the tracking server was away"
    a_before = {r.info.run_id: (r.info.status, r.info.end_time) for r in _runs(world)}

    # ---- Sweep B, same experiment: the driver gets SIGKILL once 3 trials are FINISHED in MLflow -------------------
    driver = _sweep(world, "b")
    _wait_until(lambda: len(_sweeps(world)) == 2, 300, "sweep B's parent run", alive=driver)
    parent_b = _sweeps(world)[1].info.run_id
    _wait_until(lambda: sum(r.info.status == "FINISHED" for r in _trials(world, parent_b)) >= 3, 400,
                "3 finished trials of sweep B", poll=0.3, alive=driver)
    try:  # best when a trial has just started: Tune's saved state may not know it yet (its run is then taken over)
        _wait_until(lambda: any(r.info.status == "RUNNING" and not r.data.metrics for r in _trials(world, parent_b)),
                    20, "a trial of sweep B that just started", poll=0.2, alive=driver)
    except AssertionError:
        pass
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    crashed_at = time.time()
    assert client.get_run(parent_b).info.status == "RUNNING"  # nothing could close it

    # `--resume` resumes B; the tracking server then goes away for good and the sweep fails, naming it.
    driver = _sweep(world, "b", "--resume", "--tracking-timeout", "10")

    def resumed_reports():
        return any(m.timestamp / 1000 >= crashed_at for r in _trials(world, parent_b)
                   for m in client.get_metric_history(r.info.run_id, "step"))

    _wait_until(resumed_reports, 300, "a result of the resumed sweep B", alive=driver)
    server.stop()
    status, _, err = _finish(world, driver)
    assert status == 1, "\n".join(err[-40:])
    assert err[-1].startswith("fineprune sweep: error:") and server.uri in err[-1] and parent_b in err[-1], err[-1]

    # The server is back: `--resume` finishes B, logging what the failed driver could not.
    server.start()
    status, summary_b, err = _finish(world, _sweep(world, "b", "--resume"))
    assert status == 0, "\n".join(err[-40:])
    assert summary_b["parent_run_id"] == parent_b and summary_b["status"] == "finished"
    _assert_sweep_is_whole(world, parent_b, 6, summary_b)
    assert Path(summary_b["sweep_dir"]) != Path(summary_a["sweep_dir"])
    assert Path(summary_b["sweep_dir"]).parent == Path(summary_a["sweep_dir"]).parent == world["root"] / "ray"

    # Sweep A was left as it was: same runs, same states, same end times.
    assert {r.info.run_id: (r.info.status, r.info.end_time) for r in _runs(world)
            if r.info.run_id in a_before} == a_before
    assert not [r.info.run_id for r in _runs(world) if r.info.status == "RUNNING"]
    champion = client.get_model_version_by_alias(summary_b["champion"]["name"], "champion")
    assert champion.run_id in {r.info.run_id for r in _trials(world, parent_b)}

    # `--resume` of a finished sweep says so in one line, and changes nothing.
    runs_before = {r.info.run_id: r.info.end_time for r in _runs(world)}
    status, summary, err = _finish(world, _sweep(world, "b", "--resume"))
    assert status == 0 and summary["status"] == "already finished" and summary["parent_run_id"] == parent_b
    assert [line for line in err if "already finished" in line and parent_b in line]
    assert {r.info.run_id: r.info.end_time for r in _runs(world)} == runs_before


def test_a_ray_address_that_does_not_answer_fails_fast_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """``--address`` (or ``RAY_ADDRESS``) where nothing listens: exit 2, one line naming it, no MLflow store. (The
    wait is cut from 10 s to 2: what this checks is the line and what is left behind at its end.)"""
    from workflows import cli, sweep

    monkeypatch.setattr(sweep, "RAY_CONNECT_TIMEOUT_S", 2.0)
    monkeypatch.chdir(tmp_path)
    for name in [name for name in os.environ if name.startswith("RAY_")]:
        monkeypatch.delenv(name)
    port = free_port()
    base = ["sweep", "--space", str(REPO / "tune_spaces" / "smoke.yaml"), "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db", "--storage-path", str(tmp_path / "ray")]
    for extra, variables in (([f"--address=127.0.0.1:{port}"], {}), ([], {"RAY_ADDRESS": f"127.0.0.1:{port}"})):
        with monkeypatch.context() as env:
            for name, value in variables.items():
                env.setenv(name, value)
            status = cli.main([*base, *extra])
        err = capsys.readouterr().err
        assert status == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("fineprune sweep: error:") and f"127.0.0.1:{port}" in last, last
        assert "within 2 s" in last and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()


def test_cluster_address_defaults_to_a_private_ray(monkeypatch):
    from workflows.preflight import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None and cluster_address("local") is None
    assert cluster_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")  # as under `ray job submit`
    assert cluster_address(None) == "10.0.0.2:6379"
    assert cluster_address("local") is None


def test_a_resumed_sweep_joins_mlflow_with_what_tune_restored(tmp_path):
    """The callback of a resumed sweep, given the runs a dead driver left and the trials Tune restored.

    The dead driver started trials t1 (configuration A), t2 (B), t5 (D) and t6 (E) and logged a first result of
    each; Tune's saved state knew t1 and t6 only (t6 had even finished, but its end never reached MLflow). The resumed
    Tune run restarts t1, runs B again as t3 (the searcher replays it) and a new configuration C as t4.
    """
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.tune.experiment import Trial

    from workflows.tracking import MlflowTrialCallback, start_parent_run

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("reconcile", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = start_parent_run(client, "reconcile", str(tmp_path / "sweep"), {}, resume=False)

    def params_of(config):
        return {"method": "topk", **{f"searched.{k}": v for k, v in config.items()}}

    def trial(trial_id, density, status=Trial.PENDING):
        t = Trial("trial_main", config={"target_density": density, "temperature": 2}, trial_id=trial_id, stub=True)
        t.set_status(status)
        return t

    def report(callback, t, step, final=False):
        result = {"step": step, "f1": 10.0 + step, "linear_density": t.config["target_density"], "final": final,
                  "pid": 4242, "timestamp": int(time.time())}
        t.update_last_result(result)
        callback.on_trial_result(iteration=0, trials=[], trial=t, result=result)

    # The driver that died: four trials started, one result each, nothing ended.
    dead = MlflowTrialCallback(uri, "reconcile", parent, params_of, outage_limit=30)
    dead.on_step_begin(iteration=0, trials=[])
    old = {name: trial(name, density) for name, density in (("t1", 0.3), ("t2", 0.4), ("t5", 0.6), ("t6", 0.7))}
    for t in old.values():
        dead.on_trial_start(iteration=0, trials=[], trial=t)
        report(dead, t, 3)
    dead.flush()
    left = {r.data.tags["fineprune.trial_id"]: r for r in client.search_runs(
        [client.get_experiment_by_name("reconcile").experiment_id], "tags.`fineprune.kind` = 'trial'")}
    assert {k: r.info.status for k, r in left.items()} == dict.fromkeys(old, "RUNNING")

    # The resumed driver: Tune restored t1 (to run again) and t6 (TERMINATED, with its final result).
    t1 = trial("t1", 0.3)
    t6 = trial("t6", 0.7, Trial.TERMINATED)
    final = {"step": 6, "f1": 20.0, "linear_density": 0.7, "final": True, "timestamp": int(time.time())}
    packed = tmp_path / "t6-packed"  # its final checkpoint, the packed model, as Tune restored it
    packed.mkdir()
    (packed / "config.json").write_text("{}")
    t6.run_metadata.checkpoint_manager.register_checkpoint(
        _TrainingResult(checkpoint=tune.Checkpoint.from_directory(str(packed)), metrics=final))
    t6.update_last_result(final)
    t3, t4 = trial("t3", 0.4), trial("t4", 0.5)
    resumed = MlflowTrialCallback(uri, "reconcile", parent, params_of, outage_limit=30)
    resumed.on_step_begin(iteration=0, trials=[t1, t6])
    for t in (t1, t3, t4):
        resumed.on_trial_start(iteration=0, trials=[t1, t6, t3, t4], trial=t)
        report(resumed, t, 3)
        report(resumed, t, 6, final=False)
        t.set_status(Trial.TERMINATED)
        resumed.on_trial_complete(iteration=0, trials=[t1, t6, t3, t4], trial=t)
    resumed.on_experiment_end(trials=[t1, t6, t3, t4])
    assert resumed.failure is None

    runs = {r.info.run_id: r for r in client.search_runs(
        [client.get_experiment_by_name("reconcile").experiment_id], "tags.`fineprune.kind` = 'trial'")}
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    by_trial = {r.data.tags["fineprune.trial_id"]: r for r in runs.values()}
    assert by_trial["t1"].info.run_id == left["t1"].info.run_id  # restarted in its own run
    taken = by_trial["t3"]  # the lost t2's configuration ran again as t3, in t2's run
    assert taken.info.run_id == left["t2"].info.run_id and taken.data.tags["fineprune.took_over_trial_id"] == "t2"
    assert taken.info.status == "FINISHED" and taken.data.metrics["step"] == 6
    assert by_trial["t6"].info.status == "FINISHED" and by_trial["t6"].data.metrics["f1"] == 20.0  # logged now
    assert by_trial["t6"].data.tags["fineprune.status"] == "finished"
    assert by_trial["t6"].data.tags["fineprune.packed_artifact"] == "packed_model"
    lost = by_trial["t5"]  # nothing ran D again
    assert lost.info.status == "KILLED" and lost.data.tags["fineprune.status"] == "orphaned"
    assert by_trial["t4"].info.run_id not in {r.info.run_id for r in left.values()}
    configurations = [r.data.params["searched.target_density"] for r in runs.values()]
    assert len(configurations) == len(set(configurations)) == 5


def test_a_run_whose_params_a_dead_driver_never_logged_is_still_taken_over(tmp_path):
    """A driver killed between creating a trial's run and logging its params leaves a run with tags only.

    The run names its configuration from the moment it exists, so the resumed sweep's trial that runs that
    configuration again continues it (and logs its params) instead of opening a second run beside an empty one.
    """
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

    from workflows.tracking import MlflowTrialCallback, start_parent_run

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("halfway", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = start_parent_run(client, "halfway", str(tmp_path / "sweep"), {}, resume=False)
    config = {"target_density": 0.37, "temperature": 2}

    def params_of(config):
        return {"method": "topk", **{f"searched.{k}": v for k, v in config.items()}}

    def died_before_params(config):  # what the dead driver got written: the run, not its params
        raise RuntimeError("the driver died here")

    def trial(trial_id):
        return Trial("trial_main", config=dict(config), trial_id=trial_id, stub=True)

    dead = MlflowTrialCallback(uri, "halfway", parent, died_before_params, outage_limit=30)
    dead.on_step_begin(iteration=0, trials=[])
    dead.on_trial_start(iteration=0, trials=[], trial=trial("lost"))
    dead.flush()
    experiment_id = client.get_experiment_by_name("halfway").experiment_id
    (left,) = client.search_runs([experiment_id], "tags.`fineprune.kind` = 'trial'")
    assert not left.data.params and left.info.status == "RUNNING"

    resumed = MlflowTrialCallback(uri, "halfway", parent, params_of, outage_limit=30)
    resumed.on_step_begin(iteration=0, trials=[])
    again = trial("again")
    resumed.on_trial_start(iteration=0, trials=[again], trial=again)
    result = {"step": 6, "f1": 12.0, "linear_density": 0.37, "final": False, "timestamp": int(time.time())}
    again.update_last_result(result)
    resumed.on_trial_result(iteration=0, trials=[again], trial=again, result=result)
    again.set_status(Trial.TERMINATED)
    resumed.on_trial_complete(iteration=0, trials=[again], trial=again)
    resumed.on_experiment_end(trials=[again])
    assert resumed.failure is None

    (run,) = client.search_runs([experiment_id], "tags.`fineprune.kind` = 'trial'")
    assert run.info.run_id == left.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["fineprune.trial_id"] == "again" and run.data.tags["fineprune.took_over_trial_id"] == "lost"
    assert run.data.params["searched.target_density"] == "0.37" and run.data.params["searched.temperature"] == "2"


def test_an_error_file_cut_short_by_a_full_disk_does_not_end_the_sweep_in_a_traceback(tmp_path):
    """When the storage's disk fills, Tune writes a failed trial's pickled error cut short; ``Tuner.fit`` then raises
    reading it back into the results it returns (which the sweep does not use), after every trial ended and was
    logged. The sweep goes on from its MLflow record, with a warning; an error of the Tune loop itself is raised."""
    import logging

    import ray
    from ray import tune

    from workflows.sweep import _fit

    class CutShort(tune.Callback):  # what a full disk leaves of the error file Tune synced to the storage
        def on_experiment_end(self, trials, **info):
            for trial in trials:
                pickled = Path(trial.storage.trial_fs_path) / "error.pkl"
                pickled.write_bytes(pickled.read_bytes()[:40])

    class Broken(tune.Callback):
        def on_step_begin(self, iteration, trials, **info):
            raise RuntimeError("the Tune loop broke")

    def trainable(config):
        raise OSError(28, "No space left on device")

    def tuner(name: str, callback: tune.Callback) -> tune.Tuner:
        return tune.Tuner(trainable, run_config=tune.RunConfig(name=name, storage_path=str(tmp_path),
                                                               callbacks=[callback], verbose=0))

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with pytest.raises(Exception, match="truncated|ran out of input"):  # the fault, as Tune meets it
            tuner("plain", CutShort()).fit()
        _fit(tuner("swept", CutShort()), str(tmp_path / "swept"))
        with pytest.raises(RuntimeError, match="the Tune loop broke"):
            _fit(tuner("broken", Broken()), str(tmp_path / "broken"))
    finally:
        ray.shutdown()


def test_tunes_advice_to_snapshot_less_often_is_left_out_while_the_sweep_runs():
    """Trials that end within seconds of each other each force a snapshot of the sweep's state (what a resume reads),
    and Tune advised against it in three lines each time; the sweep leaves that warning out, and only that one.
    The message and logger are Ray's own (its source is read, so that an upgrade that rewords them fails here)."""
    import inspect
    import logging

    from ray.tune.execution import experiment_state

    from pruning.quiet import leaving_out, starting_with
    from workflows.sweep import _SNAPSHOT_ADVICE, _SNAPSHOT_LOGGER

    assert experiment_state.__name__ == _SNAPSHOT_LOGGER
    # Ray's source writes the message in two literals: "...triggered multiple " "times in the last ..."
    assert _SNAPSHOT_ADVICE.startswith("Experiment state snapshotting has been triggered multiple ")
    assert '"Experiment state snapshotting has been triggered multiple "\n' in inspect.getsource(experiment_state)

    tune_logger = logging.getLogger(_SNAPSHOT_LOGGER)
    advice = f"{_SNAPSHOT_ADVICE} in the last 5.0 seconds and may become a bottleneck."
    with handed_to_handlers(_SNAPSHOT_LOGGER) as seen:
        with leaving_out(_SNAPSHOT_LOGGER, starting_with(_SNAPSHOT_ADVICE)):  # as the sweep runs Tune
            tune_logger.warning(advice)
            tune_logger.warning("Saving the experiment state took 31 s")
        tune_logger.warning(advice)
    assert seen == ["Saving the experiment state took 31 s", advice]


def test_the_notices_a_sweep_leaves_out_are_named_by_the_libraries_own_logger_and_words():
    """Optuna's notice of its in-memory study and Ray's notice of token authentication on the sweep's private Ray are
    left out by logger and the start of the message. Both are read from the libraries' source, so that an upgrade
    that moves or rewords them fails here: the sweep's own test, which looks for the words, would not see them come
    back."""
    import inspect

    import optuna.storages._in_memory as study_storage
    from ray._private.authentication import authentication_token_setup as token_setup

    from workflows.sweep import _STUDY_CREATED, _STUDY_LOGGER, _TOKEN_LOGGER, _TOKEN_NOTICE

    assert study_storage._logger.name == _STUDY_LOGGER
    assert f'_logger.info(f"{_STUDY_CREATED} in memory with name: ' in inspect.getsource(study_storage)
    assert token_setup.logger.name == _TOKEN_LOGGER
    assert f'"{_TOKEN_NOTICE}. Set "' in inspect.getsource(token_setup._warn_token_auth_enabled)


def test_resuming_a_sweep_whose_tune_state_a_full_disk_cut_short_is_one_line_naming_the_file(tmp_path):
    """A disk that filled while Tune saved the sweep's state leaves the JSON cut short. Restored from it, Tune logged
    the failure, went on without the state and stopped in a traceback from its search; ``--resume`` now says which
    file it cannot read, before Ray starts, and leaves the sweep's run as it was."""
    import pickle

    from mlflow.tracking import MlflowClient

    from workflows import record, tracking
    from workflows.space import load_space

    space_path = REPO / "tune_spaces" / "smoke.yaml"
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("smoke", artifact_location=(tmp_path / "artifacts").as_uri())
    sweep_dir = tmp_path / "ray" / "smoke-20260101-000000-abcdef"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "tuner.pkl").write_bytes(pickle.dumps({"tuner": "as Tune saved it"}))
    state = sweep_dir / "experiment_state-2026-01-01_00-00-00.json"
    state.write_text('{"trial_data": [["{\\"trial_id\\": \\"6be2d1db\\", \\"config\\": {\\"target_den')
    parent = tracking.start_parent_run(client, "smoke", str(sweep_dir), load_space(space_path).summary(), False)
    tracking.finish_parent_run(client, parent, status="FAILED", state=record.SWEEP_INTERRUPTED)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "workflows.cli", "sweep", "--space", str(space_path),
                           "--tracking-uri", uri, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith(f"fineprune sweep: error: --resume {parent}: {state}: "), lines[-1]
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags[record.TAG_SWEEP_STATE] == record.SWEEP_INTERRUPTED
    assert not (tmp_path / "ray" / "teachers").exists()  # nothing ran


def test_the_state_tune_saves_for_its_searchers_passes_the_resume_check(tmp_path):
    """Tune writes its searchers' state as pickles under ``.json`` names (``search_gen_state-*.json``,
    ``basic-variant-state-*.json``): the check before a resume reads each file as what it holds, so a whole state
    passes (it refused every resume of an Optuna or grid sweep as 'cannot be read') and one cut short does not; so
    does the MLflow callback's state (the run each trial was logged in), which a restored Tune run reads too."""
    import pickle

    from ray import tune
    from ray.tune.callback import CallbackList
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.search_generator import SearchGenerator

    from workflows.sweep import ResumeError, _check_tune_state
    from workflows.tracking import MlflowTrialCallback

    session = "2026-01-01_00-00-00"
    (tmp_path / "tuner.pkl").write_bytes(pickle.dumps({"tuner": "as Tune saved it"}))
    (tmp_path / f"experiment_state-{session}.json").write_text('{"trial_data": []}')
    BasicVariantGenerator().save_to_dir(str(tmp_path), session_str=session)
    searcher = OptunaSearch(metric="f1", mode="max")
    searcher.set_search_properties("f1", "max", {"x": tune.uniform(0.0, 1.0)})
    SearchGenerator(searcher).save_to_dir(str(tmp_path), session_str=session)
    callback = MlflowTrialCallback(f"sqlite:///{tmp_path}/mlflow.db", "exp", "parent", dict)
    callback.set_state({"runs": {"t1": "run-of-t1"}})
    CallbackList([callback]).save_to_dir(str(tmp_path), session_str=session)
    saved = sorted(path.name for path in tmp_path.iterdir())
    assert f"search_gen_state-{session}.json" in saved and f"basic-variant-state-{session}.json" in saved, saved
    assert f"callback-states-{session}.pkl" in saved, saved

    _check_tune_state(str(tmp_path), "run-1")  # whole: no error

    for name in (f"search_gen_state-{session}.json", f"basic-variant-state-{session}.json",
                 f"callback-states-{session}.pkl", "tuner.pkl"):
        state = tmp_path / name
        whole = state.read_bytes()
        state.write_bytes(whole[: len(whole) // 2])
        with pytest.raises(ResumeError, match=re.escape(str(state))):
            _check_tune_state(str(tmp_path), "run-1")
        state.write_bytes(whole)


_LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) [\w.]+: ")


def _sweep_cli(tmp_path: Path, uri: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "workflows.cli", "sweep", "--space",
                           str(REPO / "tune_spaces" / "smoke.yaml"), "--tracking-uri", uri, "--storage-path",
                           str(tmp_path / "ray"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_tracking_store_that_refuses_writes_stops_a_sweep_in_one_line_before_ray_starts(tmp_path):
    """A SQLite store the sweep may read but not write (a file of another user, a read-only mount; here opened
    read-only by its URI, which gives the same database error) was a traceback, and MLflow's own log of it, from
    the sweep's first write: now one line naming the URI and the database's reason, exit 2, nothing started."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))
    client.create_experiment("smoke", artifact_location=(tmp_path / "artifacts").as_uri())
    uri = f"sqlite:///file:{tmp_path}/mlflow.db?mode=ro&uri=true"
    done = _sweep_cli(tmp_path, uri)
    assert done.returncode == 2, done.stderr[-3000:]
    # One line besides the space's own log records (the smoke space's trials are scored on their training
    # questions, which a sweep says once before it opens the store): no traceback, no MLflow log of the error.
    said = [line for line in done.stderr.strip().splitlines() if not _LOG_RECORD.match(line)]
    assert said == [f"fineprune sweep: error: tracking URI {uri}: (sqlite3.OperationalError) attempt to write a "
                    "readonly database"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and " ERROR " not in done.stderr, done.stderr[-3000:]
    assert not client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert not (tmp_path / "ray" / "teachers").exists()


def test_a_tracking_store_locked_at_the_start_is_waited_for_then_one_line(tmp_path):
    """Another process holds the SQLite store's write lock (a sweep writing, a backup): the sweep's first write,
    after SQLite's own wait, is retried for --tracking-timeout seconds and then stops in one line (exit 1) naming
    the store and the lock, instead of a traceback; no run is left behind."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("smoke", artifact_location=(tmp_path / "artifacts").as_uri())
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock; reads go on
        done = _sweep_cli(tmp_path, uri, "--tracking-timeout", "5")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fineprune sweep: error: the tracking server {uri} did not answer") and \
        "database is locked" in last, last
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not client.search_runs([experiment])


def _sweep_root(prefix: str):
    """A new directory (short, for Ray's sockets) for a sweep run as a process, with a SQLite store holding the
    experiment `smoke`: (root, tracking URI, client, experiment id, the process's environment, with a private Ray
    under root and no Ray or MLflow settings of the caller's)."""
    from mlflow.tracking import MlflowClient

    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))
    uri = sqlite_store(root / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("smoke", artifact_location=(root / "artifacts").as_uri())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               RAY_TMPDIR=str(root / "rt"), RAY_USAGE_STATS_ENABLED="0")
    (root / "rt").mkdir()
    return root, uri, client, experiment, env


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the sweep's processes in /proc")
def test_a_tracking_store_locked_while_the_sweep_records_its_frontier_is_waited_for(tmp_path):
    """Every trial ended; while the sweep tags, registers and reports its frontier, another process holds the SQLite
    store's write lock for longer than SQLite waits. Those steps were not retried: the sweep ended in a traceback
    with its run left RUNNING. They are now waited for as the trials' logging is, and the sweep finishes whole."""
    import sqlite3

    root, uri, client, experiment, env = _sweep_root("fpl-")
    command = [sys.executable, "-m", "workflows.cli", "sweep", "--space", str(REPO / "tune_spaces" / "smoke.yaml"),
               "--tracking-uri", uri, "--storage-path", str(root / "ray")]
    with open(root / "driver.out", "wb") as out, open(root / "driver.err", "wb") as err:
        driver = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        tagged = lambda: client.search_runs([experiment], "tags.pareto = 'true'")  # noqa: E731
        _wait_until(tagged, 600, "the sweep's frontier tags", poll=0.2, alive=driver)
        holder = sqlite3.connect(root / "mlflow.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            time.sleep(45)  # past SQLite's own 20 s wait
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        driver.wait(timeout=600)
        stderr = (root / "driver.err").read_text(errors="replace")
        assert driver.returncode == 0, stderr[-3000:]
        assert "database is locked" in stderr  # it did meet the lock
        summary = json.loads((root / "driver.out").read_text().strip().splitlines()[-1])
        assert summary["status"] == "finished" and summary["champion"]["registered"]
        assert not [r for r in client.search_runs([experiment]) if r.info.status == "RUNNING"]
        assert client.get_run(summary["parent_run_id"]).data.tags["fineprune.sweep_state"] == "complete"
        assert_each_trial_registered_once(client, summary["champion"]["name"])
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        _kill(processes_mentioning(root), signal.SIGKILL)  # what is left of the sweep's private Ray
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the sweep's processes in /proc")
def test_a_tracking_store_locked_while_the_teacher_trains_is_waited_for_at_the_baseline(tmp_path):
    """The store is locked (or a server away) from the moment the sweep's run is opened, through the teacher's
    training, to past SQLite's own wait at the dense baseline's logging: that write was not retried (an outage there
    kept MLflow's own minutes of retries, past --tracking-timeout, then a traceback). It is waited for now, as the
    trials' writes are, and the sweep finishes whole."""
    import sqlite3

    root, uri, client, experiment, env = _sweep_root("fpb-")
    command = [sys.executable, "-m", "workflows.cli", "sweep", "--space", str(REPO / "tune_spaces" / "smoke.yaml"),
               "--tracking-uri", uri, "--storage-path", str(root / "ray"), "--tracking-timeout", "120"]
    with open(root / "driver.out", "wb") as out, open(root / "driver.err", "wb") as err:
        driver = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=err, start_new_session=True)
    driver.err_path = root / "driver.err"
    try:
        _wait_until(lambda: "fine-tuning the dense teacher" in driver.err_path.read_text(errors="replace"), 300,
                    "the teacher's training", poll=0.1, alive=driver)  # the sweep's run is written whole by then
        holder = sqlite3.connect(root / "mlflow.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            _wait_until(lambda: "logging the dense baseline to" in driver.err_path.read_text(errors="replace"),
                        600, "the baseline's retry", alive=driver)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        driver.wait(timeout=600)
        stderr = driver.err_path.read_text(errors="replace")
        assert driver.returncode == 0, stderr[-3000:]
        summary = json.loads((root / "driver.out").read_text().strip().splitlines()[-1])
        assert summary["status"] == "finished"
        (baseline,) = client.search_runs([experiment], "tags.`fineprune.kind` = 'baseline'")
        assert baseline.info.status == "FINISHED" and baseline.data.metrics["f1"] >= 0
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        _kill(processes_mentioning(root), signal.SIGKILL)  # what is left of the sweep's private Ray
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the sweep's processes in /proc")
def test_the_resume_command_of_a_sweep_stopped_by_a_tracking_outage_resumes_it_as_written(tmp_path):
    """A sweep given --tracking-uri stopped by a tracking outage said to run `fineprune sweep --space S --resume P`,
    which reads MLFLOW_TRACKING_URI or sqlite:///mlflow.db instead: run as written elsewhere, it found no such sweep.
    The command it gives now names the store, and run as written, from another directory, it finishes that sweep."""
    import shlex
    import sqlite3

    root, uri, client, experiment, env = _sweep_root("fpr-")
    (root / "elsewhere").mkdir()
    command = [sys.executable, "-m", "workflows.cli", "sweep", "--space", str(REPO / "tune_spaces" / "smoke.yaml"),
               "--tracking-uri", uri, "--storage-path", str(root / "ray"), "--tracking-timeout", "5"]
    with open(root / "driver.err", "wb") as err:
        driver = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                  start_new_session=True)
    try:
        trial = lambda: client.search_runs([experiment], "tags.`fineprune.kind` = 'trial'")  # noqa: E731
        _wait_until(trial, 600, "a trial's run", poll=0.2, alive=driver)
        holder = sqlite3.connect(root / "mlflow.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # the store away (locked) for longer than --tracking-timeout
            driver.wait(timeout=300)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        last = (root / "driver.err").read_text(errors="replace").strip().splitlines()[-1]
        assert driver.returncode == 1 and last.startswith("fineprune sweep: error: the tracking server"), last
        parent = client.search_runs([experiment], "tags.`fineprune.kind` = 'sweep'")[0].info.run_id
        suggested = shlex.split(last.split("`")[-2])
        assert suggested[:2] == ["fineprune", "sweep"] and "--tracking-uri" in suggested, last
        _kill(processes_mentioning(root / "rt"), signal.SIGKILL)  # what is left of the stopped sweep's private Ray

        done = subprocess.run([sys.executable, "-m", "workflows.cli", *suggested[1:]], cwd=root / "elsewhere",
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["parent_run_id"] == parent and summary["status"] == "finished", summary
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        _kill(processes_mentioning(root), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_the_resume_command_a_sweep_gives_names_its_store_and_its_cluster():
    """The command a stopped or unfinished sweep gives parses to the same space, sweep run, store and Ray cluster
    (a path or URI with spaces quoted); without the cluster's --address it would start a private local Ray."""
    import shlex

    from workflows.cli import build_parser
    from workflows.record import resume_command

    line = resume_command("sqlite:////tmp/my store/mlflow.db", "abc123", "my spaces/smoke.yaml", "ray://head:10001")
    words = shlex.split(line)
    assert words[:2] == ["fineprune", "sweep"]
    args = build_parser().parse_args(words[1:])
    assert (args.space, args.resume, args.tracking_uri, args.address) == (
        "my spaces/smoke.yaml", "abc123", "sqlite:////tmp/my store/mlflow.db", "ray://head:10001")
    assert "--address" not in resume_command("sqlite:///mlflow.db", "abc123", "smoke.yaml")


def test_a_trial_run_again_after_its_last_report_reports_its_packed_model_from_storage(tmp_path):
    """A trial whose worker died after it reported its packed model (Tune had not yet recorded its end) runs again
    and reports that model again from the sweep's storage. It used to fetch a copy into its local files first, and
    leave it there: the code after a trial's last report may not run, so nothing may be fetched before it."""
    import ray
    from ray import tune

    from workflows.space import load_space
    from workflows.sweep import CHECKPOINT_KIND, trial_main

    values = yaml.safe_load((REPO / "tune_spaces" / "smoke.yaml").read_text())
    values.update(search={"target_density": {"type": "choice", "values": [0.5]}}, scheduler=None, num_samples=1)
    values["teacher"]["student_init"] = False
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(values))
    space = load_space(tmp_path / "space.yaml")
    scratch = tmp_path / "tmp"
    scratch.mkdir()

    class KillAfterTheFinalReport(tune.Callback):
        """Kills the trial's worker once, when Tune has taken the first packed model it reported."""

        def __init__(self):
            self.finals: list[dict] = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("final"):
                self.finals.append(dict(result))

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            kind = json.loads(Path(checkpoint.path, CHECKPOINT_KIND).read_text())["kind"]
            if kind == "packed" and len(self.finals) == 1:
                ray.kill(trial.temporary_state.ray_actor, no_restart=True)
                # What the worker may not have removed before it died (whether it did is a race): its packed copy.
                left = scratch / "fineprune-trials" / "again" / trial.trial_id / "packed"
                left.mkdir(parents=True, exist_ok=True)
                (left / "model.safetensors").write_bytes(b"left by the first attempt")

    killer = KillAfterTheFinalReport()
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"TMPDIR": str(scratch), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    try:
        tuner = tune.Tuner(tune.with_parameters(trial_main, space=space, teacher=None),
                           param_space={"target_density": 0.5},
                           run_config=tune.RunConfig(name="again", storage_path=str(tmp_path / "ray"),
                                                     callbacks=[killer],
                                                     failure_config=tune.FailureConfig(max_failures=1)))
        (result,) = list(tuner.fit())
    finally:
        ray.shutdown()
    assert result.error is None
    assert len(killer.finals) == 2, killer.finals
    first, again = killer.finals
    assert again["f1"] == first["f1"] and again["linear_density"] == first["linear_density"]
    with result.checkpoint.as_directory() as packed:
        assert json.loads((Path(packed) / CHECKPOINT_KIND).read_text())["kind"] == "packed"
        assert (Path(packed) / "model.safetensors").is_file()
    assert not (scratch / "fineprune-trials").exists()  # nothing of the trial's is left on its machine
