"""`fineprune register` and `fineprune select` on a store a person has used: several sweeps registered under one
model, runs deleted in the MLflow UI, and what each command reads from the artifact store.

Real SQLite MLflow stores in a temporary directory, with sweeps shaped like a sweep's record (a parent run, a dense
baseline, finished trials whose packed models are tiny packed BERTs), registered without their ONNX export.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from workflows import logged_model, record, registry
from workflows.cli import main
from workflows.version_files import lost_files

from conftest import sqlite_store, sweep_record

NAME = "store-registry"


@pytest.fixture
def store(tmp_path) -> dict:
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("exp", artifact_location=(tmp_path / "artifacts").as_uri())
    return {"client": client, "uri": uri, "root": tmp_path}


def _register(capsys, store: dict, *flags: str) -> tuple[int, dict | None, str]:
    status = main(["register", "--experiment", "exp", "--tracking-uri", store["uri"], *flags])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, (json.loads(out) if out.strip() else None), err


def _select(capsys, store: dict, *flags: str) -> tuple[int, dict | None, str]:
    status = main(["select", "--registered-model", NAME, "--max-latency-ms", "10000", "--repeats", "1",
                   "--seq-len", "32", "--threads", "1", "--tracking-uri", store["uri"], *flags])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, (json.loads(out) if out.strip() else None), err


def _version_of(client, run_id: str) -> str:
    return next(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")
                if v.tags[record.TAG_TRIAL_RUN] == run_id)


def _champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


# name -> (heads kept per layer, FFN width kept, F1, linear density, on the density frontier)
TRIALS = {"wide": (2, 64, 80.0, 0.5, True), "narrow": (1, 32, 60.0, 0.3, True), "dominated": (1, 16, 20.0, 0.4, False)}


class _Downloads:
    """MLflow's artifact downloads and listings, made as they are, counted by the file or directory they name."""

    def __init__(self, monkeypatch) -> None:
        self.downloads, self.listings = Counter(), Counter()
        download, listing = mlflow.artifacts.download_artifacts, mlflow.artifacts.list_artifacts

        def counted_download(*args, **kwargs):
            self.downloads[str(kwargs.get("artifact_uri")).rsplit("/", 1)[-1]] += 1
            return download(*args, **kwargs)

        def counted_listing(*args, **kwargs):
            self.listings[str(kwargs.get("artifact_uri"))] += 1
            return listing(*args, **kwargs)

        monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counted_download)
        monkeypatch.setattr(mlflow.artifacts, "list_artifacts", counted_listing)

    def clear(self) -> None:
        self.downloads.clear()
        self.listings.clear()


def test_select_reads_each_versions_mlmodel_once(store, tokenizer, capsys, monkeypatch):
    """`select` downloaded every version's MLmodel twice (once to check that the files its served model loads are
    still there, once to load it); the check's copy is the one loaded now, and the choice is the same."""
    made = sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    assert _register(capsys, store, "--frontier")[0] == 0
    counted = _Downloads(monkeypatch)
    status, chosen, _ = _select(capsys, store, "--alias", "fast")
    assert status == 0 and chosen["run_id"] == made["runs"]["wide"]
    assert [row["run_id"] for row in chosen["versions"]] == [made["runs"]["narrow"], made["runs"]["wide"]]
    assert all("latency_ms" in row for row in chosen["versions"])
    # One of each per version: its MLmodel, its packed model's config (the positions it takes, read before its
    # weights) and its packed model.
    assert counted.downloads == {"MLmodel": 2, "config.json": 2, "packed_model": 2}



def test_select_says_which_version_another_alias_moved_from(store, tokenizer, capsys):
    """`select --alias fast` moved an alias set by hand (or by an earlier select) without saying from where, while
    for the champion alias its result gives ``alias_moved_from``; it does for any alias now, and only when it moved."""
    made = sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    client = store["client"]
    assert _register(capsys, store, "--frontier")[0] == 0
    narrow = _version_of(client, made["runs"]["narrow"])
    client.set_registered_model_alias(NAME, "fast", narrow)
    status, chosen, _ = _select(capsys, store, "--alias", "fast")
    assert status == 0 and chosen["run_id"] == made["runs"]["wide"] and chosen["alias_moved_from"] == narrow
    status, again, _ = _select(capsys, store, "--alias", "fast")
    assert status == 0 and again["version"] == chosen["version"] and "alias_moved_from" not in again

def test_registering_again_lists_each_directory_of_a_version_once_and_still_finds_what_is_gone(store, tokenizer,
                                                                                               capsys, monkeypatch):
    """Registering a registered sweep again checks that every version it reuses can still be served: that took five
    listings of the artifact store per version (the root twice, `artifacts` once per directory under it), and the
    champion's version was checked again after the frontier's; each directory it reads is now listed once, three in
    all, each version is checked once, and a file removed or a directory emptied is still found."""
    import shutil

    made = sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    client = store["client"]
    assert _register(capsys, store, "--frontier")[0] == 0
    counted = _Downloads(monkeypatch)
    status, result, _ = _register(capsys, store, "--frontier")
    assert status == 0 and result["version"] == _version_of(client, made["runs"]["wide"])
    # The two frontier versions: the root, its code and the packed model, once each; the champion's version, one
    # of them, is not checked again.
    checked = [client.get_model_version_download_uri(NAME, row["version"]).rstrip("/")
               for row in result["frontier_versions"]]
    champion = client.get_model_version_download_uri(NAME, result["version"]).rstrip("/")
    assert champion in checked
    assert counted.downloads == Counter({"MLmodel": 2})
    assert counted.listings == Counter(f"{root}{path}" for root in checked
                                       for path in ("", "/code", "/artifacts/packed_model"))

    root = Path(champion.removeprefix("file://"))
    spoilt = {"qa_model.py": "its python_model (qa_model.py) is gone",
              "code": "its code (code) is gone",
              "artifacts/packed_model": "its model_dir (artifacts/packed_model) is gone",
              "MLmodel": "its MLmodel is gone"}
    for path, said in spoilt.items():
        kept = store["root"] / "kept"
        shutil.copytree(root, kept)
        target = root / path
        if target.is_dir():  # emptied, as a copy that never finished leaves it
            shutil.rmtree(target)
            target.mkdir()
        else:
            target.unlink()
        assert lost_files(champion, store["uri"]) == f"{said} from {champion}", path
        shutil.rmtree(root)
        kept.rename(root)
    assert lost_files(champion, store["uri"]) is None


def _two_sweeps_registered(store, tokenizer, capsys, *flags: str) -> tuple[dict, dict]:
    """The records of two sweeps of NAME in ``store``, each registered (``flags`` to `register`) as it ended: the
    first of TRIALS, the later one of a single, most accurate trial `best`."""
    first = sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    assert _register(capsys, store, *flags)[0] == 0
    later = sweep_record(store["client"], store["root"], tokenizer, NAME, "b", {"best": (2, 64, 90.0, 0.5, True)})
    assert _register(capsys, store, *flags)[0] == 0
    return first, later


