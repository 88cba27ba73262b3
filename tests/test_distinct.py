"""One trial per configuration: the sweep's searcher never runs a configuration twice (real OptunaSearch, real Tune)."""

from __future__ import annotations

import copy
import logging
import random
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from test_space import BASE_SPACE

from workflows.distinct import (DistinctConfigurations, EnqueueingOptunaSearch, configuration_key, nearest_untried,
                                snap)
from workflows.space import load_space
from workflows.tune_search import ladders, param_space, search_algorithm

DISCRETE = {"target_density": {"type": "choice", "values": [0.3, 0.5]},
            "temperature": {"type": "choice", "values": [2, 8]}}


def _space(tmp_path: Path, search: dict, **top) -> Path:
    """The tiny space of test_space.py with these searched keys, a random sampler and a fixed seed."""
    values = {**copy.deepcopy(BASE_SPACE), "search": search, "sampler": {"type": "random"}, "seed": 3, **top}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _one_configuration(tmp_path: Path, patience: int) -> tuple[DistinctConfigurations, OptunaSearch]:
    """A wrapper that is not told its space has a single configuration, ready to suggest."""
    space = load_space(_space(tmp_path, {"target_density": {"type": "choice", "values": [0.4]},
                                         "temperature": {"type": "choice", "values": [2]}}))
    inner = OptunaSearch(metric=["f1", "linear_density"], mode=["max", "min"],
                         sampler=optuna.samplers.RandomSampler(seed=0))
    alg = DistinctConfigurations(inner, size=None, patience=patience)
    alg.set_search_properties(None, None, param_space(space))
    return alg, inner


def _outcome(config: dict) -> dict:
    return {"f1": 100 * config["target_density"] + config["temperature"], "linear_density": config["target_density"]}


def _wrappers(alg) -> list:
    """The searcher and every searcher it wraps, but the innermost: the layers whose state Tune saves apart."""
    layers = []
    while hasattr(alg, "searcher"):
        layers.append(alg)
        alg = alg.searcher
    return layers


def _wrapper_states(alg) -> list[dict]:
    return [layer.get_state() for layer in _wrappers(alg)]


def _distinct(alg) -> DistinctConfigurations:
    return next(layer for layer in _wrappers(alg) if isinstance(layer, DistinctConfigurations))


def _study(alg) -> optuna.Study:
    while not isinstance(alg, OptunaSearch):
        alg = alg.searcher
    return alg._ot_study


def test_the_space_counts_its_configurations(tmp_path):
    assert load_space(_space(tmp_path, DISCRETE)).configurations == 4
    ladder = {**DISCRETE, "fill_steps": {"type": "randint", "low": 16, "high": 19},
              "alpha_distil": {"type": "quniform", "low": 0.5, "high": 0.9, "q": 0.1}}
    assert load_space(_space(tmp_path, ladder)).configurations == 4 * 4 * 5
    continuous = {**DISCRETE, "alpha_distil": {"type": "uniform", "low": 0.5, "high": 0.9}}
    assert load_space(_space(tmp_path, continuous)).configurations is None


def test_each_configuration_runs_once_and_repeats_are_told_its_result(tmp_path):
    """A random sampler over 4 configurations repeats itself at once; the sweep still gets 4 trials, all distinct,
    and every repeat the sampler asked for is in its study with the same values as the trial that ran."""
    space = load_space(_space(tmp_path, DISCRETE, num_samples=10))
    alg = search_algorithm(space)
    assert isinstance(alg, DistinctConfigurations) and alg.size == 4
    alg.set_search_properties(None, None, param_space(space))
    ran = []
    for i in range(10):
        config = alg.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        assert config is not None
        ran.append(config)
        alg.on_trial_complete(f"t{i}", _outcome(config))
    assert len(ran) == 4 and len({configuration_key(c) for c in ran}) == 4
    assert alg.suggest("t-late") == Searcher.FINISHED
    study = _study(alg)
    assert alg.repeats > 0 and len(study.trials) == 4 + alg.repeats
    for trial in study.trials:
        assert trial.state == TrialState.COMPLETE
        assert trial.values == [_outcome(trial.params)["f1"], _outcome(trial.params)["linear_density"]]


