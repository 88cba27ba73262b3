"""Search-space files: loading, validation errors that name the key, Ray objects, trial and teacher configs."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import renumber_tokens
from pruning.config import Method, RunConfig, method_block
from workflows.fingerprint import teacher_fingerprint
from workflows.space import (
    LAMBDA_KEY,
    SpaceError,
    baseline_config,
    load_space,
    teacher_config,
    trial_config,
)
from workflows.tune_search import param_space, scheduler, search_algorithm, tune_config_kwargs

SPACES_DIR = Path(__file__).resolve().parents[1] / "tune_spaces"
SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))

# A small valid space; tests change one thing at a time.
BASE_SPACE = {
    "base": {"model_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                              "intermediate_size": 64, "max_position_embeddings": 128},
             "train_data": "dev", "train_limit": 8, "eval_data": "dev", "eval_limit": 4, "max_seq_length": 64,
             "doc_stride": 32, "max_steps": 10, "eval_every": 5, "method": "topk", "attention_block": [16, 16],
             "device": "cpu"},
    "teacher": {"config": {"max_steps": 4}},
    "search": {"target_density": {"type": "uniform", "low": 0.2, "high": 0.8},
               "alpha_distil": {"type": "uniform", "low": 0.5, "high": 0.9},
               "temperature": {"type": "choice", "values": [1, 2, 4]}},
}


def write(tmp_path: Path, values, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(values if isinstance(values, str) else yaml.safe_dump(values, sort_keys=False))
    return path


def variant(**changes) -> dict:
    """BASE_SPACE with top-level keys replaced (None removes a key)."""
    values = copy.deepcopy(BASE_SPACE)
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    return values


def assert_refused(path: Path, pattern: str) -> None:
    """Loading the space file ``path`` fails in one line that starts with the path and matches ``pattern``."""
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(pattern, message), message


def with_search(**params) -> dict:
    return variant(search=params)


def test_the_shipped_spaces_are_there():
    names = {p.name for p in SHIPPED}
    assert {"smoke.yaml", "minilm_squad_cpu.yaml", "minilm_squad_topk.yaml", "minilm_squad_gpu.yaml", "bert_base_squad.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_space_loads_and_builds_its_configs(path, tmp_path):
    space = load_space(path)
    assert space.name == path.stem
    assert space.search
    assert set(param_space(space)) == set(space.search)
    teacher = teacher_config(space, tmp_path / "teacher")
    assert teacher.method is Method.DENSE and teacher.teacher is None and teacher.fill_steps == 0
    # The lower and upper ends of every range give a valid trial config.
    for pick in (0, -1):
        params = {key: spec.extremes()[pick][1] for key, spec in space.search.items()}
        cfg = trial_config(space, params, tmp_path / "trial", teacher=str(tmp_path / "teacher" / "final"))
        assert cfg.masked
        assert cfg.output_dir == str(tmp_path / "trial")


def test_smoke_space_is_tiny_and_lets_asha_act():
    space = load_space(SPACES_DIR / "smoke.yaml")
    cfg = space.base_config
    assert cfg.model_config["num_hidden_layers"] <= 2 and cfg.max_steps <= 10
    assert cfg.eval_every is not None and cfg.max_steps // cfg.eval_every >= 2
    hidden = cfg.model_config["hidden_size"]
    assert all(hidden % b == 0 for b in cfg.attention_block)
    assert space.scheduler is not None and space.algorithm == "optuna"


def test_cpu_main_space_fits_two_cores():
    space = load_space(SPACES_DIR / "minilm_squad_cpu.yaml")
    cfg = space.base_config
    assert cfg.device == "cpu" and space.resources["gpu"] == 0
    assert space.resources["cpu"] * (space.max_concurrent or 1) <= 2
    assert cfg.method is Method.FISHER and cfg.train_limit and cfg.eval_limit and cfg.fill_steps > 0
    assert cfg.attention_block == "head"  # one head of the model: 32 x 384 for MiniLM (hidden 384, 12 heads)
    # The recovery trains the packed model, which is what fits it in the time limit on CPUs without bf16, and
    # nothing searched turns on what the teacher cache excludes.
    assert cfg.fill_packed and cfg.teacher_cache and cfg.alpha_hidden == 0 and "alpha_hidden" not in space.search
    assert space.registry.policy == "best_f1_under_density" and space.registry.max_density == 0.4
    # Some trial can meet the registry's density cap.
    assert space.search["target_density"].low < space.registry.max_density


def test_cpu_topk_space_fits_two_cores():
    space = load_space(SPACES_DIR / "minilm_squad_topk.yaml")
    cfg = space.base_config
    assert cfg.method is Method.TOPK and cfg.max_steps and space.name == "minilm_squad_topk"
    assert space.resources["cpu"] * (space.max_concurrent or 1) <= 2


def test_bert_base_space_names_local_models_that_need_not_exist():
    space = load_space(SPACES_DIR / "bert_base_squad.yaml")
    assert space.teacher.path == "models/bert-base-uncased-squad"
    assert space.base["model"] == "models/bert-base-uncased"
    assert space.base_config.method is Method.SIGMOID_THRESHOLD and space.base_config.attention_block == (32, 32)
    assert space.registry.max_density == 0.36
    assert teacher_config(space, "out").model == "models/bert-base-uncased-squad"


def test_defaults(tmp_path):
    space = load_space(write(tmp_path, variant(), "my-sweep.yaml"))
    assert space.name == "my-sweep"
    assert space.algorithm == "optuna"
    assert space.objectives == [("f1", "max"), ("linear_density", "min")]
    assert space.scheduler is None and space.max_concurrent is None and space.max_failures == 0
    assert space.resources == {"cpu": 1.0, "gpu": 0.0}
    assert space.speedup == {"batch_size": 1, "seq_len": 128, "repeats": 10}
    assert space.registry.name == "my-sweep" and space.registry.policy == "best_f1_under_density"
    assert space.registry.max_density == RunConfig().target_density and space.registry.onnx is True
    assert load_space(write(tmp_path, variant(registry={"onnx": False}), "torch.yaml")).registry.onnx is False
    # A new version serves int8 when it loses at most 1 F1 against fp32; null serves int8 unchecked.
    assert space.registry.max_int8_f1_drop == 1.0
    for given in (0, 2.5, None):
        written = write(tmp_path, variant(registry={"max_int8_f1_drop": given}), "drop.yaml")
        assert load_space(written).registry.max_int8_f1_drop == given
    assert space.teacher.path is None and not space.teacher.student_init


@pytest.mark.parametrize("method", ["sigmoid_threshold", "fisher-flops", "fisher-flops-searched"])
def test_a_density_cap_with_no_density_target_to_default_to_must_be_given(tmp_path, method):
    """best_f1_under_density's max_density defaults to base.target_density: where the trials have none (their
    density follows the lambdas, or a FLOP target), RunConfig's default of 0.5 capped the champion unseen, and a
    sigmoid_threshold space may not even give base.target_density."""
    base = {k: v for k, v in BASE_SPACE["base"].items() if k not in ("method", "attention_block", "max_steps")}
    if method == "sigmoid_threshold":
        base.update(method="sigmoid_threshold", attention_block=[16, 16], max_steps=10)
        search = {"lambda": {"type": "loguniform", "low": 0.01, "high": 1.0}}
    else:
        base.update(method="fisher", attention_block="head", fill_steps=4)
        if method == "fisher-flops":
            base["target_flops"] = 0.5
        search = {"target_flops" if method == "fisher-flops-searched" else "mask_tuning_samples":
                  {"type": "choice", "values": [0.4, 0.6] if method == "fisher-flops-searched" else [64, 128]}}
    values = variant(base=base, search=search)
    assert_refused(write(tmp_path, values), r"registry\.max_density: not given, and there is no base\.target_density "
                                            r"to default to \(.*\); give the largest linear density")
    values["registry"] = {"max_density": 0.4}
    assert load_space(write(tmp_path, values, "capped.yaml")).registry.max_density == 0.4


@pytest.mark.parametrize("key, base, says", [
    ("calibration_samples", {}, "has no effect with mask_init 0 (only mask_init fisher reads it)"),
    ("calibration_samples", {"mask_init": "magnitude"},
     "has no effect with mask_init magnitude (only mask_init fisher reads it)"),
    ("mask_init_scale", {"mask_init": "constant"},
     "has no effect with mask_init constant (only mask_init fisher or magnitude reads it)"),
    ("temperature", {"alpha_distil": 0.0, "alpha_ce": 1.0}, "has no effect with alpha_distil 0 (no distillation)"),
])
def test_a_searched_key_the_bases_other_settings_leave_unread_is_refused(tmp_path, key, base, says):
    """A key the method reads, but not beside the base's other settings: topk's scores start from a constant, so
    no importance is estimated over calibration_samples windows nor spread by mask_init_scale; without
    distillation the temperature is read by nothing. Trials differing in it alone ran the same run again."""
    values = {"calibration_samples": {"type": "choice", "values": [64, 128]},
              "mask_init_scale": {"type": "choice", "values": [0.5, 2.0]},
              "temperature": {"type": "choice", "values": [1, 4]}}
    space = variant(search={"target_density": BASE_SPACE["search"]["target_density"], key: values[key]})
    space["base"].update(base)
    assert_refused(write(tmp_path, space), f"search\\.{key}: {re.escape(says)}$")
    # Read where the base (or the search) turns it on.
    space["base"].update({"calibration_samples": {"mask_init": "fisher"}, "mask_init_scale": {"mask_init": "magnitude"},
                          "temperature": {"alpha_distil": 0.5, "alpha_ce": 0.5}}[key])
    load_space(write(tmp_path, space, "read.yaml"))


def test_a_file_name_that_cannot_name_the_sweep_asks_for_a_name_key(tmp_path):
    with pytest.raises(SpaceError, match=r"my space\.yaml: name: not given, and the file's name 'my space' cannot"):
        load_space(write(tmp_path, variant(), "my space.yaml"))
    assert load_space(write(tmp_path, variant(name="my-sweep"), "my space.yaml")).name == "my-sweep"
    with pytest.raises(SpaceError, match=r"name: 'my sweep': use letters"):  # a given name is checked as before
        load_space(write(tmp_path, variant(name="my sweep"), "space.yaml"))


def test_latency_policy_and_reference_point(tmp_path):
    space = load_space(write(tmp_path, variant(registry={"policy": "best_f1_under_latency", "max_latency_ms": 12.5},
                                               reference_point={"f1": 20})))
    assert space.registry.policy == "best_f1_under_latency" and space.registry.max_latency_ms == 12.5
    assert space.registry.max_density is None and space.reference_point == {"f1": 20.0}
    assert load_space(write(tmp_path, variant(), "plain.yaml")).reference_point == {}


def test_scientific_notation_is_a_number(tmp_path):
    text = yaml.safe_dump(variant()) + "seed: 3\n"
    text = text.replace("search:\n", "search:\n  learning_rate: {type: loguniform, low: 3e-5, high: 3e-4}\n")
    space = load_space(write(tmp_path, text))
    assert space.search["learning_rate"].low == pytest.approx(3e-5)


def test_trial_config_overlays_the_sampled_values(tmp_path):
    space = load_space(write(tmp_path, variant()))
    cfg = trial_config(space, {"target_density": 0.3, "alpha_distil": 0.75, "temperature": 4}, "out/t1", "teach")
    assert (cfg.target_density, cfg.alpha_distil, cfg.temperature) == (0.3, 0.75, 4)
    assert cfg.alpha_ce == pytest.approx(0.25)  # the complement of alpha_distil
    assert cfg.teacher == "teach" and cfg.output_dir == "out/t1"
    assert cfg.max_steps == 10 and cfg.attention_block == (16, 16)  # from base
    # A key not sampled keeps its base value.
    assert trial_config(space, {"target_density": 0.4}, "o", None).temperature == RunConfig().temperature


def test_alpha_ce_is_kept_when_it_is_searched_too(tmp_path):
    space = load_space(write(tmp_path, with_search(
        target_density={"type": "uniform", "low": 0.2, "high": 0.8},
        alpha_distil={"type": "choice", "values": [0.5, 0.9]},
        alpha_ce={"type": "choice", "values": [0.0, 1.0]})))
    cfg = trial_config(space, {"target_density": 0.5, "alpha_distil": 0.9, "alpha_ce": 1.0}, "o", "t")
    assert (cfg.alpha_ce, cfg.alpha_distil) == (1.0, 0.9)


def test_lambda_pseudo_key_sets_both_weights(tmp_path):
    values = variant(search={LAMBDA_KEY: {"type": "loguniform", "low": 2.5, "high": 40.0}})
    values["base"]["method"] = "sigmoid_threshold"
    values["registry"] = {"max_density": 0.5}
    space = load_space(write(tmp_path, values))
    cfg = trial_config(space, {LAMBDA_KEY: 7.5}, "o", "t")
    assert cfg.lambda_attention == cfg.lambda_ffn == 7.5


def test_student_init_starts_the_trial_from_the_teacher(tmp_path):
    values = variant()
    values["teacher"]["student_init"] = True
    space = load_space(write(tmp_path, values))
    cfg = trial_config(space, {"target_density": 0.5}, "o", "runs/teacher/final")
    assert cfg.model == "runs/teacher/final" and cfg.model_config is None and cfg.teacher == "runs/teacher/final"
    with pytest.raises(SpaceError, match="student_init"):
        trial_config(space, {"target_density": 0.5}, "o", None)


def test_trial_config_rejects_a_parameter_the_space_does_not_search(tmp_path):
    space = load_space(write(tmp_path, variant()))
    with pytest.raises(SpaceError, match="'mask_lr' is not searched"):
        trial_config(space, {"target_density": 0.5, "mask_lr": 0.1}, "o", None)


def test_teacher_config_overrides_and_forces_dense(tmp_path):
    space = load_space(write(tmp_path, variant()))
    cfg = teacher_config(space, tmp_path / "teacher")
    assert cfg.method is Method.DENSE and cfg.max_steps == 4 and cfg.teacher is None
    assert cfg.eval_every is None  # the teacher evaluates once, at its end
    assert cfg.output_dir == str(tmp_path / "teacher")


def test_a_packed_cached_recovery_in_base_leaves_the_teacher_a_plain_dense_run(tmp_path):
    base = {**BASE_SPACE["base"], "method": "fisher", "attention_block": [16, 32], "fill_steps": 2,
            "fill_packed": True, "teacher_cache": True, "alpha_hidden": 1.0}
    space = load_space(write(tmp_path, variant(base=base, search={
        "target_density": {"type": "uniform", "low": 0.2, "high": 0.8}})))
    cfg = teacher_config(space, tmp_path / "teacher")
    assert cfg.method is Method.DENSE and not cfg.fill_packed and not cfg.teacher_cache
    assert cfg.alpha_hidden == 0.0  # no teacher of its own to distil hidden states from
    for key in ("fill_packed", "teacher_cache"):  # neither applies to the dense teacher
        bad = variant(base=base, teacher={"config": {"max_steps": 4, key: True}})
        with pytest.raises(SpaceError, match=f"{key}: does not apply to the dense teacher"):
            load_space(write(tmp_path, bad, name=f"{key}.yaml"))


def test_param_space_types(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    values = variant(algorithm="random", search={
        "target_density": {"type": "quniform", "low": 0.2, "high": 0.8, "q": 0.1},
        "learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        "fill_steps": {"type": "randint", "low": 0, "high": 4},
        "temperature": {"type": "choice", "values": [1, 2]},
        "seed": {"type": "grid", "values": [1, 2, 3]},
    })
    space = load_space(write(tmp_path, values))
    ps = param_space(space)
    assert isinstance(ps["target_density"], Float) and isinstance(ps["learning_rate"], Float)
    assert isinstance(ps["fill_steps"], Integer) and (ps["fill_steps"].lower, ps["fill_steps"].upper) == (0, 5)
    assert isinstance(ps["temperature"], Categorical)
    assert ps["seed"] == {"grid_search": [1, 2, 3]}


def test_grid_algorithm_enumerates_choices(tmp_path):
    space = load_space(write(tmp_path, variant(algorithm="grid", search={
        "target_density": {"type": "grid", "values": [0.3, 0.6]},
        "temperature": {"type": "choice", "values": [1, 2]}})))
    assert space.num_samples == 1
    assert param_space(space) == {"target_density": {"grid_search": [0.3, 0.6]},
                                  "temperature": {"grid_search": [1, 2]}}


def test_search_algorithm_and_scheduler(tmp_path):
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from workflows.distinct import DistinctConfigurations

    values = variant(max_concurrent=2, scheduler={"type": "asha", "metric": "f1", "grace_period": 1, "max_t": 2})
    space = load_space(write(tmp_path, values))
    alg = search_algorithm(space, ["f1", "linear_density", "speedup"])
    assert isinstance(alg, ConcurrencyLimiter) and isinstance(alg.searcher, DistinctConfigurations)
    assert isinstance(alg.searcher.searcher, OptunaSearch) and alg.searcher.size is None  # a continuous key
    assert alg.searcher.metric == ["f1", "linear_density"] and alg.searcher.mode == ["max", "min"]
    sched = scheduler(space)
    assert isinstance(sched, ASHAScheduler) and sched.metric == "f1"
    # Its time unit is the trainer's evaluation report (training_iteration): a result that lacks it is not ranked,
    # and at the first rung (grace_period 1) the worse of two trials stops.
    strong, weak = (Trial("trial_main", config={}, trial_id=name, stub=True) for name in ("strong", "weak"))
    for trial in (strong, weak):
        sched.on_trial_add(None, trial)
    assert sched.on_trial_result(None, weak, {"step": 1, "f1": 1.0}) == ASHAScheduler.CONTINUE
    assert sched.on_trial_result(None, strong, {"training_iteration": 1, "f1": 80.0}) == ASHAScheduler.CONTINUE
    assert sched.on_trial_result(None, weak, {"training_iteration": 1, "f1": 10.0}) == ASHAScheduler.STOP
    kwargs = tune_config_kwargs(space)
    assert kwargs["metric"] is None and kwargs["mode"] is None and kwargs["num_samples"] == space.num_samples

    random_space = space.model_copy(update={"algorithm": "random"})
    assert isinstance(search_algorithm(random_space), BasicVariantGenerator)
    assert scheduler(space.model_copy(update={"scheduler": None})) is None


def test_optuna_suggestions_stay_inside_the_space(tmp_path):
    space = load_space(write(tmp_path, variant()))
    alg = search_algorithm(space)
    alg.set_search_properties(None, None, param_space(space))
    for i in range(5):
        params = alg.suggest(f"trial{i}")
        assert 0.2 <= params["target_density"] <= 0.8 and params["temperature"] in (1, 2, 4)
        cfg = trial_config(space, params, "o", "t")
        assert cfg.alpha_ce == pytest.approx(1 - params["alpha_distil"])
        alg.on_trial_complete(f"trial{i}", {"f1": 10.0 * i, "linear_density": params["target_density"]})


@pytest.mark.parametrize("spec,kind,startup", [
    (None, "TPESampler", 10),
    ({"type": "tpe", "startup_trials": 3}, "TPESampler", 3),
    ({"type": "tpe", "multivariate": True, "startup_trials": 4}, "TPESampler", 4),
    ({"type": "gp", "startup_trials": 2}, "GPSampler", 2),
    ({"type": "nsga2", "population_size": 4}, "NSGAIISampler", None),
    ({"type": "random"}, "RandomSampler", None),
])
def test_the_optuna_sampler_is_the_one_the_space_names(tmp_path, spec, kind, startup):
    space = load_space(write(tmp_path, variant(sampler=spec, seed=7)))
    sampler = search_algorithm(space).searcher._sampler  # no max_concurrent: the OptunaSearch in its wrapper
    assert type(sampler).__name__ == kind
    if startup is not None:
        assert sampler._n_startup_trials == startup
    if spec and spec["type"] == "nsga2":
        assert sampler._population_size == 4
    if kind == "TPESampler":
        assert bool(sampler._multivariate) == bool(spec and spec.get("multivariate"))
    # Seeded by the space: two searchers of one space suggest the same first trial, inside the space; the model
    # samplers keep suggesting valid trials once their startup trials are told.
    first = []
    for _ in range(2):
        alg = search_algorithm(space)
        alg.set_search_properties(None, None, param_space(space))
        first.append(alg.suggest("trial0"))
    assert first[0] == first[1]
    alg.on_trial_complete("trial0", {"f1": 10.0, "linear_density": first[0]["target_density"]})
    for i in range(1, 5):
        params = alg.suggest(f"trial{i}")
        assert 0.2 <= params["target_density"] <= 0.8 and params["temperature"] in (1, 2, 4)
        alg.on_trial_complete(f"trial{i}", {"f1": 60.0 * params["target_density"] + i,
                                            "linear_density": params["target_density"]})


def test_objective_must_be_reported(tmp_path):
    space = load_space(write(tmp_path, variant(objectives=[["f1", "max"], ["speedup", "max"]])))
    with pytest.raises(SpaceError, match=r"objectives\[1\]: 'speedup' is not a metric the trials report"):
        search_algorithm(space, ["f1", "linear_density"])


def test_teacher_fingerprint_is_stable_and_follows_model_and_data(tmp_path):
    first = teacher_fingerprint(load_space(write(tmp_path, variant(), "a.yaml")))
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert teacher_fingerprint(load_space(write(tmp_path, variant(), "b.yaml"))) == first

    def changed(section: str, key: str, value) -> str:
        values = variant()
        values[section][key] = value
        return teacher_fingerprint(load_space(write(tmp_path, values, f"{section}-{key}.yaml")))

    # What changes the teacher changes the fingerprint ...
    assert changed("base", "train_limit", 9) != first
    assert changed("base", "train_data", "train") != first
    assert changed("base", "model_config", {**BASE_SPACE["base"]["model_config"], "hidden_size": 64}) != first
    assert changed("teacher", "config", {"max_steps": 5}) != first
    # ... what only the pruned trials use does not.
    assert changed("base", "target_density", 0.3) == first
    assert changed("base", "attention_block", [32, 32]) == first
    assert changed("base", "eval_every", 2) == first
    # The question cut changes the teacher's windows; the default is the same teacher.
    assert changed("base", "max_query_length", 64) == first
    assert changed("base", "max_query_length", 32) != first

    model_values = variant()
    model_values["base"].pop("model_config")
    shipped = teacher_fingerprint(load_space(write(tmp_path, model_values, "m1.yaml")))
    model_values["base"]["model"] = "models/other"
    assert teacher_fingerprint(load_space(write(tmp_path, model_values, "m2.yaml"))) != shipped


def test_teacher_fingerprint_follows_the_contents_of_the_data_and_model(tmp_path):
    """A data file edited in place, or a model directory replaced by another, keeps its path but is a new teacher."""
    data = tmp_path / "data.json"
    data.write_text('{"version": "1.1", "data": []}')
    values = variant()
    values["base"]["train_data"] = str(data)
    path = write(tmp_path, values)
    first = teacher_fingerprint(load_space(path))
    assert teacher_fingerprint(load_space(path)) == first  # unchanged file, unchanged teacher

    data.write_text('{"version": "1.1", "data": [ ]}')  # same path, new bytes
    edited = teacher_fingerprint(load_space(path))
    assert edited != first
    os.utime(data, ns=(1, 1))  # a new modification time alone is not a new teacher
    assert teacher_fingerprint(load_space(path)) == edited

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    values = variant()
    values["base"].pop("model_config")
    values["base"]["model"] = str(model)
    path = write(tmp_path, values, "model.yaml")
    first = teacher_fingerprint(load_space(path))
    (model / "model.safetensors").write_bytes(b"other weights")
    assert teacher_fingerprint(load_space(path)) != first


def test_a_given_teachers_fingerprint_follows_its_contents_and_evaluation(tmp_path):
    """The dense metrics of teacher.path are cached under this key: a replaced directory or other evaluation data
    must be scored again."""
    given = tmp_path / "teacher"
    given.mkdir()
    (given / "config.json").write_text('{"model_type": "bert"}')
    path = write(tmp_path, variant(teacher={"path": str(given)}))
    first = teacher_fingerprint(load_space(path))
    assert teacher_fingerprint(load_space(path)) == first
    (given / "config.json").write_text('{"model_type": "bert", "hidden_size": 64}')
    replaced = teacher_fingerprint(load_space(path))
    assert replaced != first

    values = variant(teacher={"path": str(given)})
    values["base"]["eval_limit"] = 8
    assert teacher_fingerprint(load_space(write(tmp_path, values, "limit.yaml"))) != replaced
    values["base"]["eval_limit"] = 4
    values["base"]["learning_rate"] = 1e-3  # training keys do not change how a given teacher scores
    assert teacher_fingerprint(load_space(write(tmp_path, values, "lr.yaml"))) == replaced


def test_the_dense_baseline_is_windowed_as_the_trials_are(tmp_path):
    """A trial cuts its windows to its own positions and the teacher's (the trainer's fit_to_model); the dense
    baseline is the teacher scored alone, so its windows are cut to the trials' model beforehand when that model
    takes fewer positions than the teacher, and a given teacher's cached score follows that model."""
    from transformers import BertConfig, BertForQuestionAnswering

    from pruning.checkpoint import load_model, save_model
    from pruning.config import evaluation_settings
    from pruning.resources import shipped_model_dir
    from pruning.tokenizer import load_tokenizer
    from pruning.trainer import build_model, fit_to_model

    given = save_model(BertForQuestionAnswering(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                           intermediate_size=64, max_position_embeddings=128)),
                       load_tokenizer(shipped_model_dir()), tmp_path / "teacher")
    values = variant(teacher={"path": str(given)}, speedup={"seq_len": 32})
    values["base"]["model_config"]["max_position_embeddings"] = 48  # the trials' model: windows of 64 do not fit
    space = load_space(write(tmp_path, values, "short.yaml"))
    trial = trial_config(space, {}, output_dir="-", teacher=str(given))
    teacher = load_model(given)
    trials = evaluation_settings(fit_to_model(trial, build_model(trial)[0], teacher))
    assert (trials["max_seq_length"], trials["doc_stride"]) == (48, 24)
    assert evaluation_settings(fit_to_model(baseline_config(space, "-"), teacher)) == trials

    short = teacher_fingerprint(space)
    values["base"]["model_config"]["max_position_embeddings"] = 128  # the trials take windows of 64 again
    assert teacher_fingerprint(load_space(write(tmp_path, values, "long.yaml"))) != short