def test_select_does_not_choose_a_version_whose_trial_or_sweep_run_was_deleted(store, tokenizer, capsys, caplog):
    """`select` without a sweep chose among every version of the model, one whose trial run was deleted in the MLflow
    UI too (the most accurate here), and said nothing; a version whose trial or sweep run was deleted (set aside, as
    `register` passes a deleted sweep over) is now listed with why, with one warning naming it and the run, and not
    loaded or chosen."""
    client = store["client"]
    first, later = _two_sweeps_registered(store, tokenizer, capsys, "--frontier")
    wide, narrow = _version_of(client, first["runs"]["wide"]), _version_of(client, first["runs"]["narrow"])
    best = _version_of(client, later["runs"]["best"])
    client.delete_run(first["runs"]["wide"])
    client.delete_run(later["parent"])
    caplog.clear()

    status, chosen, _ = _select(capsys, store, "--alias", "fast")
    assert status == 0 and chosen["version"] == narrow and chosen["run_id"] == first["runs"]["narrow"]
    rows = {row["version"]: row for row in chosen["versions"]}
    gone = {wide: ("trial", first["runs"]["wide"]), best: ("sweep", later["parent"])}
    for version, (what, run_id) in gone.items():
        assert rows[version]["error"] == (f"its {what} run {run_id} was deleted (restore it, "
                                          f"`{record.restore_command(client.tracking_uri, run_id)}`, to have the "
                                          "version chosen again)")
        assert "latency_ms" not in rows[version]
    assert "latency_ms" in rows[narrow]
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                      and r.name in ("workflows.registry", "workflows.version_timing"))
    assert warnings == sorted(f"version {version} of {NAME}: {rows[version]['error']}, so it is not chosen"
                              for version in gone)
    assert str(client.get_model_version_by_alias(NAME, "fast").version) == narrow

    client.delete_run(first["runs"]["narrow"])  # none left: one line, the alias where it was
    status, out, err = _select(capsys, store, "--alias", "fast")
    assert status == 2 and out is None
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"fineprune select: error: no version of {NAME!r} could be chosen (version {narrow}: its "
                           f"trial run {first['runs']['narrow']} was deleted"), line
    assert line.endswith("alias 'fast' left as it was")
    assert str(client.get_model_version_by_alias(NAME, "fast").version) == narrow


def _champion_of_a_deleted_later_sweep(store: dict, tokenizer, capsys) -> tuple[dict, dict, str]:
    """Two sweeps registered in turn, the later one's champion (``best``) holding the alias, then the later sweep's
    run deleted in the MLflow UI: (first sweep, later sweep, the alias's version)."""
    client = store["client"]
    first, later = _two_sweeps_registered(store, tokenizer, capsys)
    best = _version_of(client, later["runs"]["best"])
    assert _champion(client) == best
    client.delete_run(later["parent"])
    return first, later, best


def test_register_does_not_take_the_champion_back_to_an_earlier_sweep_unasked(store, tokenizer, capsys):
    """The champion registered by the latest sweep, whose run was then deleted in the MLflow UI: `register` took the
    sweep before it and moved the alias to that sweep's champion, an older and less accurate model, on a warning
    alone. It now stops with one line naming the version and the deleted sweep (exit 2), registers nothing and
    leaves the alias; `--sweep-run` moves it, and once the alias is on a version of a sweep left, `register` goes
    on as before."""
    client = store["client"]
    first, later, best = _champion_of_a_deleted_later_sweep(store, tokenizer, capsys)
    versions = len(client.search_model_versions(f"name = '{NAME}'"))

    for flags in ((), ("--frontier",)):
        status, out, err = _register(capsys, store, *flags)
        assert status == 2 and out is None
        assert err.strip().splitlines()[-1] == (
            f"fineprune register: error: alias 'champion' of {NAME} points at version {best}, of sweep run "
            f"{later['parent']}, which was deleted; the latest sweep left, {first['parent']}, is an earlier one: pass "
            f"--sweep-run {first['parent']} to move the alias to its champion, or restore sweep run "
            f"{later['parent']} (`{record.restore_command(client.tracking_uri, later['parent'])}`); nothing "
            "registered")
        assert _champion(client) == best and len(client.search_model_versions(f"name = '{NAME}'")) == versions

    status, result, _ = _register(capsys, store, "--sweep-run", first["parent"])
    assert status == 0 and result["run_id"] == first["runs"]["wide"]
    assert _champion(client) == result["version"] == _version_of(client, first["runs"]["wide"])
    assert _register(capsys, store)[0] == 0 and _champion(client) == result["version"]

    # A deleted sweep of another experiment that registers under the same name was never passed over here.
    other = sweep_record(client, store["root"], tokenizer, NAME, "c", {"other": (2, 64, 95.0, 0.5, True)}, experiment="other")
    assert main(["register", "--experiment", "other", "--tracking-uri", store["uri"]]) == 0
    assert _champion(client) == _version_of(client, other["runs"]["other"])
    client.delete_run(other["parent"])
    capsys.readouterr()
    status, again, _ = _register(capsys, store)
    assert status == 0 and _champion(client) == again["version"] == result["version"]


def test_register_without_a_champion_says_the_alias_is_left_on_a_version_whose_trial_was_deleted(store, tokenizer,
                                                                                                capsys, caplog):
    """The champion's trial run (and the other trials) deleted in the MLflow UI: `register` found no trial to
    register, said only that none satisfies the policy and left the alias, on the deleted trial's version, without a
    word; it still leaves it (what serves is not taken away), but warns that the alias is on a version nothing
    would choose now, naming the run and how to restore it."""
    client = store["client"]
    made = sweep_record(client, store["root"], tokenizer, NAME, "a", TRIALS)
    assert _register(capsys, store)[0] == 0
    wide = _version_of(client, made["runs"]["wide"])
    for run_id in made["runs"].values():
        client.delete_run(run_id)
    caplog.clear()
    status, result, _ = _register(capsys, store)
    assert status == 4 and result["registered"] is False and _champion(client) == wide
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "workflows.registry"]
    run_id = made["runs"]["wide"]
    assert warnings == ["experiment 'exp': no trial to choose: no trial run of the sweep is left (none was recorded, "
                        "or all were deleted); nothing registered",
                        f"alias 'champion' of {NAME} is left on version {wide}, which nothing chooses now: its trial "
                        f"run {run_id} was deleted (restore it, "
                        f"`{record.restore_command(client.tracking_uri, run_id)}`, to have the version chosen again)"]