def test_an_objective_reported_at_the_trial_s_end_only_is_read_from_its_end(tmp_path):
    """Speedup is reported once, by the packed model at a trial's end: the evaluations before it lack it, and the
    single-objective searcher, which read each one's objective, stopped the sweep at the first (a KeyError). It is
    told the results that hold its objective, and the end's value is the trial's."""
    space = load_space(_space(tmp_path, DISCRETE, objectives=[["speedup", "max"]],
                              reference_point={"speedup": 0.0}))
    alg = search_algorithm(space)
    alg.set_search_properties(None, None, param_space(space))
    config = alg.suggest("t0")
    alg.on_trial_result("t0", {"f1": 40.0, "linear_density": 0.5, "training_iteration": 1})
    alg.on_trial_complete("t0", {"f1": 42.0, "speedup": 2.5, "training_iteration": 2})
    (trial,) = _study(alg).trials
    assert trial.state == TrialState.COMPLETE and trial.values == [2.5] and trial.params == config


def test_a_trial_stopped_before_the_end_where_its_objectives_are_reported_is_pruned(tmp_path, caplog):
    """Under ASHA with F1 and speedup as objectives, a stopped trial's last result holds F1 but no speedup: Optuna,
    told it, refused the missing value with a warning and kept the trial running in its study, where the sampler
    never sees it. It is told as pruned; so is a later repeat of its configuration, which is not taken for a
    failure."""
    space = load_space(_space(tmp_path, {"target_density": {"type": "choice", "values": [0.4]},
                                         "temperature": {"type": "choice", "values": [2]}},
                              objectives=[["f1", "max"], ["speedup", "max"]], reference_point={"speedup": 0.0}))
    alg = search_algorithm(space)
    alg.set_search_properties(None, None, param_space(space))
    alg.suggest("t0")
    with caplog.at_level(logging.WARNING):
        alg.on_trial_complete("t0", {"f1": 30.0, "linear_density": 0.5, "training_iteration": 1})
        assert alg.suggest("t1") == Searcher.FINISHED  # its one configuration ran
    assert [trial.state for trial in _study(alg).trials] == [TrialState.PRUNED]
    assert not alg.failed("t0")
    assert not [r for r in caplog.records if "could not be cast" in r.getMessage()], caplog.text


def test_a_repeat_of_a_running_configuration_waits_for_its_result(tmp_path):
    """One configuration in a space the wrapper is not told is finite: while its trial runs, repeats wait for the
    trial's result (the searcher says 'nothing now', not 'finished'); once the trial ends they all get it, and
    the search ends when the sampler offers nothing new ``patience`` times in a row."""
    alg, inner = _one_configuration(tmp_path, patience=5)
    config = alg.suggest("only")
    assert config == {"target_density": 0.4, "temperature": 2}
    assert alg.suggest("second") is None and alg.repeats == 5
    assert alg.suggest("third") is None and alg.repeats == 5  # no new asks until a trial ends
    alg.on_trial_result("only", {"f1": 1.0, "linear_density": 0.4})
    alg.on_trial_complete("only", {"f1": 40.0, "linear_density": 0.4, "config": config})
    states = [(t.state, t.values) for t in inner._ot_study.trials]
    assert states == [(TrialState.COMPLETE, [40.0, 0.4])] * 6
    assert alg.suggest("fourth") == Searcher.FINISHED and alg.repeats == 10


def test_a_failed_configuration_is_not_run_again(tmp_path):
    alg, inner = _one_configuration(tmp_path, patience=3)
    assert alg.suggest("only") is not None
    alg.on_trial_complete("only", None, error=True)
    assert alg.suggest("again") == Searcher.FINISHED
    assert [t.state for t in inner._ot_study.trials] == [TrialState.FAIL] * 4


def test_a_restored_searcher_remembers_what_ran(tmp_path):
    """Saved as Tune saves a wrapped searcher (the wrapper's state beside the innermost searcher's file)."""
    space = load_space(_space(tmp_path, DISCRETE))
    alg = search_algorithm(space)
    alg.set_search_properties(None, None, param_space(space))
    first = [alg.suggest("a"), alg.suggest("b")]
    alg.on_trial_complete("a", _outcome(first[0]))
    state, saved = alg.get_state(), str(tmp_path / "searcher.pkl")
    alg.save(saved)

    restored = search_algorithm(space)
    restored.set_state(state)
    restored.restore(saved)
    assert isinstance(restored.searcher, OptunaSearch)
    restored.on_trial_complete("b", _outcome(first[1]))  # the trial that ran across the restart ends
    later = []
    while (config := restored.suggest(f"c{len(later)}")) != Searcher.FINISHED:
        later.append(config)
        restored.on_trial_complete(f"c{len(later) - 1}", _outcome(config))
    keys = [configuration_key(c) for c in first + later]
    assert len(keys) == len(set(keys)) == 4