# --- invalid spaces -------------------------------------------------------------------------------------------

BAD_SPACES = [
    ("unknown top-level key", variant(searhc={}), r"searhc: unknown key"),
    ("unknown searched key", with_search(target_densty={"type": "uniform", "low": 0.2, "high": 0.5}),
     r"search\.target_densty: not a RunConfig key"),
    ("structural searched key", with_search(output_dir={"type": "choice", "values": ["a", "b"]}),
     r"search\.output_dir: cannot be searched"),
    ("low >= high", with_search(target_density={"type": "uniform", "low": 0.6, "high": 0.6}),
     r"search\.target_density\.low: must be < high"),
    ("loguniform low <= 0", with_search(learning_rate={"type": "loguniform", "low": 0.0, "high": 1e-3}),
     r"search\.learning_rate\.low: must be > 0 for loguniform"),
    ("density out of range", with_search(target_density={"type": "uniform", "low": 0.5, "high": 1.5}),
     r"search\.target_density\.high: 1\.5 gives an invalid config \(target_density: must be in \(0, 1\]"),
    ("invalid choice value", with_search(temperature={"type": "choice", "values": [2, 0]}),
     r"search\.temperature\.values\[1\]: 0 gives an invalid config \(temperature"),
    ("empty choice", with_search(temperature={"type": "choice", "values": []}),
     r"search\.temperature\.values: must be a non-empty list"),
    ("unknown param type", with_search(temperature={"type": "normal", "low": 1, "high": 2}),
     r"search\.temperature\.type: unknown or missing type 'normal'"),
    ("unknown param key", with_search(temperature={"type": "uniform", "low": 1, "high": 2, "step": 1}),
     r"search\.temperature\.step: unknown key"),
    ("float range on an int key", with_search(fill_steps={"type": "uniform", "low": 0, "high": 10}),
     r"search\.fill_steps\.type: uniform gives floats but fill_steps is not a float key"),
    ("quniform bound off the step", with_search(
        target_density={"type": "quniform", "low": 0.25, "high": 0.75, "q": 0.1}),
     r"search\.target_density\.low: 0\.25 is not a multiple of q=0\.1"),
    ("randint past 64 bits", with_search(fill_steps={"type": "randint", "low": 0, "high": 10 ** 30}),
     r"search\.fill_steps\.high: 1000000000000000000000000000000 is out of the range of a 64-bit integer"),
    ("one number twice", with_search(temperature={"type": "choice", "values": [1, 2, 1.0]}),
     r"search\.temperature\.values: has duplicates"),
    ("unknown algorithm", variant(algorithm="hyperopt"), r"algorithm: unknown value 'hyperopt'"),
    ("grid algorithm with a uniform param", variant(algorithm="grid"),
     r"search\.target_density\.type: uniform cannot be enumerated by algorithm grid"),
    ("grid param with optuna", with_search(seed={"type": "grid", "values": [1, 2]}),
     r"search\.seed\.type: grid needs algorithm random or grid"),
    ("unknown sampler", variant(sampler={"type": "cmaes"}), r"sampler\.type: unknown value 'cmaes'"),
    ("sampler for algorithm random", variant(algorithm="random", sampler={"type": "gp"}),
     r"sampler: only algorithm optuna takes a sampler, not random"),
    ("startup trials of nsga2", variant(sampler={"type": "nsga2", "startup_trials": 4}),
     r"sampler\.startup_trials: only tpe and gp start with random trials, not nsga2"),
    ("population of tpe", variant(sampler={"population_size": 8}),
     r"sampler\.population_size: only nsga2 has a population, not tpe"),
    ("multivariate gp", variant(sampler={"type": "gp", "multivariate": True}),
     r"sampler\.multivariate: only tpe models the keys jointly, not gp"),
    ("no startup trials", variant(sampler={"type": "gp", "startup_trials": 0}),
     r"sampler\.startup_trials: must be an integer >= 1, got 0"),
    ("unknown policy", variant(registry={"policy": "best_speedup"}), r"registry\.policy: unknown value 'best_speedup'"),
    ("policy threshold it does not use", variant(registry={"policy": "best_f1_under_density", "max_f1_drop": 1}),
     r"registry\.max_f1_drop: is not used by policy best_f1_under_density"),
    ("policy threshold missing", variant(registry={"policy": "fastest_within_f1_drop"}),
     r"registry\.max_f1_drop: is required"),
    ("unknown registry key", variant(registry={"alias": "x"}), r"registry\.alias: unknown key"),
    ("registered name MLflow refuses", variant(registry={"name": "team/fineprune"}),
     r"registry\.name: 'team/fineprune': a registered model name cannot contain '/' or ':'"),
    ("registered name with a colon", variant(registry={"name": "fineprune:v2"}), r"registry\.name: 'fineprune:v2'"),
    ("registered name starting with ..", variant(registry={"name": "..fineprune"}),
     r"registry\.name: '\.\.fineprune': a registered model name cannot contain '/' or ':', nor start with '\.\.'"),
    ("registered name with a quote", variant(registry={"name": "bert's-squad"}),
     r"registry\.name: \"bert's-squad\": a registered model name cannot contain quotes or backslashes"),
    ("registered name with a backslash", variant(registry={"name": "bert\\squad"}),
     r"registry\.name: 'bert\\\\squad': a registered model name cannot contain quotes"),
    # models:/a?b#c@champion loaded model "a"; models:/a@b/1 looked for the registered model "a".
    ("registered name with a query and a fragment", variant(registry={"name": "a?b#c"}),
     r"registry\.name: 'a\?b#c': a registered model name cannot contain '#' or '\?' \(the models:/ URIs"),
    ("registered name with an alias separator", variant(registry={"name": "a@b"}),
     r"registry\.name: 'a@b': a registered model name cannot contain '@'"),
    ("sweep name with a space", variant(name="bert base"),
     r"name: 'bert base': use letters, digits, '_', '\.', '-' \(it names directories\)"),
    # Accepted, it failed once the teacher was trained: Tune's directory NAME-DATE-TIME-ID was too long a file name.
    ("sweep name too long for a directory", variant(name="a" * 201),
     r"name: 'aaaaaaaaaaaaaaaaaaaa'\.\.\. is 201 characters long: at most 200 \(it names directories\)"),
    ("latency policy without its budget", variant(registry={"policy": "best_f1_under_latency"}),
     r"registry\.max_latency_ms: is required by policy best_f1_under_latency"),
    ("latency budget not positive", variant(registry={"policy": "best_f1_under_latency", "max_latency_ms": 0}),
     r"registry\.max_latency_ms: must be > 0"),
    ("latency budget with another policy", variant(registry={"policy": "best_f1_under_density",
                                                             "max_latency_ms": 5}),
     r"registry\.max_latency_ms: is not used by policy best_f1_under_density"),
    ("onnx switch not a boolean", variant(registry={"onnx": "no"}), r"registry\.onnx: must be true or false, got 'no'"),
    ("int8 drop below zero", variant(registry={"max_int8_f1_drop": -0.5}),
     r"registry\.max_int8_f1_drop: must be >= 0 \(F1 points\), got -0\.5"),
    ("int8 drop not a number", variant(registry={"max_int8_f1_drop": "one"}), r"registry\.max_int8_f1_drop: must be a number"),
    ("int8 drop without the export", variant(registry={"onnx": False, "max_int8_f1_drop": 2}),
     r"registry\.max_int8_f1_drop: is not used with onnx: false"),
    ("reference of a metric that is no objective", variant(reference_point={"speedup": 1}),
     r"reference_point\.speedup: unknown key \(allowed: f1, linear_density\)"),
    ("objective without a default reference", variant(objectives=[["f1", "max"], ["loss", "min"]]),
     r"reference_point: no default reference for objective 'loss'"),
    ("reference not a number", variant(reference_point={"f1": "low"}), r"reference_point\.f1: must be a number"),
    # The copied smoke space builds a random model: a model added beside it was never read, the sweep said nothing.
    ("a model beside the random one", variant(base={**BASE_SPACE["base"], "model": "my/model"}),
     r"base\.model: 'my/model' is given with model_config, which builds a random model instead of loading it"),
    ("a teacher model beside the base's random one", variant(teacher={"config": {"max_steps": 4, "model": "my/bert"}}),
     r"teacher.*model: 'my/bert' is given with model_config.*\(model_config: null loads the model\)"),
    ("reference no trial can beat", variant(reference_point={"f1": 200}),
     r"reference_point\.f1: 200 is at or beyond the best f1 a trial can have \(100\): no trial would add"),
    ("density reference no trial can beat", variant(reference_point={"linear_density": 0}),
     r"reference_point\.linear_density: 0 is at or beyond the best linear_density"),
    ("unknown base key", variant(base={**BASE_SPACE["base"], "lr": 1e-4}), r"base\.lr: unknown RunConfig key"),
    ("invalid base value", variant(base={**BASE_SPACE["base"], "doc_stride": 100}), r"base\.doc_stride: must be"),
    ("base sets output_dir", variant(base={**BASE_SPACE["base"], "output_dir": "x"}),
     r"base\.output_dir: is set by the sweep"),
    ("dense base", variant(base={**BASE_SPACE["base"], "method": "dense"}), r"base\.method: a sweep prunes"),
    ("key the method ignores", with_search(lambda_ffn={"type": "uniform", "low": 1, "high": 2}),
     r"search\.lambda_ffn: has no effect with method topk"),
    ("base key the method ignores", variant(base={**BASE_SPACE["base"], "lambda_attention": 5.0}),
     r"base\.lambda_attention: has no effect with method topk \(read by sigmoid_threshold only\)$"),
    ("teacher config sets a mask key", variant(teacher={"config": {"target_density": 0.3}}),
     r"teacher\.config\.target_density: does not apply to the dense teacher"),
    ("teacher path and config", variant(teacher={"path": "m", "config": {"max_steps": 3}}),
     r"teacher\.config: is unused when teacher\.path is set"),
    ("unknown teacher key", variant(teacher={"model": "m"}), r"teacher\.model: unknown key"),
    ("invalid teacher config value", variant(teacher={"config": {"learning_rate": -1}}),
     r"teacher\.config\.learning_rate: must be a number > 0"),
    ("warm-ups longer than the run", with_search(final_warmup={"type": "choice", "values": [0.2, 12]}),
     r"search\.final_warmup\.values\[1\]: initial_warmup \+ final_warmup"),
    ("warm-up fractions over every step of a run in epochs",
     variant(base={**{k: v for k, v in BASE_SPACE["base"].items() if k != "max_steps"}, "epochs": 1.0,
                   "initial_warmup": 0.5, "final_warmup": 0.6}),
     r"base\.final_warmup: 0\.6 of the pruning steps after an initial_warmup of 0\.5: the two warm-ups take more "
     r"than every pruning step"),
    ("an initial warm-up over the whole run", variant(base={**BASE_SPACE["base"], "final_warmup": 0},
                                                      search={"initial_warmup": {"type": "choice", "values": [1, 10]}}),
     r"search\.initial_warmup\.values\[1\]: initial_warmup \(10 steps\) leaves none of the 10 pruning steps"),
    ("invalid corner", variant(base={**BASE_SPACE["base"], "max_seq_length": 128}, search={
        "max_seq_length": {"type": "choice", "values": [64, 128]},
        "doc_stride": {"type": "choice", "values": [32, 96]}}),
     r"search: the combination max_seq_length=64, doc_stride=96 gives an invalid config \(doc_stride"),
    ("bad objective mode", variant(objectives=[["f1", "up"]]), r"objectives\[0\]: mode must be max or min"),
    ("misspelt objective", variant(objectives=[["f11", "max"], ["linear_density", "min"]]),
     r"objectives\[0\]: 'f11' is not a metric the trials report; did you mean 'f1'\?"),
    ("objective optimised the wrong way", variant(objectives=[["f1", "max"], ["linear_density", "max"]]),
     r"objectives\[1\]: linear_density is better when smaller: max would seek the worst trials \(use min\)"),
    ("accuracy objective minimised", variant(objectives=[["f1", "min"], ["speedup", "max"]]),
     r"objectives\[0\]: f1 is better when larger"),
    ("timing steadiness as an objective", variant(objectives=[["f1", "max"], ["timing_spread", "min"]],
                                                  reference_point={"timing_spread": 10.0}),
     r"objectives\[1\]: timing_spread says how steadily a trial's speedup was timed, not how good its model is"),
    ("scheduler ranking the wrong way", variant(scheduler={"metric": "loss", "mode": "max"}),
     r"scheduler\.mode: loss is better when smaller"),
    ("misspelt top-level key", variant(num_sample=4), r"num_sample: unknown key; did you mean 'num_samples'\?"),
    ("misspelt searched key", with_search(target_densty={"type": "uniform", "low": 0.2, "high": 0.5}),
     r"search\.target_densty: not a RunConfig key; did you mean 'target_density'\?"),
    ("misspelt base key", variant(base={**BASE_SPACE["base"], "learning_rat": 1e-4}),
     r"base\.learning_rat: unknown RunConfig key; did you mean 'learning_rate'\?"),
    ("misspelt range key", with_search(target_density={"type": "uniform", "low": 0.2, "hgh": 0.5}),
     r"search\.target_density\.hgh: unknown key; did you mean 'high'\?"),
    ("misspelt param type", with_search(target_density={"type": "unifrom", "low": 0.2, "high": 0.5}),
     r"search\.target_density\.type: unknown or missing type 'unifrom'; did you mean 'uniform'\?"),
    ("misspelt policy", variant(registry={"policy": "best_f1_under_densty"}),
     r"registry\.policy: unknown value 'best_f1_under_densty'; did you mean 'best_f1_under_density'\?"),
    ("scheduler without eval_every", variant(base={**BASE_SPACE["base"], "eval_every": None}, scheduler={}),
     r"scheduler: ASHA acts on evaluation reports: set base\.eval_every"),
    ("scheduler metric not reported per evaluation", variant(scheduler={"metric": "speedup"}),
     r"scheduler\.metric: 'speedup' is not reported at each evaluation"),
    ("gpu device without a gpu", variant(base={**BASE_SPACE["base"], "device": "cuda"}),
     r"resources\.gpu: base\.device is cuda but trials get no GPU"),
    ("teacher on a gpu it does not get", variant(teacher={"config": {"device": "cuda"}}),
     r"resources\.gpu: teacher\.config\.device is cuda but the teacher, which takes a trial's resources, gets no GPU"),
    ("teacher on a gpu Ray does not show it", variant(resources={"cpu": 1, "gpu": 1}, base={**BASE_SPACE["base"],
                                                                                          "device": "cuda"},
                                                      teacher={"config": {"device": "cuda:1"}}),
     r"teacher\.config\.device: cuda:1: the teacher sees only the GPU Ray gives it, as cuda:0"),
    ("negative resources", variant(resources={"cpu": -1}), r"resources\.cpu: must be >= 0"),
    ("zero samples", variant(num_samples=0), r"num_samples: must be an integer >= 1"),
    ("lambda and lambda_ffn together", variant(
        base={**BASE_SPACE["base"], "method": "sigmoid_threshold"},
        search={"lambda": {"type": "uniform", "low": 1, "high": 2}, "lambda_ffn": {"type": "uniform", "low": 1,
                                                                                    "high": 2}}),
     r"search\.lambda: sets lambda_attention and lambda_ffn; do not also search lambda_ffn"),
    ("empty search", variant(search={}), r"search: expected a non-empty mapping"),
    ("non-mapping param", with_search(temperature=[1, 2]), r"search\.temperature: expected a mapping with a type"),
    ("optuna choice of lists", with_search(attention_block={"type": "choice", "values": [[16, 16], [32, 32]]}),
     r"search\.attention_block\.values\[0\]: Optuna choices must be numbers"),
]