def _space(root: Path, **registry) -> Path:
    """tune_spaces/smoke.yaml registering under this file's model name, as the sweeps above do (no ONNX export)."""
    import yaml

    values = yaml.safe_load((Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke.yaml").read_text())
    values["registry"] = {"name": NAME, "onnx": False,
                          **(registry or {"policy": "best_f1_under_density", "max_density": 0.6})}
    path = root / "space.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _conclude(store: dict, parent: str, space: Path, latest_left: bool = False) -> dict:
    """What a sweep does once its trials have ended (a resumed one too): frontier, registry, report."""
    from workflows import sweep
    from workflows.space import load_space

    return sweep._conclude(store["client"], "exp", parent, load_space(space), {"f1": 95.0}, None, store["uri"],
                           store["root"] / "report", latest_left=latest_left)


def test_a_sweeps_end_checks_each_versions_files_once(store, tokenizer, capsys, monkeypatch):
    """A sweep's end registers its frontier, then its champion: a resumed sweep (whose versions were made before)
    checked the champion's version twice, as `register` did before it checked each version once; it now checks each
    once too (three listings of the artifact store per frontier version), and registers the same champion."""
    made = sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    client = store["client"]
    space = _space(store["root"])
    first = _conclude(store, made["parent"], space)
    assert first["champion"]["version"] == _version_of(client, made["runs"]["wide"])
    counted = _Downloads(monkeypatch)
    summary = _conclude(store, made["parent"], space)
    assert summary["champion"]["version"] == first["champion"]["version"] == _champion(client)
    checked = [client.get_model_version_download_uri(NAME, row["version"]).rstrip("/")
               for row in summary["frontier_versions"]]
    assert len(checked) == 2
    versions = [client.get_model_version_download_uri(NAME, v.version).rstrip("/")
                for v in client.search_model_versions(f"name = '{NAME}'")]
    read = Counter({uri: n for uri, n in counted.listings.items() if any(uri.startswith(v) for v in versions)})
    assert read == Counter(f"{root}{path}" for root in checked for path in ("", "/code", "/artifacts/packed_model"))


def test_a_sweep_resumed_as_the_latest_left_does_not_take_the_champion_back(store, tokenizer, capsys, caplog):
    """`sweep --resume` after the experiment's later sweep was deleted resumes the sweep before it, and at its end
    moved the champion alias from the deleted sweep's version back to its own champion, which `register` refuses.
    It now leaves the alias, as `register` does, with one warning that says how to move it; its frontier is still
    registered and its summary says no champion was registered, and why. `--resume RUN_ID` names the sweep, as
    `register --sweep-run` does, and moves it."""
    client = store["client"]
    first, later, best = _champion_of_a_deleted_later_sweep(store, tokenizer, capsys)
    space = _space(store["root"])
    caplog.clear()

    summary = _conclude(store, first["parent"], space, latest_left=True)
    assert _champion(client) == best
    line = (f"alias 'champion' of {NAME} is left on version {best}, of sweep run {later['parent']}, which was "
            f"deleted: this sweep, {first['parent']}, is an earlier one (`fineprune register --experiment exp "
            f"--sweep-run {first['parent']} --tracking-uri {store['uri']}` moves the alias to its champion; or "
            f"restore sweep run {later['parent']}, "
            f"`{record.restore_command(client.tracking_uri, later['parent'])}`); no champion registered")
    assert summary["champion"] == {"registered": False, "policy": "best_f1_under_density", "name": NAME,
                                   "alias_left": line}
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
            and r.name == "workflows.registry"] == [line]
    assert [row["run_id"] for row in summary["frontier_versions"]] == [first["runs"]["narrow"], first["runs"]["wide"]]

    summary = _conclude(store, first["parent"], space)  # --resume RUN_ID
    assert summary["champion"]["registered"] and _champion(client) == _version_of(client, first["runs"]["wide"])


def _suggested(line: str, command: str) -> list[str]:
    """The arguments of the ``fineprune COMMAND ...`` command a line gives between backticks, as a shell splits it."""
    import shlex

    given = [part for part in line.split("`")[1::2] if part.startswith(f"fineprune {command} ")]
    assert len(given) == 1, line
    return shlex.split(given[0])[1:]


def test_the_command_that_moves_a_left_alias_reaches_the_sweeps_store(store, tokenizer, capsys, caplog, monkeypatch,
                                                                       tmp_path_factory):
    """The warning of a sweep resumed as the latest left said "`fineprune register --experiment exp --sweep-run P`
    moves the alias", without the --tracking-uri of the sweep's store: run as written elsewhere (where
    MLFLOW_TRACKING_URI is not set) it read sqlite:///mlflow.db there, found no database, and moved nothing. The
    command it gives now names the store, and run as written it moves the alias to that sweep's champion."""
    client = store["client"]
    first, _, _ = _champion_of_a_deleted_later_sweep(store, tokenizer, capsys)
    champion = _conclude(store, first["parent"], _space(store["root"]), latest_left=True)["champion"]
    argv = _suggested(champion["alias_left"], "register")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    status, out, err = main(argv), *capsys.readouterr()
    assert status == 0, err
    assert json.loads(out)["sweep_run_id"] == first["parent"]
    assert _champion(client) == _version_of(client, first["runs"]["wide"])


def test_select_lists_a_version_shorter_than_seq_len_and_chooses_among_the_others(store, tokenizer, capsys, caplog):
    """`select --seq-len N` stopped at the first version whose model takes fewer than N positions ("--seq-len N
    exceeds ..."), exit 2, though the other versions could be timed; such a version is now listed with why, as one
    that cannot be loaded is, with a warning, and the most accurate of the others is chosen. With none left, the line
    names each version's reason."""
    client = store["client"]
    first = sweep_record(client, store["root"], tokenizer, NAME, "a", TRIALS)
    assert _register(capsys, store, "--frontier")[0] == 0
    later = sweep_record(client, store["root"], tokenizer, NAME, "b", {"short": (2, 64, 90.0, 0.5, True, 32)})
    assert _register(capsys, store, "--frontier")[0] == 0
    short = _version_of(client, later["runs"]["short"])
    caplog.clear()

    status, chosen, _ = _select(capsys, store, "--alias", "fast", "--seq-len", "64")
    assert status == 0 and chosen["run_id"] == first["runs"]["wide"]
    rows = {row["version"]: row for row in chosen["versions"]}
    reason = "cannot be timed: its model takes at most 32 positions, fewer than --seq-len 64"
    assert rows[short]["error"] == reason and "latency_ms" not in rows[short]
    assert all("latency_ms" in row for version, row in rows.items() if version != short)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
            and r.name in ("workflows.registry", "workflows.version_timing")] == [f"version {short} of {NAME} {reason}"]
    assert str(client.get_model_version_by_alias(NAME, "fast").version) == chosen["version"]

    status, out, err = _select(capsys, store, "--alias", "fast", "--seq-len", "200")
    assert status == 2 and out is None
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"fineprune select: error: no version of {NAME!r} could be timed (version "), line
    assert f"version {short}: cannot be timed: its model takes at most 32 positions, fewer than --seq-len 200" in line
    assert line.endswith("alias 'fast' left as it was")


def test_a_seq_len_longer_than_the_versions_take_names_the_space_field(store, tokenizer, capsys, caplog):
    """With the best_f1_under_latency policy, a space whose speedup.seq_len is longer than the versions' models take
    (64 positions asked, 32 taken) was reported as "no champion", exit 4, naming a --seq-len flag `register` does not
    have; it is now one line naming the space file and field, exit 2, and the alias is left. A sweep's end, whose
    trials are recorded, warns with that line and registers no champion, its frontier registered."""
    client = store["client"]
    made = sweep_record(client, store["root"], tokenizer, NAME, "a", {"short": (2, 64, 90.0, 0.5, True, 32)})
    assert _register(capsys, store)[0] == 0
    champion = _champion(client)
    space = _space(store["root"], policy="best_f1_under_latency", max_latency_ms=10000)
    line = (f"{space}: speedup.seq_len: 64 exceeds the 32 positions the model of version {champion} of {NAME} takes; "
            "no champion registered")

    status, out, err = _register(capsys, store, "--space", str(space))
    assert status == 2 and out is None
    assert err.strip().splitlines()[-1] == f"fineprune register: error: {line}"
    assert _champion(client) == champion

    caplog.clear()
    summary = _conclude(store, made["parent"], space)
    assert summary["champion"] == {"registered": False, "policy": "best_f1_under_latency", "name": NAME,
                                   "error": line}
    assert [row["run_id"] for row in summary["frontier_versions"]] == [made["runs"]["short"]]
    assert f"registry policy best_f1_under_latency: {line}" in [r.getMessage() for r in caplog.records
                                                                if r.levelname == "WARNING"]


def test_a_latency_registration_registers_the_frontier_once(store, tokenizer):
    """With the best_f1_under_latency policy, registering a sweep with its frontier (`register --frontier`, a
    sweep's end) registered the frontier twice, once before the champion and again to time its versions: the
    model's versions were searched and the frontier's runs read twice; they are now read once, and a sweep
    registered again writes no tag (the chosen version holds the policy's already)."""
    from conftest import CountingClient

    made = sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    mlflow.set_tracking_uri(store["uri"])  # the fluent API logs the versions' models
    spec = record.RegistrySpec(NAME, "best_f1_under_latency", max_latency_ms=10000.0, onnx=False)
    latency = {"batch_size": 1, "seq_len": 32, "repeats": 1, "threads": 1}
    counted = ("search_model_versions", "set_model_version_tag", "create_model_version", "get_run")
    calls = []
    for _ in range(2):
        counting = CountingClient(store["client"], *counted)
        result = registry.register_sweep(counting, "exp", made["parent"], spec, latency=latency)
        assert result["champion"]["run_id"] == made["runs"]["wide"]
        # What it serves, named as a registration names it: timed through PyTorch (registered without ONNX).
        assert (result["champion"]["served_by"], result["champion"]["onnx_variant"]) == ("torch", "none")
        assert result["champion"]["served_f1"] is None
        assert [row["run_id"] for row in result["frontier"]] == [made["runs"]["narrow"], made["runs"]["wide"]]
        calls.append(counting.calls)
    # Made: one search for the frontier, one per new version (its trial's versions, to find it made once), one to
    # time them, one for the versions that may hold a policy once the alias has moved; each version made with its
    # tags but the three that make it its sweep's and its frontier's (written once it is the one kept), and the
    # champion given its policy's two.
    assert calls[0] == {"search_model_versions": 5, "set_model_version_tag": 8, "create_model_version": 2,
                        "get_run": 6}
    assert calls[1] == {"search_model_versions": 3, "set_model_version_tag": 0, "create_model_version": 0,
                        "get_run": 6}
    assert _champion(store["client"]) == _version_of(store["client"], made["runs"]["wide"])


