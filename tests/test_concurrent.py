"""Two of anything at once: processes that share a tracking store, a sweep's storage or an output directory.

Each test starts real processes that wait for one signal file, so that they do the shared part at the same moment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import sqlite_store

ROOT = Path(__file__).resolve().parents[1]


def start_together(scripts: list[str], tmp_path: Path) -> list[subprocess.CompletedProcess]:
    """Run each Python ``script`` in a process of its own; each, once past its imports (the part before ``# go``),
    says so in a file and waits for one file, made once all have said so, then runs on. Their results, in order."""
    go = tmp_path / "go"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    wait = (f"import time, pathlib\nwhile not pathlib.Path({str(go)!r}).exists():\n    time.sleep(0.002)\n")
    procs = []
    for i, script in enumerate(scripts):
        head, _, body = script.partition("# go\n")
        ready = f"import pathlib\npathlib.Path({str(tmp_path / f'ready{i}')!r}).touch()\n"
        out = open(tmp_path / f"proc{i}.out", "w+")
        procs.append((subprocess.Popen([sys.executable, "-c", head + ready + wait + body], cwd=tmp_path, env=env,
                                       stdout=out, stderr=subprocess.STDOUT, text=True), out))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not all((tmp_path / f"ready{i}").exists() for i in range(len(procs))):
        if any(proc.poll() is not None for proc, _ in procs):
            break  # one ended before it was ready: its output says why
        time.sleep(0.05)
    go.touch()
    results = []
    for proc, out in procs:
        proc.wait(timeout=240)
        out.seek(0)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), ""))
        out.close()
    return results


def test_sweeps_started_at_once_on_a_new_sqlite_store_all_open_it(tmp_path):
    """MLflow makes a new database's tables when a process first opens it: three processes (sweeps, a register)
    opening one new store at once all open it, instead of all but one stopping with "duplicate column name"."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    script = ("from workflows import tracking\n# go\n"
              f"client = tracking.client_for({uri!r})\n"
              "tracking.check_reachable(client, 30)\n"
              "client.search_registered_models()\n"
              "print('opened')\n")
    results = start_together([script] * 3, tmp_path)
    for result in results:
        assert result.returncode == 0 and "opened" in result.stdout, result.stdout[-2000:]
    assert not list(tmp_path.glob(".mlflow.db.lock*"))  # the lock file goes with its holder


def test_sweeps_that_need_one_teacher_at_once_train_it_once_and_share_it(tmp_path):
    """Two sweeps (each with its own Ray) that need the same dense teacher at the same moment: one fine-tunes it, the
    other waits and reuses it, instead of both training it into one directory, the second removing the final model
    the first sweep's trials read."""
    space = ROOT / "tune_spaces" / "smoke.yaml"
    script = ("import logging, ray\n"
              "from pathlib import Path\n"
              "from workflows.space import load_space\n"
              "from workflows.sweep import ensure_teacher\n"
              "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
              f"space = load_space({str(space)!r})\n"
              "ray.init(address='local', num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)\n"
              "# go\n"
              f"model_dir, metrics = ensure_teacher(space, Path({str(tmp_path / 'teachers')!r}))\n"
              "print('teacher', model_dir, metrics['f1'])\n")
    results = start_together([script] * 2, tmp_path)
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    logs = [result.stdout for result in results]
    assert sum("fine-tuning the dense teacher" in log for log in logs) == 1, logs
    assert sum("reusing the dense teacher" in log for log in logs) == 1, logs
    assert not any("removing the earlier run's" in log for log in logs)
    (first,), (second,) = ([line for line in log.splitlines() if line.startswith("teacher ")] for log in logs)
    assert first == second  # one directory, one set of metrics
    assert not list((tmp_path / "teachers").glob(".*.lock"))


def _cli(*args: str) -> str:
    """A script that runs ``fineprune ARGS`` once the processes are let go, and exits with its status."""
    return ("import sys\nfrom workflows import cli\nimport pruning.trainer, pruning.packing, pruning.export\n# go\n"
            f"sys.exit(cli.main({list(args)!r}))\n")


def _one_refused(results: list[subprocess.CompletedProcess], out: Path) -> None:
    """One command wrote ``out``; the other was refused in one line naming it, exit status 1."""
    codes = sorted(result.returncode for result in results)
    assert codes == [0, 1], [result.stdout[-2000:] for result in results]
    refused = next(result for result in results if result.returncode == 1)
    (line,) = [line for line in refused.stdout.splitlines() if "error:" in line]
    assert f"error: {out.resolve()}: process " in line and "is writing it; wait for it to end" in line
    assert not list(out.parent.glob(f".{out.name}.lock"))