@pytest.mark.parametrize("max_concurrent", [None, 2])
def test_a_failed_trial_run_again_on_resume_records_its_result(tmp_path, max_concurrent):
    """A resumed sweep runs an errored trial again under its id, without asking for a configuration; when it
    succeeds, the configuration has that result (not the failure) and the sampler's study holds it. Under a
    concurrency limit too, whose limiter did not let that run through."""
    space = load_space(_space(tmp_path, DISCRETE, max_concurrent=max_concurrent))
    alg = search_algorithm(space)
    alg.set_search_properties(None, None, param_space(space))
    config = alg.suggest("a")
    alg.on_trial_complete("a", None, error=True)
    states, saved = _wrapper_states(alg), str(tmp_path / "searcher.pkl")
    alg.save(saved)

    restored = search_algorithm(space)
    for wrapper, state in zip(_wrappers(restored), states, strict=True):  # as Tune restores a sweep
        wrapper.set_state(state)
    restored.restore(saved)
    distinct = _distinct(restored)
    key = configuration_key(config)
    assert distinct._results[key] is None
    restored.on_trial_result("a", _outcome(config))  # it runs again
    restored.on_trial_complete("a", {**_outcome(config), "config": config})
    assert distinct._results[key] == _outcome(config)
    complete = [t for t in _study(restored).trials if t.state == TrialState.COMPLETE]
    assert [(t.params, t.values) for t in complete] == [
        (config, [_outcome(config)["f1"], _outcome(config)["linear_density"]])]
    # The rest of the space runs once each, and a repeat of the re-run configuration is told its result.
    later = []
    while (suggested := restored.suggest(f"c{len(later)}")) != Searcher.FINISHED:
        later.append(suggested)
        restored.on_trial_complete(f"c{len(later) - 1}", _outcome(suggested))
    keys = [configuration_key(c) for c in [config] + later]
    assert len(keys) == len(set(keys)) == 4
    assert all(t.state == TrialState.COMPLETE for t in _study(restored).trials if t.params == config
               and t.number > complete[0].number)


def test_a_tune_run_over_a_small_discrete_space_runs_each_configuration_once(tmp_path):
    """Real Tune on a local Ray: 10 samples asked of a 4-configuration space give 4 trials, one per configuration.
    A trial that ends hands its worker process to the next one (no new process, no second import of torch)."""
    import ray
    from ray import tune

    from workflows.tune_search import tune_config_kwargs

    space = load_space(_space(tmp_path, DISCRETE, num_samples=10, max_concurrent=2))

    def trainable(config):  # self-contained: the workers cannot import this test module
        import os

        tune.report({"f1": 100 * config["target_density"] + config["temperature"],
                     "linear_density": config["target_density"], "pid": os.getpid()})

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        kwargs = tune_config_kwargs(space, ["f1", "linear_density"])
        tuner = tune.Tuner(trainable, param_space=param_space(space), tune_config=tune.TuneConfig(**kwargs),
                           run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="distinct",
                                                     verbose=0))
        results = tuner.fit()
    finally:
        ray.shutdown()
    configs = [r.config for r in results]
    assert not results.errors and len(configs) == 4
    assert len({r.metrics["pid"] for r in results}) < len(configs)  # at most 2 run at once; the others reuse them
    assert {configuration_key(c) for c in configs} == {
        configuration_key({"target_density": d, "temperature": t}) for d in (0.3, 0.5) for t in (2, 8)}


LADDERS = {"a": [1, 2, 3, 4], "b": ["x", "y"]}


def _keys(*configs: tuple) -> set[str]:
    return {configuration_key({"a": a, "b": b}) for a, b in configs}


def test_the_nearest_untried_configuration_counts_steps_along_the_ladders():
    """Numbers count one per step of their sorted values, other values one when they differ; ties go to the rng."""
    rng = random.Random(0)
    here = {"a": 2, "b": "x"}
    found = {configuration_key(nearest_untried(here, LADDERS, _keys((2, "x")), rng)) for _ in range(30)}
    assert found == _keys((1, "x"), (3, "x"), (2, "y"))  # distance 1, each chosen in turn
    tried = _keys((2, "x"), (1, "x"), (3, "x"), (2, "y"))
    assert nearest_untried(here, LADDERS, tried | _keys((1, "y"), (3, "y")), rng) == {"a": 4, "b": "x"}
    found = {configuration_key(nearest_untried(here, LADDERS, tried, rng)) for _ in range(30)}
    assert found == _keys((4, "x"), (1, "y"), (3, "y"))  # distance 2
    assert nearest_untried({"a": 2.4, "b": "x"}, LADDERS, _keys((2, "x")), rng)["a"] in (1, 2, 3)  # 2.4 sits at 2
    every = _keys(*[(a, b) for a in LADDERS["a"] for b in LADDERS["b"]])
    assert nearest_untried(here, LADDERS, every, rng) is None
    assert nearest_untried(here, LADDERS, set(), rng, limit=7) is None  # 8 configurations: too many to enumerate