def test_select_finds_a_version_shorter_than_seq_len_without_downloading_its_model(store, tokenizer, capsys,
                                                                                     monkeypatch):
    """`select --seq-len 64` downloaded and loaded the whole model of a version that takes 32 positions before
    finding it too short; the version's config (its packed model's config.json) is read first now, and the version
    is listed as one that cannot be timed without its weights downloaded."""
    client = store["client"]
    first = sweep_record(client, store["root"], tokenizer, NAME, "a", {"wide": (2, 64, 80.0, 0.5, True)})
    assert _register(capsys, store, "--frontier")[0] == 0
    later = sweep_record(client, store["root"], tokenizer, NAME, "b", {"short": (2, 64, 90.0, 0.5, True, 32)})
    assert _register(capsys, store, "--frontier")[0] == 0
    short = _version_of(client, later["runs"]["short"])
    counted = _Downloads(monkeypatch)
    status, chosen, _ = _select(capsys, store, "--alias", "fast", "--seq-len", "64")
    assert status == 0 and chosen["run_id"] == first["runs"]["wide"]
    rows = {row["version"]: row for row in chosen["versions"]}
    assert rows[short]["error"] == "cannot be timed: its model takes at most 32 positions, fewer than --seq-len 64"
    # Each version's MLmodel and config; the packed model of the one timed only.
    assert counted.downloads == {"MLmodel": 2, "config.json": 2, "packed_model": 1}


def test_a_sweeps_closing_lines_say_why_no_champion_was_registered(store, tokenizer, capsys, caplog):
    """The lines a sweep logs as it ends named the champion only when one was registered: with the alias left on a
    later, deleted sweep's version, a policy no trial met, or a `speedup.seq_len` longer than the models take, they
    said nothing of it, the reason only in a warning among the registry's lines before; they now say in one line
    that no champion was registered, and why."""
    import logging

    from workflows import sweep

    first, later, best = _champion_of_a_deleted_later_sweep(store, tokenizer, capsys)

    def closing(space: Path, latest_left: bool = False, parent: str = first["parent"]) -> tuple[dict, list[str]]:
        summary = _conclude(store, parent, space, latest_left=latest_left)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="workflows.sweep"):
            sweep._log_summary({**summary, "ui": "-"})
        return summary["champion"], [r.getMessage() for r in caplog.records
                                     if r.name == "workflows.sweep" and r.getMessage().startswith("champion")]

    champion, lines = closing(_space(store["root"]), latest_left=True)
    assert lines == [f"champion: none registered: {champion['alias_left'].removesuffix('; no champion registered')}"]
    assert f"sweep run {later['parent']}" in lines[0]

    champion, lines = closing(_space(store["root"], policy="best_f1_under_density", max_density=0.1))
    assert lines == ["champion: none registered: no trial satisfies the registry policy best_f1_under_density "
                     "(max_density 0.1)"]
    assert champion["reason"] == lines[0].removeprefix("champion: none registered: ")

    champion, lines = closing(_space(store["root"], policy="best_f1_under_latency", max_latency_ms=1e-6))
    assert champion["reason"].startswith(f"no version of {NAME!r} is within 1e-06 ms")
    assert lines == [f"champion: none registered: {champion['reason']}"]

    short = sweep_record(store["client"], store["root"], tokenizer, NAME, "c", {"short": (2, 64, 90.0, 0.5, True, 32)})
    space = _space(store["root"], policy="best_f1_under_latency", max_latency_ms=10000)
    champion, lines = closing(space, parent=short["parent"])  # the space times 64 positions, the model takes 32
    assert champion["error"].startswith(f"{space}: speedup.seq_len: 64 exceeds the 32 positions")
    assert lines == [f"champion: none registered: {champion['error'].removesuffix('; no champion registered')}"]
    assert _champion(store["client"]) == best  # left where it was throughout


def _gc(store: dict, *run_ids: str) -> None:
    """``mlflow gc`` of the deleted ``run_ids``, as a person runs it: the runs and their artifacts removed for good."""
    import subprocess
    import sys

    for run_id in run_ids:
        store["client"].delete_run(run_id)
    done = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "gc", "--backend-store-uri", store["uri"],
                           "--tracking-uri", store["uri"], "--run-ids", ",".join(run_ids)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_run_removed_for_good_is_not_said_to_be_restorable(store, tokenizer, capsys, caplog):
    """A version whose trial run (or sweep run) was removed for good with `mlflow gc` was listed by `select`, and
    named by `register`, as one whose run "was deleted (restore it, `mlflow runs restore ...`)", a command that
    fails on a run gc removed; it now says the run was removed for good and cannot be restored."""
    client = store["client"]
    first, later = _two_sweeps_registered(store, tokenizer, capsys, "--frontier")
    wide, best = _version_of(client, first["runs"]["wide"]), _version_of(client, later["runs"]["best"])
    _gc(store, first["runs"]["wide"], later["parent"])
    caplog.clear()

    status, chosen, _ = _select(capsys, store, "--alias", "fast")
    assert status == 0 and chosen["run_id"] == first["runs"]["narrow"]
    rows = {row["version"]: row for row in chosen["versions"]}
    for version, what, run_id in ((wide, "trial", first["runs"]["wide"]), (best, "sweep", later["parent"])):
        assert rows[version]["error"] == (f"its {what} run {run_id} was removed for good (`mlflow gc`) and cannot "
                                          "be restored"), rows[version]
    assert not any("mlflow runs restore" in r.getMessage() for r in caplog.records)

    # No trial left to register: the frontier's version of the removed trial and the alias, left on the removed
    # sweep's version, are named as such.
    client.delete_run(first["runs"]["narrow"])
    client.delete_run(first["runs"]["dominated"])
    caplog.clear()
    status, _, _ = _register(capsys, store, "--frontier", "--sweep-run", first["parent"])
    assert status == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "workflows.registry"]
    assert (f"version {wide} of {NAME}: its trial run {first['runs']['wide']} was removed for good (`mlflow gc`), so "
            f"it is no longer a point of the frontier of sweep run {first['parent']} (its frontier tags turn false)"
            in warnings), warnings
    assert (f"alias 'champion' of {NAME} is left on version {best}, which nothing chooses now: its sweep run "
            f"{later['parent']} was removed for good (`mlflow gc`) and cannot be restored" in warnings), warnings
    assert not any(f"--run-id {run_id}" in line for line in warnings for run_id in (first["runs"]["wide"],
                                                                                    later["parent"]))


def _policy_tags(client) -> dict[str, dict[str, str]]:
    """The champion-policy tags of every version of the model, by version: those of the version chosen now and
    those a version the alias has left keeps."""
    keys = ("policy", "policy_threshold", "former_champion_policy", "former_champion_policy_threshold")
    return {str(v.version): {k: v.tags[k] for k in keys if k in v.tags}
            for v in client.search_model_versions(f"name = '{NAME}'") if any(k in v.tags for k in keys)}