def test_two_runs_into_one_output_dir_at_once_the_second_is_refused(tmp_path):
    """Two `fineprune prune` runs given the same new output_dir at the same moment both found it empty, both
    trained, and the directory ended with one run's final model beside the other's checkpoint (both exit 0); the
    second is now refused in one line while the first holds the directory."""
    out = tmp_path / "run"
    config = ROOT / "configs" / "tiny_smoke.yaml"
    results = start_together([_cli("prune", "--config", str(config), "--output-dir", str(out), "--max-steps", "10",
                                   "--train-limit", "8", "--eval-limit", "4", "--no-progress")] * 2, tmp_path)
    _one_refused(results, out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "final"]


def test_two_packs_into_one_out_dir_at_once_the_second_is_refused(tmp_path, masked_checkpoint):
    """Two `fineprune pack --overwrite` into one out_dir at the same moment both replaced it (the later silently,
    or one failed renaming the other's directory aside); the second is now refused in one line."""
    out = tmp_path / "packed"
    out.mkdir()
    (out / "notes.txt").write_text("kept\n")
    results = start_together([_cli("pack", str(masked_checkpoint), str(out), "--overwrite", "--questions", "4",
                                   "--repeats", "40")] * 2, tmp_path)
    _one_refused(results, out)
    assert (out / "notes.txt").read_text() == "kept\n" and (out / "config.json").is_file()


def test_two_registrations_at_once_make_one_version_of_a_trial(tmp_path, masked_checkpoint):
    """Two `fineprune register` (or a register beside a sweep's own) at the same moment both found the champion's
    trial unregistered and each made a version of it: the trial was versions 1 and 2. Now the later one is deleted
    and both registrations name the first, with the alias on it."""
    from mlflow.tracking import MlflowClient

    from pruning.checkpoint import load_model
    from pruning.packing import pack, save_packed
    from pruning.tokenizer import load_tokenizer
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.tune.experiment import Trial

    from workflows import tracking

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = tracking.client_for(uri)
    client.create_experiment("exp", artifact_location=(tmp_path / "artifacts").as_uri())
    packed = save_packed(pack(load_model(masked_checkpoint)), load_tokenizer(masked_checkpoint), tmp_path / "packed")
    # A sweep's record of one finished trial whose final checkpoint is the packed model.
    parent = tracking.start_parent_run(client, "exp", str(tmp_path / "sweep"), {}, resume=False)
    trial = Trial("trial_main", config={"target_density": 0.4}, trial_id="t1", stub=True)
    result = {"step": 6, "f1": 60.0, "linear_density": 0.4, "final": True, "timestamp": int(time.time())}
    trial.run_metadata.checkpoint_manager.register_checkpoint(
        _TrainingResult(checkpoint=tune.Checkpoint.from_directory(str(packed)), metrics=result))
    trial.update_last_result(result)
    trial.set_status(Trial.TERMINATED)
    callback = tracking.MlflowTrialCallback(uri, "exp", parent, lambda config: {"method": "topk"}, outage_limit=30)
    callback.on_step_begin(iteration=0, trials=[])
    callback.on_trial_start(iteration=0, trials=[trial], trial=trial)
    callback.on_trial_result(iteration=0, trials=[trial], trial=trial, result=result)
    callback.on_trial_complete(iteration=0, trials=[trial], trial=trial)
    callback.on_experiment_end(trials=[trial])
    assert callback.failure is None
    script = ("import json\nfrom workflows import record, registry, tracking\n"
              f"client = tracking.client_for({uri!r})\n# go\n"
              f"result = registry.register_champion(client, 'exp', {parent!r}, "
              "record.RegistrySpec('m', max_density=1.0, onnx=False))\n"
              "print('result', json.dumps(result))\n")
    results = start_together([script] * 2, tmp_path)
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    versions = MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name = 'm'")
    assert [str(v.version) for v in versions] == ["1"], [result.stdout[-2000:] for result in results]
    registered = [json.loads(line.split(" ", 1)[1]) for result in results for line in result.stdout.splitlines()
                  if line.startswith("result ")]
    assert [r["version"] for r in registered] == ["1", "1"]
    champion = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("m", "champion")
    assert str(champion.version) == "1"