@pytest.mark.parametrize("values,pattern", [(v, p) for _, v, p in BAD_SPACES], ids=[n for n, _, _ in BAD_SPACES])
def test_invalid_space_names_the_key(tmp_path, values, pattern):
    assert_refused(write(tmp_path, values), pattern)


@pytest.mark.parametrize("text,pattern", [
    ("search: {target_density: {type: uniform, low: 0.2, high: [0.5}\n", r"not valid YAML"),
    ("- a\n- b\n", r"expected a mapping of sweep keys at the top level, got list"),
    ("", r"expected a mapping of sweep keys at the top level, got null"),
    ("algorithm: optuna\nalgorithm: random\n", r"not valid YAML \(.*duplicate key 'algorithm'"),
])
def test_malformed_files(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError, match=pattern):
        load_space(path)



def test_a_seed_the_search_cannot_take_is_one_line(tmp_path):
    """A negative seed (or one past 2**32 - 1), the space's or base.seed that seeds the search without one, passed
    the space's checks, and the sweep stopped with a traceback from Optuna's sampler."""
    assert_refused(write(tmp_path, variant(seed=-1)), r"^\S+: seed: must be an integer from 0 to 4294967295 or null, "
                                                      r"got -1$")
    base = {**BASE_SPACE["base"], "seed": 2**32}
    assert_refused(write(tmp_path, variant(base=base)), r": base\.seed: must be an integer from 0 to 4294967295, got "
                                                        r"4294967296$")
    assert load_space(write(tmp_path, variant(seed=2**32 - 1))).search_seed == 2**32 - 1