def test_only_the_champion_says_a_policy_chose_it(store, tokenizer, capsys):
    """The `champion` alias moved to another version (by `register` of a later sweep, or `select`) left the version
    it had been on with its `policy` and `policy_threshold` tags, so that two versions each said a policy chose them.
    The version the alias leaves now keeps them as `former_champion_policy` and `former_champion_policy_threshold`,
    the one it comes to (back) loses those, and the report of the earlier sweep still names its champion's policy."""
    from workflows.report import collect_report_data

    client = store["client"]
    first = sweep_record(client, store["root"], tokenizer, NAME, "a", TRIALS)
    assert _register(capsys, store, "--frontier")[0] == 0
    wide = _version_of(client, first["runs"]["wide"])
    density = {"policy": "best_f1_under_density", "policy_threshold": "max_density 0.6"}
    former = {f"former_champion_{key}": value for key, value in density.items()}
    assert _policy_tags(client) == {wide: density}

    later = sweep_record(client, store["root"], tokenizer, NAME, "b", {"best": (2, 64, 90.0, 0.5, True)})
    assert _register(capsys, store, "--frontier")[0] == 0
    best = _version_of(client, later["runs"]["best"])
    assert _champion(client) == best
    assert _policy_tags(client) == {best: density, wide: former}
    card = collect_report_data("exp", store["uri"], first["parent"]).champion
    assert (card.version, card.alias_current, card.policy) == (wide, False, "best_f1_under_density (max_density 0.6)")

    status, chosen, _ = _select(capsys, store)  # the champion moved by latency: to the most accurate, `best`
    assert status == 0 and chosen["version"] == best
    latency = {"policy": "best_f1_under_latency", "policy_threshold": "max_latency_ms 10000"}
    assert _policy_tags(client) == {best: latency, wide: former}
    status, chosen, _ = _select(capsys, store, "--alias", "fast")  # another alias: no policy tag moves
    assert status == 0 and _policy_tags(client) == {best: latency, wide: former}

    # Back to the first sweep's champion: it says the policy chose it again, and `best` that it had been champion.
    status, result, _ = _register(capsys, store, "--sweep-run", first["parent"])
    assert status == 0 and result["version"] == wide == _champion(client)
    assert _policy_tags(client) == {wide: density, best: {f"former_champion_{k}": v for k, v in latency.items()}}

    # A later sweep registered by latency, which times its own versions only: the alias leaves `wide` all the same.
    third = sweep_record(client, store["root"], tokenizer, NAME, "c", {"fast": (1, 32, 70.0, 0.3, True)})
    space = _space(store["root"], policy="best_f1_under_latency", max_latency_ms=10000.0)
    status, result, _ = _register(capsys, store, "--frontier", "--space", str(space), "--sweep-run", third["parent"])
    fast = _version_of(client, third["runs"]["fast"])
    assert status == 0 and result["version"] == fast == _champion(client)
    assert _policy_tags(client) == {fast: latency, wide: former,
                                    best: {f"former_champion_{k}": v for k, v in latency.items()}}


def test_a_select_stopped_as_it_moves_the_alias_leaves_every_policy_tag_where_it_was(store, tokenizer, capsys,
                                                                                      monkeypatch, caplog):
    """`select` tagged the version it chose with its policy before it moved the alias: a Ctrl-C as the alias moved
    (or another `select` moving it the other way meanwhile) left a version that is not the champion saying a
    policy chose it, and the champion's policy named `former_champion_policy` at the next registration. The alias
    moves first now; then the chosen version is tagged and the rest tidied, from the versions as they are then."""
    client = store["client"]
    sweep_record(client, store["root"], tokenizer, NAME, "a", TRIALS)
    assert _register(capsys, store, "--frontier")[0] == 0
    champion, before = _champion(client), _policy_tags(client)
    assert set(before) == {champion}  # the registration's policy, on the champion alone

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_registered_model_alias", interrupted)
        status, _, err = _select(capsys, store, "--max-latency-ms", "10000")
    assert status == 130 and err.strip().splitlines()[-1] == "fineprune select: interrupted by SIGINT"
    assert _champion(client) == champion and _policy_tags(client) == before

    # Another command moving the alias while this one tags: the alias stays where the other put it, and only that
    # version keeps a policy.
    other = next(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")
                 if str(v.version) != champion)
    real = MlflowClient.set_registered_model_alias

    def moved_meanwhile(self, name, alias, version):
        real(self, name, alias, version)
        if alias == "champion":
            real(self, name, alias, other)

    caplog.clear()
    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_registered_model_alias", moved_meanwhile)
        status, chosen, err = _select(capsys, store, "--max-latency-ms", "10000")
    assert status == 0 and chosen["version"] == champion
    assert f"alias 'champion' of {NAME} was moved to version {other} by another command" in caplog.text
    assert _champion(client) == other
    assert set(_policy_tags(client)) == {champion} and "policy" not in _policy_tags(client)[champion]

    # Another registration run whole as this one lists the versions: its champion keeps the policy it wrote.
    from workflows import registry

    real_search, fired = MlflowClient.search_model_versions, []

    def registration_meanwhile(self, *args, **kwargs):
        if not fired and self.get_model_version_by_alias(NAME, "champion").version == int(champion):
            fired.append(True)
            registry._make_champion(self, NAME, self.get_model_version(NAME, other),
                                    {"policy": "best_f1_under_density", "policy_threshold": "max_density 0.9"},
                                    "best_f1_under_density max_density 0.9")
        return real_search(self, *args, **kwargs)

    caplog.clear()
    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "search_model_versions", registration_meanwhile)
        patch.setattr(MlflowClient, "set_registered_model_alias", real)
        status, chosen, err = _select(capsys, store, "--max-latency-ms", "10000")
    assert status == 0 and chosen["version"] == champion and fired
    assert _champion(client) == other
    assert _policy_tags(client)[other] == {"policy": "best_f1_under_density", "policy_threshold": "max_density 0.9"}
    assert "policy" not in _policy_tags(client)[champion]


def test_a_sweep_run_removed_for_good_is_named_as_gone_not_as_another_experiments(store, tokenizer, capsys):
    """`register --sweep-run` (and `report --sweep-run`) given a sweep run removed for good with `mlflow gc` said the
    run "is not a sweep of experiment 'exp'", as if it were another experiment's or no sweep; it now says no such run
    is in the store (removed for good, or never made)."""
    made = sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    _gc(store, made["parent"])
    status, out, err = _register(capsys, store, "--sweep-run", made["parent"])
    assert status == 2 and out is None
    assert err.strip().splitlines()[-1] == (
        f"fineprune register: error: run {made['parent']} is not in {store['uri']} (removed for good, by `mlflow gc`, "
        "or never made): pass a sweep run of experiment 'exp'"), err


def test_register_says_when_it_moves_the_champion_alias_off_another_choice(store, tokenizer, capsys, caplog):
    """`select` points the champion at the most accurate version within its budget; `register --frontier` of the
    sweep (the command the warnings give to write a version's tags back) then moved the alias to the version the
    sweep's policy picks, and so did `register` after the later sweep that held it was removed with `mlflow gc`,
    each with no more than an info line. The move is now a warning naming both versions and what chose each (and
    why the version left is set aside), and the result gives the version left as `alias_moved_from`."""
    client = store["client"]
    trials = {**TRIALS, "accurate": (2, 64, 90.0, 0.7, True)}
    first = sweep_record(client, store["root"], tokenizer, NAME, "a", trials)
    status, result, _ = _register(capsys, store, "--frontier")
    wide, accurate = _version_of(client, first["runs"]["wide"]), _version_of(client, first["runs"]["accurate"])
    assert status == 0 and result["version"] == wide and "alias_moved_from" not in result
    status, chosen, _ = _select(capsys, store)
    assert status == 0 and chosen["version"] == accurate == _champion(client) and chosen["alias_moved_from"] == wide

    def moves() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "workflows.registry"
                and " moved from version " in r.getMessage()]

    caplog.clear()
    status, result, _ = _register(capsys, store, "--frontier", "--sweep-run", first["parent"])
    assert status == 0 and result["version"] == wide == _champion(client) and result["alias_moved_from"] == accurate
    assert moves() == [f"alias 'champion' of {NAME} moved from version {accurate} (chosen by best_f1_under_latency "
                       f"max_latency_ms 10000) to version {wide} (chosen by best_f1_under_density max_density 0.6)"]
    caplog.clear()
    status, result, _ = _register(capsys, store, "--frontier")  # where the policy puts it already: nothing moves
    assert status == 0 and "alias_moved_from" not in result and moves() == []

    later = sweep_record(client, store["root"], tokenizer, NAME, "b", {"best": (2, 64, 95.0, 0.5, True)})
    status, result, _ = _register(capsys, store)  # a later sweep's champion takes the alias by the same policy
    best = _version_of(client, later["runs"]["best"])
    assert status == 0 and result["version"] == best and result["alias_moved_from"] == wide and moves() == []
    _gc(store, later["parent"])
    caplog.clear()
    status, result, _ = _register(capsys, store)
    assert status == 0 and result["version"] == wide == _champion(client) and result["alias_moved_from"] == best
    assert moves() == [f"alias 'champion' of {NAME} moved from version {best} (chosen by best_f1_under_density "
                       f"max_density 0.6) to version {wide} (chosen by best_f1_under_density max_density 0.6); "
                       f"version {best}: its sweep run {later['parent']} was removed for good (`mlflow gc`) and "
                       "cannot be restored"]


