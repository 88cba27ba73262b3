"""One trial per configuration: the sweep's searcher never runs a configuration twice (real OptunaSearch, real Tune)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from test_space import BASE_SPACE

from workflows.distinct import DistinctConfigurations, configuration_key
from workflows.space import load_space, param_space, search_algorithm

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


def _study(alg) -> optuna.Study:
    while not isinstance(alg, OptunaSearch):
        alg = alg.searcher
    return alg._ot_study


def test_the_space_counts_its_configurations(tmp_path):
    assert load_space(_space(tmp_path, DISCRETE)).configurations == 4
    ladder = {**DISCRETE, "calibration_samples": {"type": "randint", "low": 16, "high": 19},
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


def test_a_tune_run_over_a_small_discrete_space_runs_each_configuration_once(tmp_path):
    """Real Tune on a local Ray: 10 samples asked of a 4-configuration space give 4 trials, one per configuration."""
    import ray
    from ray import tune

    from workflows.space import tune_config_kwargs

    space = load_space(_space(tmp_path, DISCRETE, num_samples=10, max_concurrent=2))

    def trainable(config):  # self-contained: the workers cannot import this test module
        tune.report({"f1": 100 * config["target_density"] + config["temperature"],
                     "linear_density": config["target_density"]})

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
    assert {configuration_key(c) for c in configs} == {
        configuration_key({"target_density": d, "temperature": t}) for d in (0.3, 0.5) for t in (2, 8)}


@pytest.mark.parametrize("size,patience", [(0, 5), (None, 0)])
def test_bad_settings_are_refused(size, patience):
    with pytest.raises(ValueError):
        DistinctConfigurations(OptunaSearch(), size=size, patience=patience)