def test_missing_file(tmp_path):
    with pytest.raises(SpaceError, match=r"nothere\.yaml: search-space file not found"):
        load_space(tmp_path / "nothere.yaml")


def test_grid_values_may_be_lists_for_grid_and_random(tmp_path):
    space = load_space(write(tmp_path, variant(algorithm="grid", search={
        "attention_block": {"type": "grid", "values": [[16, 16], [32, 32]]}})))
    cfg = trial_config(space, {"attention_block": [32, 32]}, "o", None)
    assert cfg.attention_block == (32, 32)


def test_method_may_be_searched_over_pruning_methods_only(tmp_path):
    ok = load_space(write(tmp_path, with_search(method={"type": "choice", "values": ["topk", "sigmoid_threshold"]}),
                          "ok.yaml"))
    assert trial_config(ok, {"method": "sigmoid_threshold"}, "o", None).method is Method.SIGMOID_THRESHOLD
    with pytest.raises(SpaceError, match=r"search\.method\.values\[0\]: a sweep prunes"):
        load_space(write(tmp_path, with_search(method={"type": "choice", "values": ["dense", "topk"]}), "bad.yaml"))


def fisher_space(search: dict, **base) -> dict:
    values = copy.deepcopy(BASE_SPACE)
    values["base"].update(method="fisher", attention_block=[16, 32], **base)
    values["base"].pop("max_steps")
    values["search"] = search
    if "target_flops" in base or "target_flops" in search:  # no density target for the density cap to default to
        values["registry"] = {"max_density": 0.5}
    return values