def test_a_report_whose_champions_trial_run_was_removed_for_good_says_so(store, tokenizer, capsys, caplog):
    """The report of a sweep whose champion's trial run was then removed with `mlflow gc` logged MLflow's "cannot
    list the packed model of run R: Run with id=R not found"; it says the run was removed for good, and what the
    report lacks for it."""
    made = sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    status, champion, _ = _register(capsys, store)
    assert status == 0
    _gc(store, champion["run_id"])
    caplog.clear()
    status = main(["report", "--experiment", "exp", "--tracking-uri", store["uri"], "--out",
                   str(store["root"] / "report")])
    assert status == 0 and made["parent"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "workflows.report"]
    assert warnings == [], warnings


def test_the_card_of_a_champion_whose_trial_run_was_removed_reads_its_structure_from_the_version(store, tokenizer,
                                                                                                 capsys, monkeypatch):
    """The report of a sweep whose champion's trial run was removed with `mlflow gc` showed the card without a
    size on disk or per-layer structure, though the registered version holds the same packed model; they are read
    from the version's copy now (its files listed and its config.json read, the weights not downloaded), the same
    as the trial run's gave before it was removed."""
    made = sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    status, champion, _ = _register(capsys, store)
    assert status == 0 and made["parent"]
    out = store["root"] / "report"

    def card() -> tuple[str, str]:
        assert main(["report", "--experiment", "exp", "--tracking-uri", store["uri"], "--out", str(out)]) == 0
        capsys.readouterr()
        markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
        return markdown.split("## Champion", 1)[1].split("## Search", 1)[0], page.split('id="champion"', 1)[1]

    before, _ = card()
    sized = [line for line in before.splitlines() if line.startswith(("- Size on disk:", "| "))]
    assert len(sized) == 4 and "–" not in sized[0], before  # the size, the table's header and two layers
    _gc(store, champion["run_id"])
    downloads = _Downloads(monkeypatch)
    after, page = card()
    assert [line for line in after.splitlines() if line.startswith(("- Size on disk:", "| "))] == sized, after
    assert "its size and structure those of the packed model the version holds" in after
    assert "Kept attention heads per layer" in page and "records no per-layer structure" not in page
    assert not [leaf for leaf in downloads.downloads if leaf.endswith(".safetensors") or leaf == "packed_model"], \
        downloads.downloads


def test_the_report_card_of_a_champion_whose_trial_run_is_gone_says_whether_it_still_serves(store, tokenizer,
                                                                                             capsys):
    """The report of a sweep whose champion's trial run was deleted, or removed for good with `mlflow gc`, showed
    the champion's card (size "–") and how to load and serve it as if nothing had happened; the card now says what
    became of the run and what that means: the registered version keeps its own copy of the served model, which
    still loads (as measured here), and once that copy's files are gone too the card says it cannot be loaded or
    served and gives no way to."""
    import shutil

    import pandas as pd

    client = store["client"]
    made = sweep_record(client, store["root"], tokenizer, NAME, "a", TRIALS)
    status, champion, _ = _register(capsys, store)
    assert status == 0
    run_id, out = champion["run_id"], store["root"] / "report"

    def report() -> tuple[str, str]:
        assert main(["report", "--experiment", "exp", "--tracking-uri", store["uri"], "--out", str(out)]) == 0
        capsys.readouterr()
        return (out / "report.md").read_text(), (out / "report.html").read_text()

    markdown, html = report()
    assert "was deleted" not in markdown and "removed for good" not in markdown and "Load it:" in markdown

    client.delete_run(run_id)
    markdown, html = report()
    restore = record.restore_command(store["uri"], run_id)
    assert (f"Its trial run `{run_id}` was deleted in the MLflow UI (`{restore}` brings it back)" in markdown)
    assert "still loads and serves as below" in markdown and "Load it:" in markdown
    assert f"Its trial run <code>{run_id}</code> was deleted in the MLflow UI" in html and 'id="champion-note"' in html

    _gc(store, run_id)
    markdown, html = report()
    assert made["parent"] and f"Its trial run `{run_id}` was removed for good (`mlflow gc`)" in markdown
    said = ("The registered version keeps its own copy of the served model in the registry, which deleting or "
            "removing its trial run leaves in place: it still loads and serves as below.")
    assert said in markdown and "Load it:" in markdown and "Serve it:" in markdown
    assert f"Its trial run <code>{run_id}</code> was removed for good" in html and said in html
    # The trial's figures, as its version's tags record them (the champion is `wide`: F1 80, density 0.5).
    assert f"- **Champion**: models:/{NAME}@champion (version {champion['version']}, {run_id}): F1 80.00, EM 70.00, " \
           "linear density 0.500, speedup 1.50x" in markdown
    assert "- Speedup: 1.50x; F1 80.00, EM 70.00, linear density 0.500" in markdown
    assert "<b>80.00</b><span>F1</span>" in html
    assert "records no per-layer structure" not in html
    with logged_model.fluent_store(store["uri"]):  # what the card says is so: the champion loads and answers
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        answers = model.predict(pd.DataFrame({"question": ["Who wrote it?"], "context": ["It was written by Ann."]}))
    assert list(answers.columns) == ["answer", "score"]

    root = client.get_model_version_download_uri(NAME, champion["version"]).rstrip("/")
    shutil.rmtree(Path(root.removeprefix("file://")) / "code")
    markdown, html = report()
    assert (f"The registered version cannot be loaded or served either: its code (code) is gone from {root}."
            in markdown)
    assert "Load it:" not in markdown and "Serve it:" not in markdown
    assert "cannot be loaded or served either" in html and "mlflow models serve" not in html


def test_the_report_card_of_a_champion_whose_files_are_gone_gives_no_way_to_serve_it(store, tokenizer, capsys):
    """The report of a sweep whose champion version had lost a file of its served model (deleted from the artifact
    store by hand) showed how to load and serve it, which fails; the card now says the version cannot be loaded or
    served, why, and how to have it made anew, and gives neither snippet."""
    import pandas as pd

    client = store["client"]
    sweep_record(client, store["root"], tokenizer, NAME, "a", TRIALS)
    status, champion, _ = _register(capsys, store)
    assert status == 0
    root = client.get_model_version_download_uri(NAME, champion["version"]).rstrip("/")
    (Path(root.removeprefix("file://")) / "qa_model.py").unlink()
    with logged_model.fluent_store(store["uri"]), pytest.raises(Exception, match="qa_model.py"):
        mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame({"question": ["q"],
                                                                                    "context": ["c"]}))
    out = store["root"] / "report"
    assert main(["report", "--experiment", "exp", "--tracking-uri", store["uri"], "--out", str(out)]) == 0
    markdown, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    said = (f"This version cannot be loaded or served: its python_model (qa_model.py) is gone from {root}. "
            "`fineprune register` and `fineprune select` no longer choose it; delete the version, and registering "
            "the sweep again makes it anew from the trial's packed model.")
    assert said in markdown and "Load it:" not in markdown and "Serve it:" not in markdown
    assert "This version cannot be loaded or served" in html and "mlflow models serve" not in html
    assert "- Size on disk: " in markdown and "- Speedup: " in markdown  # the trial's record is all there