def test_an_output_on_a_file_system_without_locks_is_written_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some file systems (NFS without its lock daemon) answer flock with ENOLCK: the output is still written, with
    one warning, instead of every pack, export, run and sweep stopping there."""
    import errno
    import fcntl
    import logging

    from pruning import atomic

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="pruning.atomic"):
        with atomic.locked(tmp_path / ".out.lock", str(tmp_path / "out")):
            (tmp_path / "out").mkdir()
    assert (tmp_path / "out").is_dir() and not (tmp_path / ".out.lock").exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'out'}: the file system of {tmp_path} takes no locks (No locks available); writing it without one"]

    def other_error(fd, operation):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", other_error)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic.locked(tmp_path / ".out.lock", str(tmp_path / "out")):
            pass


def test_two_sweeps_that_make_one_new_experiment_at_once_both_start(tmp_path):
    """Two sweeps started together into an experiment the store does not hold yet: both look it up, find none, and
    create it; the later create is refused as existing. That sweep now takes the experiment the other made instead of
    stopping with "Experiment(name=...) already exists". The other sweep's create is made to fall between this one's
    look-up and its create (with processes started together it did so in two of three tries)."""
    from mlflow.tracking import MlflowClient

    from workflows import tracking

    uri = sqlite_store(tmp_path / "mlflow.db")
    other = MlflowClient(tracking_uri=uri)

    class LookedBeforeTheOther(MlflowClient):
        """A client whose first look-up came just before the other sweep's create."""
        looked = False

        def get_experiment_by_name(self, name):
            if not self.looked:
                self.looked = True
                tracking.start_parent_run(other, name, "/sweeps/a", {}, resume=False)
                return None
            return super().get_experiment_by_name(name)

    client = LookedBeforeTheOther(tracking_uri=uri)
    run_id = tracking.start_parent_run(client, "new", "/sweeps/b", {}, resume=False)
    experiment = other.get_experiment_by_name("new")
    assert client.looked and other.get_run(run_id).info.experiment_id == experiment.experiment_id
    assert len(other.search_runs([experiment.experiment_id])) == 2


def test_a_refusal_in_the_moment_a_holder_takes_the_lock_names_it(tmp_path):
    """A holder writes its PID@HOST just after taking the lock; a second writer refused in between said "another
    process" (seen once in a full run of the two-packs test); it now reads the file again for a moment."""
    import fcntl
    import threading

    from pruning import atomic

    lock = tmp_path / ".out.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, and still empty
    writes = threading.Timer(0.2, lambda: os.write(fd, b"4242@elsewhere\n"))
    writes.start()
    try:
        with pytest.raises(atomic.Busy) as refused, atomic.locked(lock, str(tmp_path / "out")):
            pass
    finally:
        writes.join()
        os.close(fd)
    assert str(refused.value) == (f"{tmp_path / 'out'}: process 4242@elsewhere is writing it; wait for it to end, "
                                  "or write elsewhere")


@pytest.mark.parametrize("write", ["tag", "alias", "alias elsewhere"])
def test_a_registry_write_another_registration_makes_at_the_same_moment_is_not_an_error(tmp_path, write):
    """Two registrations of one sweep at once both found version 1 without its `precision` tag and both wrote it:
    MLflow's store looks the tag up and then inserts it, so the second insert broke the unique key ("UNIQUE
    constraint failed: model_version_tags") and that `fineprune register` stopped. Here the other registration's
    write is made, through a store of its own, in the moment between this one's look-up and its insert; where the
    other wrote something else (the alias on version 2), this one, written last, is what the store keeps."""
    import sqlalchemy
    from mlflow.store.model_registry.dbmodels.models import SqlModelVersionTag, SqlRegisteredModelAlias
    from mlflow.tracking import MlflowClient

    from workflows import registry

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    source = tmp_path / "model"
    source.mkdir()
    client.create_model_version("m", source.as_uri())
    client.create_model_version("m", source.as_uri())
    # The other registration: its own engine, so its write commits before this one's flush goes on.
    other = sqlalchemy.create_engine(uri)
    table, statement = {
        "tag": (SqlModelVersionTag, "INSERT INTO model_version_tags (workspace, key, value, name, version) "
                                    "VALUES (:w, 'precision', 'fp32', 'm', 1)"),
        "alias": (SqlRegisteredModelAlias, "INSERT INTO registered_model_aliases (workspace, alias, version, name) "
                                           "VALUES (:w, 'champion', 1, 'm')"),
        "alias elsewhere": (SqlRegisteredModelAlias, "INSERT INTO registered_model_aliases (workspace, alias, "
                                                     "version, name) VALUES (:w, 'champion', 2, 'm')"),
    }[write]
    raced = []

    def meanwhile(mapper, connection, target):
        if not raced:
            raced.append(True)
            with other.begin() as conn:
                conn.execute(sqlalchemy.text(statement), {"w": getattr(target, "workspace", "default")})

    sqlalchemy.event.listen(table, "before_insert", meanwhile)
    try:
        if write == "tag":
            registry._set_version_tag(client, "m", "1", "precision", "fp32")
        else:
            registry._set_alias(client, "m", "champion", "1")
    finally:
        sqlalchemy.event.remove(table, "before_insert", meanwhile)
        other.dispose()
    assert raced == [True]
    tags = client.get_model_version("m", "1").tags
    if write == "tag":
        assert tags["precision"] == "fp32"
    else:
        assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