def test_fisher_spaces_search_density_calibration_recovery_and_distillation(tmp_path):
    space = load_space(write(tmp_path, fisher_space({
        "target_density": {"type": "uniform", "low": 0.3, "high": 0.6},
        "calibration_samples": {"type": "choice", "values": [256, 1024]},
        "fill_steps": {"type": "randint", "low": 0, "high": 40},
        "alpha_hidden": {"type": "uniform", "low": 0.0, "high": 2.0},
        "alpha_distil": {"type": "uniform", "low": 0.5, "high": 0.95},
        "mask_rearrange": {"type": "choice", "values": [True, False]},
    })))
    cfg = trial_config(space, {"target_density": 0.4, "calibration_samples": 256, "fill_steps": 12,
                               "alpha_hidden": 1.5, "alpha_distil": 0.9, "mask_rearrange": True}, "o", "t")
    assert cfg.method is Method.FISHER and cfg.fill_steps == 12 and cfg.alpha_hidden == 1.5
    assert cfg.alpha_ce == pytest.approx(0.1)


@pytest.mark.parametrize("search,base,pattern", [
    ({"mask_lr": {"type": "uniform", "low": 0.01, "high": 0.1}}, {}, r"search\.mask_lr: has no effect with method fisher"),
    ({"target_density": {"type": "uniform", "low": 0.3, "high": 0.6}}, {"target_flops": 0.5},
     r"search\.target_density: has no effect with method fisher and a target_flops"),
    ({"calibration_samples": {"type": "choice", "values": [0, 512]}}, {},
     r"search\.calibration_samples\.values\[0\]: 0 gives an invalid config \(calibration_samples"),
    ({"target_flops": {"type": "uniform", "low": 0.3, "high": 1.5}}, {},
     r"search\.target_flops\.high: 1\.5 gives an invalid config \(target_flops"),
    # Two stages need a recovery after each: a box whose corner has no recovery steps is refused.
    ({"fisher_stages": {"type": "choice", "values": [1, 2]}, "fill_steps": {"type": "randint", "low": 0, "high": 40}},
     {}, r"gives an invalid config \(fisher_stages"),
])
def test_invalid_fisher_space_names_the_key(tmp_path, search, base, pattern):
    with pytest.raises(SpaceError, match=pattern):
        load_space(write(tmp_path, fisher_space(search, **base)))