def test_a_report_without_a_champion_says_why_as_far_as_the_record_tells(store, tokenizer, capsys):
    """The report of a sweep whose champion's version was deleted from the registry read "No trial was registered
    as champion (no trial met the registry policy)", though a trial met it and was registered; the report now names
    the trial the policy chooses, why it may not be champion and the command that registers it, and says that no
    trial meets the policy only when none does."""
    client = store["client"]
    made = sweep_record(client, store["root"], tokenizer, NAME, "a", TRIALS)
    status, champion, _ = _register(capsys, store)
    assert status == 0
    client.delete_model_version(NAME, champion["version"])
    out = store["root"] / "report"

    def report(sweep: str) -> tuple[str, str]:
        assert main(["report", "--experiment", "exp", "--tracking-uri", store["uri"], "--out", str(out),
                     "--sweep-run", sweep]) == 0
        capsys.readouterr()
        return (out / "report.md").read_text(), (out / "report.html").read_text()

    markdown, html = report(made["parent"])
    command = record.fineprune_command("register", store["uri"], "--experiment", "exp", "--sweep-run",
                                       made["parent"])
    assert ("The registry policy best_f1_under_density (max_density 0.6) chooses trial wide, but no version of this "
            "sweep is, or was, its champion: its version was deleted from the registry, or it was not registered"
            in markdown), markdown
    assert f"`{command}` registers it." in markdown and f"<code>{command}</code> registers it." in html
    assert "no trial met" not in html.lower()
    status, again, _ = _register(capsys, store, "--sweep-run", made["parent"])  # the command the report gives
    assert status == 0 and again["run_id"] == made["runs"]["wide"]
    markdown, _ = report(made["parent"])
    assert f"`models:/{NAME}@champion` (registered model {NAME}, version {again['version']}" in markdown

    over = sweep_record(client, store["root"], tokenizer, NAME, "b", {"dense": (2, 64, 90.0, 0.9, True)})
    assert _register(capsys, store, "--sweep-run", over["parent"])[0] == 4
    markdown, html = report(over["parent"])
    said = ("No trial meets the registry policy best_f1_under_density (max_density 0.6): none was registered as "
            "champion.")
    assert said in markdown and said in html


def test_the_report_of_a_sweep_whose_champion_is_set_aside_says_so_and_suggests_no_move_back(store, tokenizer,
                                                                                              capsys):
    """The report of a sweep whose champion's version the alias had left for a later sweep's, its trial run then
    deleted, read "No trial was registered as champion (no trial met the registry policy)"; it now names that
    version and why it is set aside, and does not offer a registration that would move the alias back. A trial the
    policy chooses that is no champion is named with the command that registers it and the version that command
    moves the alias from."""
    client = store["client"]
    first, later = _two_sweeps_registered(store, tokenizer, capsys)
    wide, best = _version_of(client, first["runs"]["wide"]), _version_of(client, later["runs"]["best"])
    assert _champion(client) == best
    out = store["root"] / "report"

    def report() -> tuple[str, str]:
        assert main(["report", "--experiment", "exp", "--tracking-uri", store["uri"], "--out", str(out),
                     "--sweep-run", first["parent"]]) == 0
        capsys.readouterr()
        return (out / "report.md").read_text(), (out / "report.html").read_text()

    client.delete_run(first["runs"]["wide"])
    markdown, html = report()
    restore = record.restore_command(store["uri"], first["runs"]["wide"])
    said = (f"Version {wide} of {NAME}, this sweep's champion, is set aside: its trial run `{first['runs']['wide']}` "
            f"was deleted (`{restore}` brings it back).")
    assert said in markdown and "fineprune register" not in markdown.split("## Champion")[1].split("##")[0]
    assert "no trial met" not in html.lower()
    _gc(store, first["runs"]["wide"])
    markdown, _ = report()
    assert (f"its trial run `{first['runs']['wide']}` was removed for good (`mlflow gc`), which nothing brings "
            "back." in markdown)

    client.delete_model_version(NAME, wide)  # the set-aside version gone too: the policy now chooses `narrow`
    markdown, _ = report()
    command = record.fineprune_command("register", store["uri"], "--experiment", "exp", "--sweep-run",
                                       first["parent"])
    assert "The registry policy best_f1_under_density (max_density 0.6) chooses trial narrow" in markdown
    assert f"`{command}` registers it and moves the `champion` alias to it from version {best}, the champion now." \
        in markdown


