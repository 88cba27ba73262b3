"""Warm start: a sweep's sampler is told an earlier sweep's trials before its first suggestion (real MLflow store,
real OptunaSearch)."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from test_space import BASE_SPACE

from workflows import record
from workflows.distinct import EnqueueingOptunaSearch
from workflows.space import ParamSpec, load_space
from workflows.tune_search import param_space, search_algorithm
from workflows.warm_start import WarmStartError, prior_outcomes

from conftest import sqlite_store

SEARCH = {"target_density": {"type": "choice", "values": [0.3, 0.5, 0.7]},
          "temperature": {"type": "choice", "values": [1, 2, 4, 8]}}


def space_file(tmp_path: Path, search: dict = SEARCH, name: str = "space.yaml", **top) -> Path:
    values = {**copy.deepcopy(BASE_SPACE), "search": search, "seed": 3, **top}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def record_sweep(client: MlflowClient, experiment: str, trials: list[tuple[dict, dict, str]]) -> str:
    """A finished sweep as a sweep writes it (``workflows.record``'s schema): a parent run and one nested trial run
    per ``(searched values, metrics, status)``, the values logged as ``searched.<key>`` params. Its parent run id."""
    experiment_id = (client.get_experiment_by_name(experiment) or client.get_experiment(
        client.create_experiment(experiment))).experiment_id
    parent = client.create_run(experiment_id, tags={record.TAG_KIND: record.KIND_SWEEP,
                                                    record.TAG_SWEEP: f"/sweeps/{experiment}-{len(trials)}",
                                                    record.TAG_SWEEP_STATE: record.SWEEP_COMPLETE}).info.run_id
    for searched, metrics, status in trials:
        run = client.create_run(experiment_id, tags={record.TAG_KIND: record.KIND_TRIAL, record.TAG_PARENT: parent,
                                                     record.TAG_STATUS: status}).info.run_id
        for name, value in record.flat_params({f"{record.PARAM_SEARCHED}{k}": v for k, v in searched.items()}).items():
            client.log_param(run, name, value)
        for name, value in metrics.items():
            client.log_metric(run, name, value)
        client.set_terminated(run, "FAILED" if status == record.STATUS_FAILED else "FINISHED")
    client.set_terminated(parent)
    return parent


def outcome(density: float, temperature: int) -> dict:
    """F1 peaks at temperature 4 whatever the density."""
    return {"f1": 60 * density + (30 if temperature == 4 else 0), "linear_density": density}


def grid_trials() -> list[tuple[dict, dict, str]]:
    return [({"target_density": d, "temperature": t}, outcome(d, t), record.STATUS_FINISHED)
            for d in (0.3, 0.5, 0.7) for t in (1, 2, 4, 8)]


@pytest.fixture
def client(tmp_path) -> MlflowClient:
    return MlflowClient(tracking_uri=sqlite_store(tmp_path / "mlflow.db"))


@pytest.mark.parametrize("spec,text,value", [
    ({"type": "choice", "values": [0.3, 0.5]}, "0.5", 0.5),
    ({"type": "choice", "values": [16, 64]}, "64", 64),
    ({"type": "choice", "values": [1, 2]}, "1.0", 1),            # an earlier space's 1.0 is this space's 1
    ({"type": "choice", "values": ["linear", "cubic"]}, "cubic", "cubic"),
    ({"type": "choice", "values": [True, False]}, "False", False),
    ({"type": "choice", "values": [None, 2]}, "None", None),
    ({"type": "uniform", "low": 0.2, "high": 0.8}, "0.8", 0.8),
    ({"type": "loguniform", "low": 1e-5, "high": 1e-3}, "0.0001", 1e-4),
    ({"type": "randint", "low": 1, "high": 4}, "3", 3),
    ({"type": "quniform", "low": 0.0, "high": 1.0, "q": 0.25}, "0.75", 0.75),
])
def test_a_logged_value_reads_back_as_the_value_the_space_gives(spec, text, value):
    parsed = ParamSpec(**spec).parse_logged(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("spec,text", [
    ({"type": "choice", "values": [0.3, 0.5]}, "0.4"),
    ({"type": "choice", "values": [0, 1]}, "True"),              # a flag is not a number
    ({"type": "uniform", "low": 0.2, "high": 0.8}, "0.9"),
    ({"type": "uniform", "low": 0.2, "high": 0.8}, "nan"),
    ({"type": "randint", "low": 1, "high": 4}, "2.5"),
    ({"type": "quniform", "low": 0.0, "high": 1.0, "q": 0.25}, "0.3"),
    ({"type": "uniform", "low": 0.2, "high": 0.8}, "cubic"),
])
def test_a_logged_value_the_space_cannot_give_is_refused(spec, text):
    with pytest.raises(ValueError):
        ParamSpec(**spec).parse_logged(text)


def test_the_usable_trials_of_the_earlier_sweep_are_read_with_their_values_and_the_rest_counted(client, tmp_path,
                                                                                                caplog):
    trials = grid_trials() + [
        ({"target_density": 0.5, "temperature": 2}, {"f1": 10.0}, record.STATUS_FAILED),
        ({"target_density": 0.4, "temperature": 2}, outcome(0.4, 2), record.STATUS_FINISHED),   # not a value now
        ({"target_density": 0.5}, outcome(0.5, 2), record.STATUS_FINISHED),                     # a key not searched
        ({"target_density": 0.5, "temperature": 1}, {"f1": 40.0}, record.STATUS_STOPPED_EARLY),  # no density
    ]
    parent = record_sweep(client, "before", trials)
    space = load_space(space_file(tmp_path))
    with caplog.at_level(logging.INFO, logger="workflows.warm_start"):
        warm = prior_outcomes(client, space, "before")  # the experiment: its latest sweep
    assert warm.sweep_run_id == parent and warm.experiment == "before"
    assert sorted(map(repr, warm.outcomes)) == sorted(repr((s, m)) for s, m, _ in grid_trials())
    assert all(type(config["temperature"]) is int for config, _ in warm.outcomes)
    said = caplog.records[-1].getMessage()
    assert "12 trials of sweep run" in said
    for reason in ("1 failed", "1 target_density outside the space", "1 temperature not searched",
                   "1 no linear_density"):
        assert reason in said, said
    assert prior_outcomes(client, space, parent).outcomes == warm.outcomes  # the same sweep by its run id


@pytest.mark.parametrize("held,base,values,kept,reason", [
    # alpha_distil at RunConfig's default, 0.9
    ("alpha_distil", {}, [0.9, 0.5, 0.9], [1, 4], "1 alpha_distil searched then, held at 0.9 now"),
    ("learning_rate", {"learning_rate": 1e-3}, [0.001, 3e-4, 1e-3], [1, 4], "held at 0.001 now"),
    # the pseudo-key lambda sets lambda_attention and lambda_ffn; 5.0 is the 5 the earlier sweep ran
    ("lambda", {"method": "sigmoid_threshold", "lambda_attention": 5, "lambda_ffn": 5}, [5, 1, 5.0], [1, 4],
     "1 lambda searched then, held at 5 now"),
])
def test_a_key_the_earlier_sweep_searched_and_this_space_holds_keeps_only_the_trials_at_its_value(
        client, tmp_path, caplog, held, base, values, kept, reason):
    """The earlier sweep also searched a key this space holds at one value: a trial run at another value is no
    configuration of this space."""
    trials = [({"temperature": t, held: v}, outcome(0.5, t), record.STATUS_FINISHED) for t, v in zip((1, 2, 4), values)]
    record_sweep(client, "wider", trials)
    # sigmoid_threshold sets no density target for the champion's density cap to default to
    registry = {"registry": {"max_density": 0.5}} if base.get("method") == "sigmoid_threshold" else {}
    space = load_space(space_file(tmp_path, search={"temperature": SEARCH["temperature"]},
                                  base={**BASE_SPACE["base"], **base}, **registry))
    with caplog.at_level(logging.INFO, logger="workflows.warm_start"):
        warm = prior_outcomes(client, space, "wider")
    assert sorted(config["temperature"] for config, _ in warm.outcomes) == kept
    assert reason in caplog.records[-1].getMessage(), caplog.records[-1].getMessage()


def test_an_earlier_sweep_in_another_store_is_read_from_there_and_that_store_named(client, tmp_path):
    """The sweep's store (``client``) holds no earlier sweep; ``--warm-start-tracking-uri`` names the one that does,
    whose file reading leaves as it was. The same store named both ways is the sweep's own."""
    other_uri = sqlite_store(tmp_path / "elsewhere" / "mlflow.db")
    parent = record_sweep(MlflowClient(tracking_uri=other_uri), "before", grid_trials())
    before = (tmp_path / "elsewhere" / "mlflow.db").read_bytes()
    space = load_space(space_file(tmp_path))
    warm = prior_outcomes(client, space, "before", other_uri, limit=5)
    assert warm.sweep_run_id == parent and len(warm.outcomes) == 12 and warm.store == other_uri
    assert warm.summary() == {"sweep_run_id": parent, "trials": 12, "tracking_uri": other_uri}
    assert f"(experiment 'before', tracking URI {other_uri})" in warm.describe()
    assert (tmp_path / "elsewhere" / "mlflow.db").read_bytes() == before
    assert client.search_experiments(filter_string="name = 'before'") == []  # nothing copied into the sweep's store
    with pytest.raises(WarmStartError, match="--warm-start before: no experiment or sweep run of that name"):
        prior_outcomes(client, space, "before")  # default: the sweep's own store
    record_sweep(client, "before", grid_trials()[:3])
    with pytest.raises(WarmStartError, match="--warm-start befor: no experiment or sweep run of that name in "
                                             f"{client.tracking_uri}; did you mean 'before'\\?$"):
        prior_outcomes(client, space, "befor")
    same = prior_outcomes(client, space, "before", client.tracking_uri, limit=5)
    assert len(same.outcomes) == 3 and same.store is None and "tracking_uri" not in same.summary()


@pytest.mark.parametrize("source,needle", [
    ("nowhere", "--warm-start nowhere: no experiment or sweep run of that name in sqlite:///"),
    ("0123456789abcdef0123456789abcdef", "--warm-start 0123456789abcdef0123456789abcdef: no such run"),
])
def test_an_earlier_sweep_that_is_not_there_is_one_line(client, tmp_path, source, needle):
    with pytest.raises(WarmStartError) as info:
        prior_outcomes(client, load_space(space_file(tmp_path)), source)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_an_earlier_sweep_whose_trials_fit_no_configuration_of_the_space_is_one_line_naming_the_space(client,
                                                                                                      tmp_path):
    record_sweep(client, "other", [({"target_density": 0.9, "temperature": 2}, outcome(0.9, 2),
                                     record.STATUS_FINISHED)])
    path = space_file(tmp_path)
    with pytest.raises(WarmStartError, match=rf"none of the 1 trials of sweep run \w+ \(experiment 'other'\) fits "
                                             rf"{path} \(1 target_density outside the space\)"):
        prior_outcomes(client, load_space(path), "other")


def test_only_a_sampler_that_models_outcomes_can_be_warm_started(client, tmp_path):
    record_sweep(client, "before", grid_trials())
    path = space_file(tmp_path, algorithm="random")
    with pytest.raises(WarmStartError, match="only algorithm optuna learns from earlier outcomes; .* algorithm random"):
        prior_outcomes(client, load_space(path), "before")


def _suggestions(prior: list, n: int = 10) -> tuple[EnqueueingOptunaSearch, list[int]]:
    """A TPE searcher over the temperatures told ``prior``, and its first ``n`` suggestions."""
    from ray import tune

    searcher = EnqueueingOptunaSearch(metric=["f1", "linear_density"], mode=["max", "min"],
                                      sampler=optuna.samplers.TPESampler(seed=0), prior=prior)
    searcher.set_search_properties(None, None, {"temperature": tune.choice(SEARCH["temperature"]["values"])})
    return searcher, [searcher.suggest(f"t{i}")["temperature"] for i in range(n)]


def test_the_sampler_starts_from_the_earlier_outcomes_and_suggests_where_they_were_best():
    """Told 24 trials where temperature 4 dominates, TPE suggests 4 from its first trial on; untold, its first
    suggestions are random draws (Optuna's 10 startup trials)."""
    prior = [({"temperature": t}, {"f1": 80.0 if t == 4 else 10.0, "linear_density": 0.5})
             for t in (1, 2, 4, 8) for _ in range(6)]
    searcher, told = _suggestions(prior)
    _, untold = _suggestions([])
    finished = [t for t in searcher._ot_study.trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 24 and Counter(t.params["temperature"] for t in finished) == dict.fromkeys((1, 2, 4, 8), 6)
    assert told.count(4) >= 9, told
    assert untold.count(4) <= 5, untold


def test_a_configuration_the_earlier_sweep_ran_is_no_repeat_in_the_new_one(tmp_path):
    """The earlier trials teach the sampler; they are not this sweep's: the whole space is still there to run."""
    space = load_space(space_file(tmp_path))
    prior = [(config, metrics) for config, metrics, _ in grid_trials()]
    alg = search_algorithm(space, prior=prior)
    alg.set_search_properties(None, None, param_space(space))
    suggested = [alg.suggest(f"t{i}") for i in range(12)]
    assert len({tuple(sorted(c.items())) for c in suggested}) == 12  # all 12, none answered from the prior
    inner = alg
    while not isinstance(inner, EnqueueingOptunaSearch):
        inner = inner.searcher
    assert sum(t.state == TrialState.COMPLETE for t in inner._ot_study.trials) == 12  # the prior, told


@pytest.mark.parametrize("options,top,message", [
    (["--resume"], {}, "--warm-start starts a new sweep; a resumed sweep's sampler keeps what it was told"),
    ([], {"algorithm": "random"}, "--warm-start: only algorithm optuna learns from earlier outcomes"),
])
def test_a_warm_start_that_cannot_be_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys,
                                                                                      options, top, message):
    from workflows import cli

    monkeypatch.chdir(tmp_path)
    code = cli.main(["sweep", "--space", str(space_file(tmp_path, **top)), "--tracking-uri",
                     f"sqlite:///{tmp_path}/mlflow.db", "--warm-start", "before", *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # no store, no runs directory


@pytest.mark.parametrize("options,message", [
    (["--warm-start", "before", "--warm-start-tracking-uri", "sqlite:///{tmp}/earlier/mlflow.db"],
     "tracking URI sqlite:///{tmp}/earlier/mlflow.db: no MLflow database at {tmp}/earlier/mlflow.db (pass the "
     "earlier sweep's --tracking-uri as --warm-start-tracking-uri)"),
    (["--warm-start", "before", "--warm-start-tracking-uri", "sqlite:///{tmp}/empty.db"],
     "{tmp}/empty.db is an empty file, not an MLflow database"),
    (["--warm-start-tracking-uri", "sqlite:///{tmp}/empty.db"],
     "--warm-start-tracking-uri names the store of the sweep --warm-start names; give both"),
    # The earlier sweep in the sweep's own store, which does not exist: it was made (empty) before the refusal.
    (["--warm-start", "before"],
     "tracking URI sqlite:///{tmp}/mlflow.db: no MLflow database at {tmp}/mlflow.db (pass the earlier sweep's store "
     "as --tracking-uri, or as --warm-start-tracking-uri)"),
])
def test_a_warm_start_store_with_no_record_is_refused_in_one_line_and_not_made(tmp_path, monkeypatch, capsys, options,
                                                                              message):
    from workflows import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.db").touch()
    code = cli.main(["sweep", "--space", str(space_file(tmp_path)), "--tracking-uri",
                     f"sqlite:///{tmp_path}/mlflow.db", *(o.format(tmp=tmp_path) for o in options)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message.format(tmp=tmp_path) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "space.yaml"]  # neither store made
    assert (tmp_path / "empty.db").stat().st_size == 0


def test_under_a_ray_job_a_warm_start_store_not_uploaded_says_why(tmp_path, monkeypatch, capsys):
    """Under `ray job submit`, a warm start from the checkout's sqlite:///mlflow.db (the documented command) found no
    database, and was told to pass the store it had passed: .gitignore leaves that file out of the job's upload."""
    from workflows import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    code = cli.main(["sweep", "--space", str(space_file(tmp_path)), "--tracking-uri", f"sqlite:///{tmp_path}/s.db",
                     "--warm-start", "before", "--warm-start-tracking-uri", "sqlite:///mlflow.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].endswith("under `ray job submit` only uploaded files are there, and .gitignore leaves a "
                           "checkout's mlflow.db out: copy it under another name (docs/cluster.md))"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_a_resumed_sweep_that_stopped_before_tune_saved_its_state_is_told_its_warm_start_again(client, tmp_path):
    """A warm-started sweep whose driver stopped before Ray Tune first saved its state (killed, or stopped by a
    tracking outage while its baseline was logged, which says to resume it) was resumed as a new Tune run told
    nothing: its run said it was warm-started, its sampler had not been. It is told the same outcomes again; a sweep
    whose Tune state holds its sampler, or that was not warm-started, is not."""
    from workflows.sweep import _warm_start_again

    earlier = record_sweep(client, "before", grid_trials())
    space = load_space(space_file(tmp_path))
    experiment_id = client.create_experiment("now")
    warmed = client.create_run(experiment_id, tags={record.TAG_KIND: record.KIND_SWEEP,
                                                    record.TAG_WARM_START: earlier}).info.run_id
    cold = client.create_run(experiment_id, tags={record.TAG_KIND: record.KIND_SWEEP}).info.run_id
    sweep_dir = tmp_path / "sweep"
    warm = _warm_start_again(client, space, client.get_run(warmed), str(sweep_dir), 30)
    assert warm is not None and warm.sweep_run_id == earlier
    assert sorted(map(repr, warm.outcomes)) == sorted(repr((s, m)) for s, m, _ in grid_trials())
    assert _warm_start_again(client, space, client.get_run(cold), str(sweep_dir), 30) is None
    sweep_dir.mkdir()
    (sweep_dir / "tuner.pkl").write_bytes(b"")  # Tune saved its state: its sampler was told them
    assert _warm_start_again(client, space, client.get_run(warmed), str(sweep_dir), 30) is None