def test_fisher_keys_are_rejected_for_movement_pruning(tmp_path):
    with pytest.raises(SpaceError, match=r"search\.mask_tuning_samples: has no effect with method topk"):
        load_space(write(tmp_path, with_search(mask_tuning_samples={"type": "choice", "values": [128, 256]})))
    with pytest.raises(SpaceError, match=r"search\.fisher_stages: has no effect with method topk"):
        load_space(write(tmp_path, with_search(fisher_stages={"type": "choice", "values": [1, 2]})))


def test_base_steps_of_a_fisher_sweep_are_the_teachers_unless_it_is_given(tmp_path):
    """A fisher trial trains only its fill_steps, but the teacher the sweep trains reads base.max_steps."""
    values = variant(base={**BASE_SPACE["base"], "method": "fisher", "attention_block": [16, 32]})
    values["search"] = {"fill_steps": {"type": "randint", "low": 0, "high": 4}}
    assert load_space(write(tmp_path, values)).base["max_steps"] == 10
    values["search"]["max_steps"] = {"type": "choice", "values": [10, 20]}
    with pytest.raises(SpaceError, match=r"search\.max_steps: has no effect with method fisher"):
        load_space(write(tmp_path, values))
    del values["search"]["max_steps"]
    values["teacher"] = {"path": "models/teacher"}
    with pytest.raises(SpaceError, match=r"base\.max_steps: has no effect with method fisher"):
        load_space(write(tmp_path, values))


def test_a_base_key_another_searched_method_reads_is_allowed(tmp_path):
    """With the method searched, a base key belongs to one of the searched methods: lambdas for sigmoid_threshold
    beside a topk base."""
    values = variant(base={**BASE_SPACE["base"], "lambda_attention": 5.0, "lambda_ffn": 5.0})
    values["search"] = {"method": {"type": "choice", "values": ["topk", "sigmoid_threshold"]}}
    assert load_space(write(tmp_path, values)).base["lambda_attention"] == 5.0


@pytest.mark.parametrize("device,gpu,pattern", [
    ("cuda:1", 1, r"base\.device: cuda:1: a trial sees only the GPU Ray gives it, as cuda:0"),
    ("cuda", 2, r"resources\.gpu: 2: a trial trains on one device"),
    ("cudax", 1, r"base\.device: must be auto, cpu or cuda\[:N\], got 'cudax'"),
])
def test_a_device_no_trial_can_use_is_refused(tmp_path, device, gpu, pattern):
    # Ray hides every GPU but the trial's own: cuda:1 fails in every trial (and the teacher) at the first .to().
    path = write(tmp_path, variant(base={**BASE_SPACE["base"], "device": device}, resources={"cpu": 1, "gpu": gpu}))
    with pytest.raises(SpaceError, match=pattern):
        load_space(path)
    for fine in ("cuda", "cuda:0"):
        load_space(write(tmp_path, variant(base={**BASE_SPACE["base"], "device": fine},
                                           resources={"cpu": 1, "gpu": 0.5}), f"{fine.replace(':', '-')}.yaml"))


@pytest.mark.parametrize("gpu,expected", [(0, "cpu"), (0.5, "cuda"), (1, "cuda")])
def test_device_auto_runs_a_trial_and_the_teacher_where_its_resources_are(tmp_path, gpu, expected):
    # A trial without a GPU share still sees the node's GPUs (Ray hides them only from a task that holds one):
    # auto must not put it on a GPU that Ray gave another trial.
    space = load_space(write(tmp_path, variant(base={**BASE_SPACE["base"], "device": "auto"},
                                               resources={"cpu": 1, "gpu": gpu})))
    assert trial_config(space, {}, tmp_path / "trial", None).device == expected
    assert teacher_config(space, tmp_path / "teacher").device == expected


def test_reuse_workers_says_whether_tune_hands_an_ended_trials_worker_to_the_next(tmp_path):
    from workflows.tune_search import tune_config_kwargs

    metrics = ["f1", "linear_density"]
    assert tune_config_kwargs(load_space(write(tmp_path, BASE_SPACE)), metrics)["reuse_actors"] is True
    fresh = load_space(write(tmp_path, variant(reuse_workers=False), "fresh.yaml"))
    assert tune_config_kwargs(fresh, metrics)["reuse_actors"] is False
    with pytest.raises(SpaceError, match=r"bad\.yaml: reuse_workers: "):
        load_space(write(tmp_path, variant(reuse_workers="sometimes"), "bad.yaml"))


def _readme_section(title: str) -> str:
    text = (SPACES_DIR / "README.md").read_text(encoding="utf-8")
    assert f"\n## {title}\n" in text, f"tune_spaces/README.md has no section {title!r}: update this test"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_space_readme_lists_every_top_level_key_with_its_default(tmp_path):
    """The README's table of top-level keys names exactly the keys the schema takes, and a default written as one
    YAML value is the one a space without the key gets."""
    from workflows.space import _TOP_KEYS

    rows = re.findall(r"^\| `([a-z][a-z_0-9]*)` \| (.*?) \|", _readme_section("Top-level keys"), re.M)
    assert [key for key, _ in rows] == list(_TOP_KEYS)
    space = load_space(write(tmp_path, BASE_SPACE)).model_dump(by_alias=True)
    for key, default in rows:
        written = re.fullmatch(r"`([^`]*)`(?: \(.*\))?|(\d+)(?: \(.*\))?", default)
        if written is None or key in BASE_SPACE:
            continue  # said in words ("the file's stem", "see below"), or given by the space loaded here
        value = yaml.safe_load(written.group(1) or written.group(2))
        if isinstance(value, str) and "." in value:
            continue  # another key's value (base.seed)
        if key == "objectives":
            value = [tuple(pair) for pair in value]
        assert space[key] == value, f"{key}: the README says {default}, a space gets {space[key]!r}"


def test_the_space_readme_names_the_keys_that_cannot_be_searched():
    from workflows.space import _NOT_SEARCHABLE

    sentence = re.search(r"cannot be searched: (.*?)\.\n", _readme_section("Search"), re.S)
    assert sentence, "the README's sentence on keys that cannot be searched moved: update this test"
    assert set(re.findall(r"`([a-z][a-z_0-9]*)`", sentence.group(1))) == set(_NOT_SEARCHABLE)


def test_every_yaml_example_of_the_space_readme_loads(tmp_path):
    """Each ``yaml`` block of tune_spaces/README.md, put into a space of the method its base names (topk unless it
    says fisher, whose MiniLM head it gives), is a space the schema takes; a block that searches a ``grid`` key runs
    under algorithm random, as its comment says."""
    text = (SPACES_DIR / "README.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    assert len(blocks) >= 6 and any("search" in block for block in blocks)
    for i, block in enumerate(blocks):
        values = copy.deepcopy(BASE_SPACE)
        base = block.pop("base", {})
        if base.get("method") == "fisher":  # one step-free cut of the model whose head the block gives
            values["base"] = {key: value for key, value in values["base"].items()
                              if key not in ("model_config", "max_steps", "eval_every", "attention_block", "method")}
            values["base"]["model"] = "minilm"
        values["base"].update(base)
        values.update(block)
        if any(spec.get("type") == "grid" for spec in values["search"].values()):
            values["algorithm"] = "random"
        try:
            load_space(write(tmp_path, values, f"block{i}.yaml"))
        except SpaceError as err:
            pytest.fail(f"tune_spaces/README.md, yaml block {i + 1}: {err}")


def test_the_space_readme_names_the_metrics_the_schema_takes():
    """The scheduler's metrics, the objectives' directions, the registry keys and the hypervolume reference
    defaults, as tune_spaces/README.md gives them, against workflows.record, workflows.space and frontier."""
    from workflows.frontier import DEFAULT_REFERENCE
    from workflows.record import EVAL_METRICS, METRIC_MODES, TIMING_SPREAD
    from workflows.space import RegistrySection, SchedulerSpec

    block = re.search(r"```yaml\nscheduler:\n(.*?)```", _readme_section("Scheduler"), re.S).group(1)
    keys = re.findall(r"^  ([a-z_]+):", block, re.M)
    assert set(keys) == set(SchedulerSpec.model_fields)
    metrics = re.search(r"# reported at every evaluation: (.*?)\n  mode:", block, re.S).group(1)
    assert re.findall(r"[a-z][a-z_0-9]*", metrics) == list(EVAL_METRICS)

    directions = re.search(r"`max` for (.*?); `min` for (.*?) and the losses", _readme_section("Top-level keys"))
    assert directions, "the README's sentence on objective directions moved: update this test"
    better_max = set(re.findall(r"`([a-z][a-z_0-9]*)`", directions.group(1)))
    better_min = set(re.findall(r"`([a-z][a-z_0-9]*)`", directions.group(2)))
    assert better_max == {m for m, mode in METRIC_MODES.items() if mode == "max"}
    assert better_min == {m for m, mode in METRIC_MODES.items()
                          if mode == "min" and not m.startswith("loss") and m != TIMING_SPREAD}  # no objective

    block = re.search(r"```yaml\nregistry:\n(.*?)```", _readme_section("registry"), re.S).group(1)
    assert set(re.findall(r"^  ([a-z_0-9]+):", block, re.M)) | {"max_f1_drop", "max_latency_ms"} == set(
        RegistrySection.model_fields)
    policies = re.findall(r"^\| `([a-z_0-9]+)` \| `([a-z][a-z_0-9]*)`", _readme_section("registry"), re.M)
    from workflows.space import POLICIES
    assert dict(policies) == POLICIES

    defaults = re.search(r"Defaults:\s(.*?)\. An objective", _readme_section("reference_point"), re.S).group(1)
    documented = {}
    for names, value in re.findall(r"((?:`[a-z][a-z_0-9]*`(?: and )?)+) (\d+)", defaults):
        documented.update(dict.fromkeys(re.findall(r"`([a-z][a-z_0-9]*)`", names), float(value)))
    assert documented == DEFAULT_REFERENCE


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    """A saved dense QA model of the shape of BASE_SPACE's model_config (hidden 32 in 2 heads of 16)."""
    from pruning.checkpoint import save_model
    from pruning.trainer import build_model

    model, tokenizer = build_model(RunConfig(model_config=BASE_SPACE["base"]["model_config"]))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("model") / "small")