def test_a_reports_snippets_name_a_relative_sqlite_store_from_any_directory(store, tokenizer, capsys, monkeypatch):
    """With the default store, `sqlite:///mlflow.db`, the report's load snippet and serve command named it relatively:
    run from any other directory (the report is read elsewhere) they made an empty mlflow.db there and found no
    model. The report names the database by its absolute path, and its snippet loads the champion from elsewhere."""
    import os
    import subprocess
    import sys

    client = store["client"]
    sweep_record(client, store["root"], tokenizer, NAME, "a", TRIALS)
    assert _register(capsys, store)[0] == 0
    monkeypatch.chdir(store["root"])
    out = store["root"] / "report"
    assert main(["report", "--experiment", "exp", "--tracking-uri", "sqlite:///mlflow.db", "--out", str(out)]) == 0
    capsys.readouterr()
    markdown = (out / "report.md").read_text()
    absolute = f"sqlite:///{store['root']}/mlflow.db"
    assert f'mlflow.set_tracking_uri("{absolute}")' in markdown
    assert f"MLFLOW_TRACKING_URI={absolute} mlflow models serve" in markdown
    snippet = markdown.split("```python\n", 1)[1].split("```", 1)[0]
    elsewhere = store["root"] / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "answer" in proc.stdout and not (elsewhere / "mlflow.db").exists()
    # Its eval command scores the champion from there too (on the first dev questions, for a file of one's own).
    command = markdown.split("questions of your own:\n\n```bash\n", 1)[1].split("\n```", 1)[0]
    assert command.startswith(f"fineprune eval models:/{NAME}@champion --tracking-uri {absolute} --eval-data ")
    argv = [*shlex.split(command)[1:-1], "dev", "--eval-limit", "2", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", *argv], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["model_uri"] == f"models:/{NAME}@champion" and result["questions"] == 2
    assert not (elsewhere / "mlflow.db").exists()
    assert command in (out / "report.html").read_text()


def test_a_no_champion_note_shows_names_as_written(store, tokenizer, capsys):
    """The report's note on a sweep without a champion put the trial's name (a run renamed in the MLflow UI) into
    report.md as it was, so `*`, `_`, backticks and HTML in it became emphasis, code and markup, and report.html
    took its backticks for code; an experiment name holding a backtick cut the command it suggests in two. Both
    pages now show the names as written, and the command as one piece of code."""
    import html as html_lib
    import re

    client = store["client"]
    experiment, trial = "e `q` *r*", "wide *x* _y_ `z` <b>|"
    client.create_experiment(experiment, artifact_location=(store["root"] / "artifacts2").as_uri())
    made = sweep_record(client, store["root"], tokenizer, NAME, "a", TRIALS, experiment=experiment)
    client.set_tag(made["runs"]["wide"], record.TAG_RUN_NAME, trial)
    out = store["root"] / "report"
    assert main(["report", "--experiment", experiment, "--tracking-uri", store["uri"], "--out", str(out)]) == 0
    capsys.readouterr()
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    command = record.fineprune_command("register", store["uri"], "--experiment", experiment, "--sweep-run",
                                       made["parent"])
    note = markdown.split("## Champion", 1)[1].split("##", 1)[0].strip()
    assert note.startswith("The registry policy best_f1_under_density (max_density 0.6) chooses trial wide &#42;x&#42; "
                           "&#95;y&#95; &#96;z&#96; &lt;b&gt;|, but"), note
    assert f"; ``{command}`` registers it." in note  # one code span, the backticks in it as they are
    said = page.split('id="no-champion">', 1)[1].split("</p>", 1)[0]
    assert f"chooses trial {trial}, but" in html_lib.unescape(re.sub(r"<[^>]*>", "", said))
    assert "<code>z</code>" not in said and "<b>" not in said
    assert html_lib.unescape(re.findall(r"<code>(.*?)</code>", said)[-1]) == command


def test_the_report_of_a_running_sweep_says_it_registers_its_champion_when_it_ends(store, tokenizer, capsys):
    """`fineprune report` while a sweep runs said its champion was not registered and suggested `fineprune register
    --sweep-run` to register it, which the sweep does itself at its end, from all its trials; the report now says
    the sweep has not finished and how to finish one whose process was killed. Its own report, written at its end
    before its run ends, still says why it registered none."""
    client = store["client"]
    made = sweep_record(client, store["root"], tokenizer, NAME, "a", TRIALS)
    client.update_run(made["parent"], status="RUNNING")  # as while its trials run
    out = store["root"] / "report"
    assert main(["report", "--experiment", "exp", "--tracking-uri", store["uri"], "--out", str(out)]) == 0
    capsys.readouterr()
    note = (out / "report.md").read_text().split("## Champion", 1)[1].split("##", 1)[0].strip()
    resume = record.fineprune_command("sweep", store["uri"], "--space", "SPACE", "--resume", made["parent"])
    assert note == ("The sweep has not finished (its MLflow run is RUNNING): it registers its champion, as the "
                    "registry policy best_f1_under_density (max_density 0.6) chooses it from all its trials, when "
                    f"it ends. If its process was killed, `{resume}` finishes it (SPACE: the search space file the "
                    "sweep ran)."), note
    assert "fineprune register" not in note

    over = sweep_record(client, store["root"], tokenizer, NAME, "b", {"dense": (2, 64, 90.0, 0.9, True)})
    client.update_run(over["parent"], status="RUNNING")
    summary = _conclude(store, over["parent"], _space(store["root"]))  # the sweep's end: registers none
    assert summary["champion"]["registered"] is False
    markdown = Path(summary["report"]["markdown"]).read_text()
    assert ("No trial meets the registry policy best_f1_under_density (max_density 0.6): none was registered as "
            "champion.") in markdown


def test_register_select_and_report_print_their_own_lines_not_mlflows_download_bars(store, tokenizer, capsys,
                                                                                     monkeypatch):
    """`fineprune register`, `select` and `report` printed MLflow's "Downloading artifacts" progress bars on stderr,
    several a command, each for a file or two, among the command's own lines; they print none now, unless
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR is set (true shows them, as MLflow documents)."""
    import os

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    status, _, err = _register(capsys, store)
    assert status == 0 and "Downloading artifacts" not in err
    status, _, err = _select(capsys, store)
    assert status == 0 and "Downloading artifacts" not in err
    report = ["report", "--experiment", "exp", "--tracking-uri", store["uri"], "--out", str(store["root"] / "r")]
    assert main(report) == 0
    err = capsys.readouterr().err
    assert "Downloading artifacts" not in err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # as it was after the command
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    assert main(report) == 0
    assert "Downloading artifacts" in capsys.readouterr().err


def test_a_trial_on_unanswerable_questions_tags_its_version_with_f1_by_kind_and_its_best_threshold(store, tokenizer,
                                                                                                   capsys):
    """SQuAD v2.0: the version of a trial that logged the answerable / unanswerable split and the best threshold
    carries them as tags, and `register` and `select` name them; a trial on answerable questions alone, none."""
    made = sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    client = store["client"]
    figures = {"has_answer_f1": 70.0, "no_answer_f1": 91.25, "best_f1": 82.5, "best_f1_threshold": -0.3125}
    for key, value in figures.items():
        client.log_metric(made["runs"]["wide"], key, value)
    status, result, _ = _register(capsys, store, "--frontier")
    assert status == 0 and result["run_id"] == made["runs"]["wide"]
    assert {key: result[key] for key in figures} == figures
    rows = {row["run_id"]: row for row in result["frontier_versions"]}
    versions = {v.tags[record.TAG_TRIAL_RUN]: v.tags for v in client.search_model_versions(f"name = '{NAME}'")}
    assert {key: versions[made["runs"]["wide"]][key] for key in figures} == {
        "has_answer_f1": "70", "no_answer_f1": "91.25", "best_f1": "82.5", "best_f1_threshold": "-0.3125"}
    assert not set(figures) & set(versions[made["runs"]["narrow"]])
    assert {key: rows[made["runs"]["wide"]][key] for key in figures} == figures
    assert not set(figures) & set(rows[made["runs"]["narrow"]])
    status, chosen, _ = _select(capsys, store)
    assert status == 0 and chosen["run_id"] == made["runs"]["wide"] and {k: chosen[k] for k in figures} == figures
    by_run = {row["run_id"]: row for row in chosen["versions"]}
    assert {k: by_run[made["runs"]["wide"]][k] for k in figures} == figures
    assert not set(figures) & set(by_run[made["runs"]["narrow"]])


def test_a_new_frontier_version_is_made_with_its_tags_and_found_without_reading_every_version(store, tokenizer,
                                                                                           capsys, monkeypatch):
    """Each new version listed every version of the model again (to check that no registration beside it had made
    one of the same trial) and was then tagged one tag at a time, about ten writes: on a model with a thousand
    versions from earlier sweeps, a frontier of 45 trials took two minutes instead of 30 s. The check now asks the
    store for the trial's versions alone, and a new version is made with its tags."""
    made = sweep_record(store["client"], store["root"], tokenizer, NAME, "a", TRIALS)
    client = store["client"]
    searches, tag_writes = [], []
    search, set_tag = MlflowClient.search_model_versions, MlflowClient.set_model_version_tag

    def counted_search(self, filter_string=None, *args, **kwargs):
        searches.append(filter_string)
        return search(self, filter_string, *args, **kwargs)

    def counted_tag(self, name, version, key, value):
        tag_writes.append(key)
        return set_tag(self, name, version, key, value)

    monkeypatch.setattr(MlflowClient, "search_model_versions", counted_search)
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", counted_tag)
    status, result, _ = _register(capsys, store, "--frontier")
    assert status == 0 and result["run_id"] == made["runs"]["wide"]
    whole = [where for where in searches if where == f"name = '{NAME}'"]
    assert len(whole) <= 3, searches  # the frontier's versions once, the champion's tidy once (and its result)
    kept_after = [record.TAG_SWEEP_RUN, *record.FRONTIER_TAGS]  # written once the version is the one kept
    assert sorted(tag_writes) == sorted([*kept_after, *kept_after, registry.TAG_POLICY,
                                         registry.TAG_POLICY_THRESHOLD]), tag_writes
    for trial in ("wide", "narrow"):
        tags = client.get_model_version(NAME, _version_of(client, made["runs"][trial])).tags
        assert tags["f1"] and tags["linear_density"] and tags["pareto"] == "true", tags
        assert tags[record.TAG_SWEEP_RUN] == made["parent"]
    searches.clear()
    tag_writes.clear()
    assert _register(capsys, store, "--frontier")[0] == 0 and tag_writes == []  # again: nothing new written


def test_the_report_names_the_version_its_sweep_made_champion_last_not_its_highest(store, tokenizer, capsys):
    """Two versions of one sweep were champion in turn (registrations by two policies), and a later sweep's took
    the alias: the report of the first sweep named the higher version number, which was not its champion last. The
    alias's leaving is recorded, and the version it left last is named."""
    from workflows.report import collect_report_data

    client = store["client"]
    root = store["root"]
    first = sweep_record(client, root, tokenizer, NAME, "a", TRIALS)

    def champion_by(max_density: float) -> str:
        space = _space(root, policy="best_f1_under_density", max_density=max_density)
        status, result, _ = _register(capsys, store, "--frontier", "--space", str(space),
                                      "--sweep-run", first["parent"])
        assert status == 0 and result["version"] == _champion(client)
        return result["version"]

    narrow = champion_by(0.35)
    wide = champion_by(0.6)
    assert champion_by(0.35) == narrow and int(narrow) < int(wide)  # the last champion is not the highest number
    later = sweep_record(client, root, tokenizer, NAME, "b", {"best": (2, 64, 90.0, 0.5, True)})
    assert _register(capsys, store, "--frontier", "--space", str(_space(root)), "--sweep-run", later["parent"])[0] == 0
    assert _champion(client) == _version_of(client, later["runs"]["best"])

    card = collect_report_data("exp", store["uri"], first["parent"]).champion
    assert (card.version, card.alias_current, card.policy) == (narrow, False,
                                                               "best_f1_under_density (max_density 0.35)")
    tags = {str(v.version): v.tags for v in client.search_model_versions(f"name = '{NAME}'")}
    assert float(tags[narrow][record.TAG_CHAMPION_UNTIL]) > float(tags[wide][record.TAG_CHAMPION_UNTIL])
    assert record.TAG_CHAMPION_UNTIL not in tags[_champion(client)]