def test_a_sampler_rounding_a_value_differently_still_names_the_same_configuration():
    values = {"alpha_distil": [0.5, 0.6, 0.7], "block": [[32, 32], [32, 384]]}
    assert snap({"alpha_distil": 0.7000000000000001, "block": [32, 384]}, values) == {"alpha_distil": 0.7,
                                                                                       "block": [32, 384]}


def test_the_space_lists_each_finite_keys_values(tmp_path):
    search = {"target_density": {"type": "choice", "values": [0.5, 0.3, 0.1]},
              "topk_scope": {"type": "choice", "values": ["per_matrix", "global"]},
              "fill_steps": {"type": "randint", "low": 16, "high": 18},
              "alpha_distil": {"type": "quniform", "low": 0.5, "high": 0.9, "q": 0.1}}
    assert ladders(load_space(_space(tmp_path, search))) == {
        "target_density": (0.1, 0.3, 0.5), "topk_scope": ("per_matrix", "global"),
        "fill_steps": (16, 17, 18), "alpha_distil": (0.5, 0.6, 0.7, 0.8, 0.9)}
    continuous = {**search, "temperature": {"type": "uniform", "low": 1, "high": 8}}
    assert ladders(load_space(_space(tmp_path, continuous))) is None


def test_a_space_too_large_to_steer_in_lists_no_values(tmp_path):
    """A wide randint: the space still counts its configurations (the search ends when they run out), but its values
    are never listed and repeats are not steered."""
    space = load_space(_space(tmp_path, {**DISCRETE, "fill_steps": {"type": "randint", "low": 1,
                                                                              "high": 10**9}}))
    assert space.configurations == 4 * 10**9 and ladders(space) is None
    alg = search_algorithm(space)
    assert alg.size == space.configurations and alg.ladders is None


def test_a_sampler_sure_of_one_configuration_is_steered_outwards_from_it(tmp_path):
    """A sampler that only ever proposes the centre of a 3 x 3 space: the centre runs, then the untried configuration
    nearest to it each time, four at one step and then the four corners, until the space is used up; each ran once
    and the sampler's study holds every result."""
    space = load_space(_space(tmp_path, {"target_density": {"type": "choice", "values": [0.3, 0.5, 0.7]},
                                         "temperature": {"type": "choice", "values": [2, 4, 8]}}))
    centre = {"target_density": 0.5, "temperature": 4}

    class Sure(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, distribution):
            return centre[name]

    sampler = Sure(seed=0)
    inner = EnqueueingOptunaSearch(metric=["f1", "linear_density"], mode=["max", "min"], sampler=sampler)
    alg = DistinctConfigurations(inner, ladders=ladders(space), seed=1)
    assert alg.size == 9
    alg.set_search_properties(None, None, param_space(space))
    ran = []
    while (config := alg.suggest(f"t{len(ran)}")) != Searcher.FINISHED:
        assert config is not None
        ran.append(config)
        alg.on_trial_complete(f"t{len(ran) - 1}", _outcome(config))
    steps = [abs([0.3, 0.5, 0.7].index(c["target_density"]) - 1) + abs([2, 4, 8].index(c["temperature"]) - 1)
             for c in ran]
    assert steps == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert len({configuration_key(c) for c in ran}) == 9 and alg.steered == 8 and alg.repeats == 8
    completed = [t for t in inner._ot_study.trials if t.state == TrialState.COMPLETE]
    assert len(completed) == 9 + 8  # each configuration, and each repeat told the centre's result
    assert all(t.values == [_outcome(t.params)["f1"], _outcome(t.params)["linear_density"]] for t in completed)


def test_a_sweep_over_a_finite_space_is_steered(tmp_path):
    space = load_space(_space(tmp_path, DISCRETE))
    alg = search_algorithm(space)
    assert isinstance(alg.searcher, EnqueueingOptunaSearch) and alg.ladders == {
        "target_density": [0.3, 0.5], "temperature": [2, 8]}
    continuous = load_space(_space(tmp_path, {**DISCRETE, "alpha_distil": {"type": "uniform", "low": 0.5,
                                                                             "high": 0.9}}))
    assert search_algorithm(continuous).ladders is None


@pytest.mark.parametrize("size,patience", [(0, 5), (None, 0)])
def test_bad_settings_are_refused(size, patience):
    with pytest.raises(ValueError):
        DistinctConfigurations(OptunaSearch(), size=size, patience=patience)