def _on_model(model_dir: Path, **base) -> dict:
    """BASE_SPACE trained from the model directory ``model_dir`` (not a model_config), ``base`` overlaid."""
    values = copy.deepcopy(BASE_SPACE)
    values["base"].pop("model_config")
    values["base"].update(model=str(model_dir), **base)
    return values


@pytest.mark.parametrize("case,pattern", [
    ("model_config", r"base\.attention_block: 24x24 does not divide the 32x32 attention matrices of the model_config "
                     r"\(hidden_size 32\)$"),
    ("directory", r"base\.attention_block: 24x24 does not divide the 32x32 attention matrices of the model \S+small "
                  r"\(hidden_size 32\)$"),
    ("fisher", r"base\.attention_block: method fisher needs head-shaped blocks: head or \[head_dim, hidden\] = "
               r"\[16, 32\], got \[16, 16\]$"),
    ("searched method", r"search\.method\.values\[1\]: 'fisher' gives an invalid config \(attention_block: method "
                        r"fisher needs head-shaped blocks: head or \[head_dim, hidden\] = \[16, 32\], got "
                        r"\[16, 16\]\)$"),
    ("searched block", r"search\.attention_block\.values\[1\]: \[24, 24\] gives an invalid config \(attention_block: "
                       r"24x24 does not divide the 32x32 attention matrices of the model \S+small"),
    ("student_init", r"base\.attention_block: 64x64 does not divide the 32x32 attention matrices of the model "
                     r"\S+small \(hidden_size 32\)$"),
])
def test_attention_blocks_that_do_not_fit_the_model_are_refused_when_the_space_loads(tmp_path, small_model_dir, case,
                                                                                      pattern):
    """Every trial would fail building its masked model; the space names the key instead, reading only the model's
    config (config.json of a model directory)."""
    if case == "model_config":
        values = variant(base={**BASE_SPACE["base"], "attention_block": [24, 24]})
    elif case == "directory":
        values = _on_model(small_model_dir, attention_block=[24, 24])
    elif case == "fisher":
        values = _on_model(small_model_dir, method="fisher", attention_block=[16, 16])
        values["base"].pop("max_steps")
        values["search"] = {"target_density": {"type": "uniform", "low": 0.3, "high": 0.6}}
    elif case == "searched method":
        values = _on_model(small_model_dir)
        values["search"] = {"method": {"type": "choice", "values": ["topk", "fisher"]}}
    elif case == "searched block":
        values = _on_model(small_model_dir)
        values.update(algorithm="grid", search={"attention_block": {"type": "grid", "values": [[16, 16], [24, 24]]}})
    else:  # the trials start from a given teacher of another width than base.model_config
        values = variant(base={**BASE_SPACE["base"], "attention_block": [64, 64],
                               "model_config": {**BASE_SPACE["base"]["model_config"], "hidden_size": 64}},
                         teacher={"path": str(small_model_dir), "student_init": True})
    path = write(tmp_path, values)
    assert_refused(path, pattern)


def test_blocks_that_fit_the_model_load(tmp_path, small_model_dir):
    load_space(write(tmp_path, _on_model(small_model_dir), "topk.yaml"))
    values = _on_model(small_model_dir)
    blocks = [[16, 16], [32, 32], "head"]
    values.update(algorithm="grid", search={"attention_block": {"type": "grid", "values": blocks}})
    load_space(write(tmp_path, values, "grid.yaml"))
    for block in ([16, 32], "head"):  # one head of the model, by its numbers or by name
        values = _on_model(small_model_dir, method="fisher", attention_block=block)
        values["base"].pop("max_steps")
        values["search"] = {"target_density": {"type": "uniform", "low": 0.3, "high": 0.6}}
        load_space(write(tmp_path, values, "fisher.yaml"))
    # Without a block of its own, each trial of a searched method prunes with that method's block.
    values = _on_model(small_model_dir)
    values["base"].pop("attention_block")
    values["search"] = {"method": {"type": "choice", "values": ["topk", "fisher"]}}
    space = load_space(write(tmp_path, values, "methods.yaml"))
    blocks = {method: method_block(trial_config(space, {"method": method}, tmp_path / method, None))
              for method in ("topk", "fisher")}
    assert blocks == {"topk": (32, 32), "fisher": "head"}
    # A model directory that is not here (on a cluster's workers only) is not read: the trials check it.
    load_space(write(tmp_path, _on_model(tmp_path / "elsewhere", attention_block=[24, 24]), "elsewhere.yaml"))


@pytest.mark.parametrize("case,pattern", [
    ("base", r"base\.alpha_hidden: 1\.0 weighs a hidden-state MSE that needs a teacher with the student's layers and "
             r"width, but the teacher \S+small has 2 layers of 32 and the student 2 of 64$"),
    ("searched", r"search\.alpha_hidden\.high: 2\.0 gives an invalid config \(alpha_hidden: 2\.0 weighs a hidden-state "
                 r"MSE .* but the teacher \S+small has 2 layers of 32 and the student 2 of 64\)$"),
    ("trained", r"base\.alpha_hidden: 1\.0 weighs .* but the teacher the sweep trains has 1 layers of 64 and the "
                r"student 2 of 64$"),
])
def test_a_hidden_state_loss_to_a_teacher_of_another_shape_is_refused_when_the_space_loads(tmp_path, small_model_dir,
                                                                                           case, pattern):
    """Every trial would stop before its first step; the teacher's config.json (or the model_config it is trained
    from) tells it before Ray starts."""
    wide = {**BASE_SPACE["base"]["model_config"], "hidden_size": 64}
    values = variant(base={**BASE_SPACE["base"], "model_config": wide}, teacher={"path": str(small_model_dir)})
    if case == "base":
        values["base"]["alpha_hidden"] = 1.0
    elif case == "searched":
        values["search"]["alpha_hidden"] = {"type": "uniform", "low": 0.0, "high": 2.0}
    else:
        values["base"]["alpha_hidden"] = 1.0
        values["teacher"] = {"config": {"max_steps": 4, "model_config": {**wide, "num_hidden_layers": 1}}}
    path = write(tmp_path, values)
    assert_refused(path, pattern)
    # Without the hidden-state loss the teacher's logits alone are distilled, which any width gives.
    values["base"].pop("alpha_hidden", None)
    values["search"].pop("alpha_hidden", None)
    load_space(write(tmp_path, values, "logits.yaml"))


@pytest.mark.parametrize("search,base,pattern", [
    ({"target_density": {"type": "uniform", "low": 0.3, "high": 0.6}}, {"fisher_layer_floor": 0.3},
     r"search\.target_density\.low: 0\.3 gives an invalid config \(fisher_layer_floor: 0\.3 keeps 1 of the 2 heads and "
     r"20 of the 64 FFN neurons of every layer of the model_config, 0\.4062 of its linear weights, more than the "
     r"target_density 0\.3\)$"),
    ({"fisher_layer_floor": {"type": "uniform", "low": 0.0, "high": 0.4}}, {"target_density": 0.45},
     r"search\.fisher_layer_floor\.high: 0\.4 gives an invalid config \(fisher_layer_floor: 0\.4 keeps 1 of the 2 "
     r"heads and 26 of the 64 FFN neurons"),
    ({"fisher_layer_floor": {"type": "choice", "values": [0.1, 0.2]},
      "target_density": {"type": "choice", "values": [0.35, 0.6]}}, {},
     r"search: the combination fisher_layer_floor=0\.2, target_density=0\.35 gives an invalid config "
     r"\(fisher_layer_floor: 0\.2 keeps 1 of the 2 heads"),
])
def test_a_layer_floor_the_density_cannot_hold_is_refused_when_the_space_loads(tmp_path, search, base, pattern):
    """A floor keeps ceil(floor * n) of each layer's heads: with 2 heads any floor keeps half of them, more than a
    low target holds, and every trial would stop after its importance passes."""
    with pytest.raises(SpaceError, match=pattern):
        load_space(write(tmp_path, fisher_space(search, **base)))
    load_space(write(tmp_path, fisher_space({"fisher_layer_floor": {"type": "uniform", "low": 0.0, "high": 0.3}},
                                            target_density=0.6), "fits.yaml"))


@pytest.mark.parametrize("base", [{"target_flops": 0.5}, {"fisher_stages": 2, "fill_steps": 4},
                                  {"fisher_layer_floor": 0.1}], ids=["target_flops", "fisher_stages", "layer_floor"])
def test_a_fisher_base_may_set_the_keys_only_fisher_reads(tmp_path, base):
    """The trials are fisher runs that read these keys; the teacher, a dense run of the same base, leaves them out
    instead of refusing the space."""
    space = load_space(write(tmp_path, fisher_space({"alpha_distil": {"type": "uniform", "low": 0.5, "high": 0.9}},
                                                    **base)))
    trial = trial_config(space, {"alpha_distil": 0.7}, tmp_path / "trial", "teacher")
    assert all(getattr(trial, key) == value for key, value in base.items())
    teacher = teacher_config(space, tmp_path / "teacher")
    assert teacher.method is Method.DENSE and teacher.target_flops is None and teacher.fisher_stages == 1
    assert teacher.fisher_layer_floor == 0 and teacher.fill_steps == 0


def test_a_model_config_too_small_for_the_tokenizer_is_refused_when_the_space_loads(tmp_path):
    """The teacher and every trial would stop building the model; the space names the key before Ray starts."""
    small = {**BASE_SPACE["base"]["model_config"], "vocab_size": 1000}
    path = write(tmp_path, variant(base={**BASE_SPACE["base"], "model_config": small}))
    with pytest.raises(SpaceError) as info:
        load_space(path)
    assert str(info.value) == (f"{path}: base.model_config.vocab_size: 1000 is smaller than the tokenizer's 30522 "
                               "tokens")
    load_space(write(tmp_path, variant(base={**BASE_SPACE["base"], "model_config": {**small, "vocab_size": 30522}}),
                     "fits.yaml"))


def test_a_given_teacher_that_cannot_read_the_students_token_ids_is_refused_when_the_space_loads(tmp_path,
                                                                                                  small_model_dir):
    """Every trial would stop before its first step distilling from it; the teacher's files tell it before Ray
    starts."""
    import json
    import shutil

    other = tmp_path / "other-ids"
    shutil.copytree(small_model_dir, other)
    renumber_tokens(other)
    path = write(tmp_path, variant(teacher={"path": str(other)}))
    with pytest.raises(SpaceError) as info:
        load_space(path)
    assert str(info.value) == (f"{path}: teacher.path: {other} has a tokenizer of 30522 tokens that numbers 1000 of "
                               "the student's 30522 tokens differently: the teacher must read the student's token ids")
    config = json.loads((small_model_dir / "config.json").read_text())
    narrow = tmp_path / "narrow"
    shutil.copytree(small_model_dir, narrow)
    (narrow / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    with pytest.raises(SpaceError, match=r"teacher\.path: \S+narrow embeds 1000 tokens, fewer than the student's "
                                         r"tokenizer has \(30522\)"):
        load_space(write(tmp_path, variant(teacher={"path": str(narrow)}), "narrow.yaml"))
    load_space(write(tmp_path, variant(teacher={"path": str(small_model_dir)}), "same.yaml"))


def test_a_layer_floor_the_flop_target_cannot_hold_is_refused_on_the_windows_the_trials_cut(tmp_path):
    """A FLOP target counts the windows the trainer cuts to the model's 128 positions, not max_seq_length's 256."""
    search = {"alpha_distil": {"type": "uniform", "low": 0.5, "high": 0.9}}
    path = write(tmp_path, fisher_space(search, target_flops=0.3, fisher_layer_floor=0.3, max_seq_length=256))
    with pytest.raises(SpaceError) as info:
        load_space(path)
    # A head: 8 * 128 * 32 * 16 + 4 * 128^2 * 16 FLOPs, a neuron 4 * 128 * 32; the floor keeps 1 of 2 and 20 of 64.
    head, neuron = 8 * 128 * 32 * 16 + 4 * 128 ** 2 * 16, 4 * 128 * 32
    share = (head + 20 * neuron) / (2 * head + 64 * neuron)
    assert str(info.value) == (f"{path}: base.fisher_layer_floor: 0.3 keeps 1 of the 2 heads and 20 of the 64 FFN "
                               f"neurons of every layer of the model_config, {share:.4g} of its FLOPs on windows of "
                               "128 tokens, more than the target_flops 0.3")
    load_space(write(tmp_path, fisher_space(search, target_flops=0.6, fisher_layer_floor=0.3, max_seq_length=256),
                     "fits.yaml"))


def test_speedup_seq_len_is_checked_against_the_teacher_the_trials_start_from(tmp_path, small_model_dir):
    """With teacher.student_init every trial starts from the teacher (here a directory of 128 positions), so its
    packed models are timed at speedup.seq_len on the teacher's positions, whatever base.model_config says."""
    def space(positions: int, seq_len: int) -> dict:
        model_config = {**BASE_SPACE["base"]["model_config"], "max_position_embeddings": positions}
        return variant(base={**BASE_SPACE["base"], "model_config": model_config},
                       teacher={"path": str(small_model_dir), "student_init": True}, speedup={"seq_len": seq_len})

    assert load_space(write(tmp_path, space(64, 128))).speedup["seq_len"] == 128
    path = write(tmp_path, space(512, 256))
    with pytest.raises(SpaceError, match=r"speedup\.seq_len: 256 exceeds the 128 positions the model takes"):
        load_space(path)


def test_home_directory_paths_of_a_space_are_read_as_a_shell_reads_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    values = variant(teacher={"path": "~/teacher/final", "student_init": True})
    values["base"]["train_data"] = "~/data/train.json"
    space = load_space(write(tmp_path, values))
    assert space.teacher.path == str(tmp_path / "home/teacher/final")
    cfg = trial_config(space, {"target_density": 0.5}, "o", space.teacher.path)
    assert cfg.train_data == str(tmp_path / "home/data/train.json") and cfg.teacher == space.teacher.path
    # The sweep's check that they are on this machine reads them so too: it refused them as not found.
    import shutil

    from pruning.resources import shipped_model_dir, squad_file
    from workflows.preflight import check_local_paths

    (tmp_path / "home" / "data").mkdir(parents=True)
    with pytest.raises(SpaceError, match=r"base\.train_data: .*/home/data/train\.json: SQuAD data file not found"):
        check_local_paths(space)
    shutil.copy(squad_file("dev"), tmp_path / "home" / "data" / "train.json")
    shutil.copytree(shipped_model_dir(), tmp_path / "home" / "teacher" / "final")
    check_local_paths(space)


def test_home_directory_paths_of_a_space_in_a_process_without_one_are_refused(tmp_path, monkeypatch):
    import pwd

    def unknown(uid):
        raise KeyError(uid)

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", unknown)
    said = r"~ is the home directory, and this process has none \(HOME is not set\); give the path in full$"
    values = variant(teacher={"path": "~/teacher/final"})
    with pytest.raises(SpaceError, match=r": teacher\.path: ~/teacher/final: " + said):
        load_space(write(tmp_path, values))
    values = variant()
    values["base"]["train_data"] = "~/data/train.json"
    with pytest.raises(SpaceError, match=r": base\.train_data: ~/data/train\.json: " + said):
        load_space(write(tmp_path, values))


@pytest.mark.parametrize("where", ["base.model", "teacher.path", "teacher.config.model"])
def test_a_packed_model_the_trials_would_start_from_is_refused_when_the_space_is_read(tmp_path, tokenizer, where):
    """A space whose trials start from a packed model directory (as `fineprune pack` writes it) passed its check,
    and every trial then stopped with "a packed model cannot be pruned"."""
    from conftest import packed_tiny_bert

    packed = str(packed_tiny_bert(tmp_path / "packed", tokenizer, heads=1, ffn=64))
    values = copy.deepcopy(BASE_SPACE)
    del values["base"]["model_config"]
    values["base"]["attention_block"] = [32, 32]
    if where == "base.model":
        values["base"]["model"] = packed
    elif where == "teacher.path":
        values["teacher"] = {"path": packed, "student_init": True}
    else:
        values["teacher"] = {"student_init": True, "config": {"max_steps": 4, "model": packed}}
    path = write(tmp_path, values)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert str(err.value) == (f"{path}: {where}: {packed}: is a packed model (fineprune_packed in config.json), whose "
                              "layers differ in width; the trials prune a model of the original shape: give the "
                              "model it was packed from")
    # The trials of a sweep that only distils from it start from the base model, which is not packed.
    values["teacher"] = {"path": packed}
    if where != "teacher.path":
        return
    values["base"]["model_config"] = BASE_SPACE["base"]["model_config"] | {"hidden_size": 64}
    assert load_space(write(tmp_path, values)).teacher.path == packed


def test_warmup_fractions_that_add_up_to_one_fit_a_sweep_of_odd_steps(tmp_path):
    """0.5 and 0.5 of 7 steps (3.5 each): rounded alone, halves to even, they read as 4 + 4 of the 7 steps."""
    values = variant(base={**BASE_SPACE["base"], "max_steps": 7, "initial_warmup": 0.5},
                     search={"final_warmup": {"type": "choice", "values": [0.2, 0.5]}})
    space = load_space(write(tmp_path, values))
    assert space.base["max_steps"] == 7
