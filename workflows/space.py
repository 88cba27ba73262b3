"""The search-space schema: a ``tune_spaces/*.yaml`` file -> a validated :class:`SweepSpace` (and the run configs
of its teacher and trials), which :mod:`workflows.tune_search` makes into Ray Tune objects.

A space file names a base :class:`~pruning.config.RunConfig`, how the dense teacher is obtained, which config keys
are searched and how, and how the sweep is run (search algorithm, scheduler, samples, resources) and judged
(objectives, registry policy). ``tune_spaces/README.md`` documents every key.

The schema is a set of pydantic models (:class:`SweepSpace` and the specs it holds): every key of the file is a
typed field, unknown keys are errors at every level, and the checks that span sections (a searched key the method
ignores, the extremes of every searched value overlaid on the base config, a GPU device without GPUs, ...) are the
model's validators; those that read the model a config will train are :mod:`workflows.model_checks`.
:func:`load_space` reads the file with the one YAML reader of the project (:func:`pruning.config.read_yaml`) and
turns the first validation error into one line naming the file and the key path, e.g. ``tune_spaces/x.yaml:
search.target_density.high: 1.5 gives an invalid config (target_density: must be in (0, 1], got 1.5)``.

The fingerprints that tell when an earlier sweep's teacher can be reused are :mod:`workflows.fingerprint`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Mapping

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from pruning.config import (MAX_SEED, METHOD_KEYS, ConfigError, MaskInit, Method, RunConfig, check_keys_apply,
                            config_from_dict, home_path, read_yaml)
from pruning.errors import name_hint, path_hint
from pruning.schedules import warmups
from workflows import model_checks
from workflows.frontier import reference_point as _reference_point
from workflows.record import (DEFAULT_MAX_INT8_F1_DROP, DENSITY_OBJECTIVES, EVAL_METRICS, METRIC_BEST, METRIC_MODES,
                              TIMING_SPREAD, RegistrySpec, flat_params)

__all__ = [
    "SpaceError",
    "ParamSpec",
    "TeacherSpec",
    "SchedulerSpec",
    "SamplerSpec",
    "RegistrySpec",
    "SweepSpace",
    "ALGORITHMS",
    "SAMPLERS",
    "PARAM_TYPES",
    "POLICIES",
    "LAMBDA_KEY",
    "parse_number",
    "logged_as",
    "EVAL_METRICS",
    "load_space",
    "trial_config",
    "teacher_config",
    "baseline_config",
    "EVALUATION",
    "TEACHER_IGNORES",
]

ALGORITHMS = ("optuna", "random", "grid")
SAMPLERS = ("tpe", "gp", "nsga2", "random")  # Optuna samplers of algorithm optuna
PARAM_TYPES = ("choice", "grid", "uniform", "quniform", "loguniform", "randint")
POLICIES = {
    # policy -> the one numeric key it takes
    "best_f1_under_density": "max_density",
    "min_density_within_f1_drop": "max_f1_drop",
    "fastest_within_f1_drop": "max_f1_drop",
    "best_f1_under_latency": "max_latency_ms",
}
LAMBDA_KEY = "lambda"  # searched pseudo-key: sets lambda_attention and lambda_ffn to the same value
DEFAULT_OBJECTIVES = DENSITY_OBJECTIVES

_TOP_KEYS = ("name", "base", "teacher", "search", "algorithm", "sampler", "objectives", "scheduler", "num_samples",
             "max_concurrent", "resources", "max_failures", "reuse_workers", "registry", "speedup", "seed",
             "reference_point")
_SPEEDUP_DEFAULTS = {"batch_size": 1, "seq_len": 128, "repeats": 10}
_RESOURCE_DEFAULTS = {"cpu": 1.0, "gpu": 0.0}

# The sweep sets these per trial; a space must not.
_SWEEP_OWNED = ("output_dir", "teacher")
# Searching these would change what a trial is compared on or where it runs, not how it is trained.
_NOT_SEARCHABLE = _SWEEP_OWNED + ("model", "model_config", "tokenizer", "train_data", "eval_data", "eval_limit",
                                  "n_best", "max_answer_length", "max_windows", "eval_every", "save_every",
                                  "log_every", "device", "cache_dir")
# Keys only the pruning methods read (pruning.config.METHOD_KEYS: which methods read each key); the lambda pseudo-key
# stands for lambda_attention and lambda_ffn.
_MASK_ONLY = frozenset({key for key, methods in METHOD_KEYS.items() if Method.DENSE not in methods} | {LAMBDA_KEY})
_DISTIL_ONLY = frozenset({"alpha_ce", "alpha_distil", "temperature", "alpha_hidden", "teacher_cache"})
# Keys a dense teacher run ignores: teacher.config refuses them, and they are not in the teacher's fingerprint.
TEACHER_IGNORES = _MASK_ONLY | _DISTIL_ONLY
# What a model is scored with: the evaluation data and the settings evaluate() reads. The trials take them from the
# base; the dense baseline is the teacher scored with the same (baseline_config).
EVALUATION = ("eval_data", "eval_limit", "max_seq_length", "doc_stride", "max_query_length", "max_answer_length",
              "n_best", "precision")
_CORNER_LIMIT = 4096  # above this many corners of the search box only single extremes are checked
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A sweep's name (or --experiment) names its Tune directory, NAME-DATE-TIME-ID (23 characters more), and its report's
# directory: within the 255 bytes a file system gives one name.
NAME_LIMIT = 200


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot name a sweep (its experiment, its directories and its report's), or None."""
    if not _NAME_RE.fullmatch(value):
        return f"{value!r}: use letters, digits, '_', '.', '-' (it names directories)"
    if len(value) > NAME_LIMIT:
        return f"{value[:20]!r}... is {len(value)} characters long: at most {NAME_LIMIT} (it names directories)"
    return None


class SpaceError(ValueError):
    """A search-space file is invalid; the one-line message names the file and the key path."""


# --------------------------------------------------------------------------------------------------------------
# Field types: each check says what is wrong in the words of the file
# --------------------------------------------------------------------------------------------------------------


def _density_target_problem(base: RunConfig, search: Mapping[str, Any]) -> str | None:
    """Why the trials of ``base`` (searching ``search``) have no density target, or None where they have one."""
    if base.target_flops is not None or "target_flops" in search:
        return "the trials keep a FLOP target (target_flops)"
    if base.method not in (Method.TOPK, Method.FISHER):
        return f"method {base.method.value} sets no density target"
    return None


class _Problem(ValueError):
    """A failed check: ``message`` about the key path ``at``, relative to where pydantic found the value."""

    def __init__(self, message: str, *at: str | int) -> None:
        super().__init__(message)
        self.message = message
        self.at = at


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _hint(word: Any, allowed: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the allowed word closest to a misspelt ``word``, else ``""``."""
    return name_hint(word, allowed) if isinstance(word, str) else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_number(text: str) -> int | float | None:
    """The finite number ``text`` writes, or None."""
    for kind in (int, float):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            continue
        return value if _is_number(value) else None
    return None


def logged_as(text: str, value: Any) -> bool:
    """Whether ``text``, a run's param as ``record.flat_params`` logged it, is ``value`` (numbers by value: "1.0" is
    1; "True" is no number)."""
    if flat_params({"v": value}).get("v") == text:
        return True
    number = parse_number(text)
    return number is not None and _is_number(value) and number == value


def _integer(minimum: int) -> BeforeValidator:
    def check(value: Any) -> Any:
        if not (_is_int(value) and value >= minimum):
            raise _Problem(f"must be an integer >= {minimum}, got {value!r}")
        return value

    return BeforeValidator(check)


def _number(value: Any) -> Any:
    if not _is_number(value):
        raise _Problem(f"must be a number, got {value!r}")
    return value


def _non_negative(value: Any) -> Any:
    if _number(value) < 0:
        raise _Problem(f"must be >= 0, got {value!r}")
    return value


def _text(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise _Problem(f"must be a non-empty string, got {value!r}")
    return value


def _flag(value: Any) -> Any:
    if not isinstance(value, bool):
        raise _Problem(f"must be true or false, got {value!r}")
    return value


def _one_of(allowed: Iterable[str]) -> BeforeValidator:
    allowed = tuple(allowed)

    def check(value: Any) -> Any:
        if value not in allowed:
            raise _Problem(f"unknown value {value!r}{_hint(value, allowed)} (allowed: {', '.join(allowed)})")
        return value

    return BeforeValidator(check)


Number = Annotated[int | float, BeforeValidator(_number)]  # finite; an int stays an int
NonNegative = Annotated[int | float, BeforeValidator(_non_negative)]
Text = Annotated[str, BeforeValidator(_text)]
Flag = Annotated[bool, BeforeValidator(_flag)]


def _known_keys(value: Any, allowed: Iterable[str], what: str = "a mapping") -> dict[Any, Any]:
    """``value`` as a dict (``{}`` for null) whose keys are all in ``allowed``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Problem(f"expected {what}, got {_kind(value)}")
    allowed = tuple(allowed)
    for key in value:
        if key not in allowed:
            raise _Problem(f"unknown key{_hint(key, allowed)} (allowed: {', '.join(allowed)})", key)
    return dict(value)


def _run_config_keys(value: Any) -> dict[str, Any]:
    """``value`` as a dict of RunConfig keys (``{}`` for null)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Problem(f"expected a mapping of RunConfig keys, got {_kind(value)}")
    for key in value:
        if key not in _KINDS or key == LAMBDA_KEY:
            raise _Problem(f"unknown RunConfig key{_hint(key, set(_KINDS) - {LAMBDA_KEY})}", key)
    return dict(value)


def _config_problem(err: ConfigError, *at: str | int) -> _Problem:
    """A RunConfig error (``key: what``) as a problem at ``at`` + its key."""
    message = _message(err)
    key, sep, rest = message.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
        return _Problem(rest, *at, key)
    return _Problem(message, *at)


def _message(err: ConfigError) -> str:
    """A ConfigError's message without its source prefix: ``key: what is wrong``."""
    message = str(err)
    return message[3:] if message.startswith("-: ") else message


def _field_kinds() -> dict[str, str]:
    """RunConfig field -> "int", "float" or "other" (from the type hints; ``X | None`` counts as ``X``)."""
    kinds: dict[str, str] = {}
    for name, hint in typing.get_type_hints(RunConfig).items():
        args = set(typing.get_args(hint)) - {type(None)} or {hint}
        kinds[name] = "int" if args == {int} else "float" if args == {float} else "other"
    kinds[LAMBDA_KEY] = "float"
    return kinds


_KINDS = _field_kinds()


# --------------------------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------------------------


class _Section(BaseModel):
    """One mapping of the file: unknown keys are errors, null or absent takes every default. Read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        return _known_keys(data, cls.model_fields)


class ParamSpec(_Section):
    """How one config key is searched.

    ``choice``/``grid`` use ``values``; ``uniform``, ``loguniform`` and ``randint`` (integers, both bounds
    inclusive) use ``low``/``high``; ``quniform`` also ``q`` (the step; ``low`` and ``high`` are multiples of it).
    """

    type: Literal["choice", "grid", "uniform", "quniform", "loguniform", "randint"]  # see PARAM_TYPES
    low: Number | None = None
    high: Number | None = None
    values: tuple[Any, ...] | None = None
    q: Number | None = None

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, Mapping):
            raise _Problem(f"expected a mapping with a type ({', '.join(PARAM_TYPES)}), got {_kind(data)}")
        kind = data.get("type")
        if kind not in PARAM_TYPES:
            raise _Problem(f"unknown or missing type {kind!r}{_hint(kind, PARAM_TYPES)} "
                           f"(allowed: {', '.join(PARAM_TYPES)})", "type")
        if kind in ("choice", "grid"):
            data = _known_keys(data, ("type", "values"))
            if not isinstance(data.get("values"), list) or not data["values"]:
                raise _Problem(f"must be a non-empty list, got {data.get('values')!r}", "values")
            return data
        data = _known_keys(data, ("type", "low", "high", "q") if kind == "quniform" else ("type", "low", "high"))
        for key in ("low", "high", "q") if kind == "quniform" else ("low", "high"):
            if key not in data:
                raise _Problem(f"is required for type {kind}", key)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.values is not None:
            # 1 and 1.0 are one value to a trial's config.
            canonical = [json.dumps(float(v) if _is_number(v) else v, sort_keys=True, default=str)
                         for v in self.values]
            if len(set(canonical)) != len(canonical):
                raise _Problem("has duplicates", "values")
            return self
        low, high = self.low, self.high
        if self.type == "randint" and not (_is_int(low) and _is_int(high)):
            raise _Problem(f"randint bounds must be integers, got {low!r}, {high!r}", "low")
        if self.type == "randint":
            for bound, v in (("low", low), ("high", high)):
                if not -(2 ** 63) <= v < 2 ** 63 - 1:  # the samplers draw 64-bit integers (high + 1 included)
                    raise _Problem(f"{v!r} is out of the range of a 64-bit integer", bound)
        if not low < high:
            raise _Problem(f"must be < high ({low!r} >= {high!r})", "low")
        if self.type == "loguniform" and low <= 0:
            raise _Problem(f"must be > 0 for loguniform, got {low!r}", "low")
        if self.type == "quniform":
            if self.q <= 0:
                raise _Problem(f"must be > 0, got {self.q!r}", "q")
            for bound, v in (("low", low), ("high", high)):
                # Ray rounds samples to multiples of q: bounds off that lattice would let samples leave [low, high].
                if abs(v / self.q - round(v / self.q)) > 1e-9:
                    raise _Problem(f"{v!r} is not a multiple of q={self.q!r}", bound)
        return self

    def extremes(self) -> list[tuple[str, Any]]:
        """(key-path suffix, value) pairs that bound the values a trial can get."""
        if self.values is not None:
            return [(f"values[{i}]", v) for i, v in enumerate(self.values)]
        return [("low", self.low), ("high", self.high)]

    def size(self) -> int | None:
        """How many values a trial can get; None for a continuous range."""
        if self.values is not None:
            return len(self.values)
        if self.type == "randint":
            return int(self.high) - int(self.low) + 1
        if self.type == "quniform":
            return int(round((self.high - self.low) / self.q)) + 1
        return None

    def ladder(self) -> tuple[Any, ...] | None:
        """Every value a trial can get (numbers in ascending order); None for a continuous range."""
        if self.values is not None:
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)
            return tuple(sorted(self.values)) if numeric else self.values
        if self.type == "randint":
            return tuple(range(int(self.low), int(self.high) + 1))
        if self.type == "quniform":
            return tuple(round(self.low + i * self.q, 12) for i in range(self.size()))
        return None

    def parse_logged(self, text: str) -> Any:
        """The value a trial got, from its text as a run's param logged it (``record.flat_params``).

        Raises:
            ValueError: no trial of this key can get that value (e.g. an earlier sweep searched other values).
        """
        if self.values is not None:
            for v in self.values:
                if logged_as(text, v):
                    return v
            raise ValueError(f"{text} is not one of {list(self.values)}")
        number = parse_number(text)
        if number is None or not self.low <= number <= self.high:
            raise ValueError(f"{text} is outside [{self.low}, {self.high}]")
        if self.type == "randint":
            if not float(number).is_integer():
                raise ValueError(f"{text} is not an integer")
            return int(number)
        if self.type == "quniform" and not math.isclose(number / self.q, round(number / self.q), abs_tol=1e-9):
            raise ValueError(f"{text} is not a multiple of {self.q}")
        return float(number)

    def to_tune(self, enumerate_choices: bool = False) -> Any:
        """The Ray Tune sample object; ``enumerate_choices`` turns a choice into a grid (grid algorithm)."""
        from ray import tune  # the schema itself needs no Ray: reading a space (the registry does) stays light
        if self.type == "grid" or (self.type == "choice" and enumerate_choices):
            return tune.grid_search(list(self.values))
        if self.type == "choice":
            return tune.choice(list(self.values))
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "quniform":
            return tune.quniform(self.low, self.high, self.q)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "randint":
            # Ray's randint excludes its upper bound; the spec's bounds are both inclusive.
            return tune.randint(int(self.low), int(self.high) + 1)
        raise AssertionError(f"unhandled parameter type {self.type}")


class TeacherSpec(_Section):
    """Where the distillation teacher comes from.

    ``path``: an existing QA model directory used as is (need not exist when the space is loaded). When it is
    None the sweep first fine-tunes a dense teacher from ``base`` overlaid with ``config`` (method forced to dense).
    ``student_init``: prune the fine-tuned teacher itself rather than the pre-trained ``base.model`` (the paper
    starts from the pre-trained model; starting from the teacher reaches a usable F1 in a short CPU budget).
    """

    path: Text | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    student_init: Flag = False  # start every trial from the teacher's weights instead of base.model

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        if isinstance(data, str):  # shorthand: `teacher: path/to/model`
            data = {"path": data}
        return super()._mapping(data)

    @field_validator("path")
    @classmethod
    def _home(cls, value: str | None) -> str | None:
        """``~`` is the home directory, as in every path of the run config."""
        try:
            return None if value is None else home_path(value)
        except ConfigError as err:
            raise _Problem(str(err)) from None

    @field_validator("config", mode="before")
    @classmethod
    def _dense_keys(cls, value: Any) -> Any:
        value = _run_config_keys(value)
        for key in value:
            if key in _SWEEP_OWNED or key == "method":
                raise _Problem("is set by the sweep (the teacher is a dense run in its own directory)", key)
            if key in TEACHER_IGNORES:
                raise _Problem("does not apply to the dense teacher", key)
        return value

    @model_validator(mode="after")
    def _path_or_config(self) -> TeacherSpec:
        if self.path is not None and self.config:
            raise _Problem("is unused when teacher.path is set (the teacher is not trained)", "config")
        return self


class SchedulerSpec(_Section):
    """An ASHA early-stopping scheduler; its time unit is ``training_iteration`` = one evaluation report."""

    type: Annotated[str, _one_of(("asha",))] = "asha"
    metric: str = "f1"
    mode: str = "max"  # default: max for exact_match, f1 and heads_removed, else min
    grace_period: Annotated[int, _integer(1)] = 1
    reduction_factor: Annotated[int, _integer(2)] = 2
    max_t: Annotated[int, _integer(1)] = 100

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        data = super()._mapping(data)
        if isinstance(data, dict):
            metric = data.get("metric", "f1")
            data.setdefault("mode", "max" if metric in ("exact_match", "f1", "heads_removed") else "min")
        return data

    @field_validator("metric", mode="before")
    @classmethod
    def _reported(cls, value: Any) -> Any:
        if value not in EVAL_METRICS:
            raise _Problem(f"{value!r} is not reported at each evaluation{_hint(value, EVAL_METRICS)} "
                           f"(allowed: {', '.join(EVAL_METRICS)})")
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        if value not in ("max", "min"):
            raise _Problem(f"must be max or min, got {value!r}")
        return value

    @model_validator(mode="after")
    def _rungs(self) -> SchedulerSpec:
        if self.mode != METRIC_MODES[self.metric]:
            raise _Problem(_wrong_way(self.metric, self.mode), "mode")
        if self.grace_period > self.max_t:
            raise _Problem(f"{self.grace_period} exceeds max_t {self.max_t}", "grace_period")
        return self


class SamplerSpec(_Section):
    """The Optuna sampler of ``algorithm: optuna``, seeded with the sweep's search seed.

    ``tpe`` (the default) models good and bad trials separately; ``gp`` fits a Gaussian process to the objectives
    and, on a smooth space, finds most of its frontier in fewer trials (bench/RESULTS.md, "Search efficiency");
    ``nsga2`` evolves a population; ``random`` samples uniformly. ``startup_trials`` (tpe, gp) is how many random
    trials come before the model (Optuna's default: 10); ``population_size`` (nsga2) is Optuna's 50 by default;
    ``multivariate`` (tpe) models the searched keys jointly.
    """

    type: Annotated[str, _one_of(SAMPLERS)] = "tpe"
    startup_trials: Annotated[int, _integer(1)] | None = None
    population_size: Annotated[int, _integer(2)] | None = None
    # tpe: one density over all the searched keys together instead of one per key, so that it can learn which
    # values go well together (Optuna's multivariate TPE)
    multivariate: Flag = False

    @model_validator(mode="after")
    def _applicable(self) -> SamplerSpec:
        if self.startup_trials is not None and self.type not in ("tpe", "gp"):
            raise _Problem(f"only tpe and gp start with random trials, not {self.type}", "startup_trials")
        if self.multivariate and self.type != "tpe":
            raise _Problem(f"only tpe models the keys jointly, not {self.type}", "multivariate")
        if self.population_size is not None and self.type != "nsga2":
            raise _Problem(f"only nsga2 has a population, not {self.type}", "population_size")
        return self


class RegistrySection(_Section):
    """The ``registry`` section as read: which trial becomes the registered champion, a policy and its one
    threshold. The space hands it on as the record's :class:`~workflows.record.RegistrySpec`."""

    name: Text
    policy: Annotated[str, _one_of(POLICIES)] = "best_f1_under_density"
    max_density: Number | None = None  # best_f1_under_density: linear_density <= this
    max_f1_drop: Number | None = None  # *_within_f1_drop: F1 points below the dense teacher's F1
    max_latency_ms: Number | None = None  # best_f1_under_latency: measured latency of the registered version
    onnx: Flag = True  # export each new version for ONNX Runtime (false: versions serve through PyTorch)
    # a new version serves ONNX Runtime int8 when it loses at most this many F1 points against fp32 on its trial's
    # questions, else fp32 (null: int8, unchecked)
    max_int8_f1_drop: Number | None = DEFAULT_MAX_INT8_F1_DROP

    @field_validator("name")
    @classmethod
    def _registrable(cls, value: str) -> str:
        # What the MLflow registry refuses, found now rather than when the sweep's trials are done.
        if "/" in value or ":" in value or value in (".", "..") or value.startswith(".."):
            raise _Problem(f"{value!r}: a registered model name cannot contain '/' or ':', nor start with '..'")
        # Names MLflow takes but its search of a model's versions cannot match (the quotes of its filter strings).
        if any(c in value for c in "'\"\\"):
            raise _Problem(f"{value!r}: a registered model name cannot contain quotes or backslashes (MLflow cannot "
                           "search its versions)")
        # Names MLflow registers but whose models:/NAME@ALIAS and models:/NAME/VERSION load another model or none:
        # a URI's query, fragment and escapes, and the alias separator.
        if (taken := sorted({c for c in value if c in "?#%@"})):
            raise _Problem(f"{value!r}: a registered model name cannot contain {' or '.join(map(repr, taken))} "
                           "(the models:/ URIs that load it would be read otherwise)")
        return value

    @model_validator(mode="after")
    def _one_threshold(self) -> RegistrySection:
        needed = POLICIES[self.policy]
        for key in dict.fromkeys(POLICIES.values()):
            if key != needed and getattr(self, key) is not None:
                raise _Problem(f"is not used by policy {self.policy} (it takes {needed})", key)
        value = getattr(self, needed)
        if value is None:
            if needed != "max_density":  # max_density defaults to the base config's target_density
                raise _Problem(f"is required by policy {self.policy}", needed)
        elif needed == "max_latency_ms" and not value > 0:
            raise _Problem(f"must be > 0 (milliseconds), got {value!r}", needed)
        elif needed == "max_density" and not 0 < value <= 1:
            raise _Problem(f"must be in (0, 1], got {value!r}", needed)
        elif needed == "max_f1_drop" and value < 0:
            raise _Problem(f"must be >= 0 (F1 points), got {value!r}", needed)
        return self

    @model_validator(mode="after")
    def _int8_drop(self) -> RegistrySection:
        key = "max_int8_f1_drop"
        if self.max_int8_f1_drop is not None and not self.max_int8_f1_drop >= 0:
            raise _Problem(f"must be >= 0 (F1 points), got {self.max_int8_f1_drop!r}", key)
        if not self.onnx and key in self.model_fields_set and self.max_int8_f1_drop is not None:
            raise _Problem("is not used with onnx: false (no version is exported for ONNX Runtime)", key)
        return self


def _wrong_way(metric: str, mode: str) -> str:
    better = METRIC_MODES[metric]
    return (f"{metric} is better when {'larger' if better == 'max' else 'smaller'}: {mode} would seek the worst trials "
            f"(use {better})")


def _objectives(value: Any) -> Any:
    if value is None:
        return list(DEFAULT_OBJECTIVES)
    if not isinstance(value, list) or not value:
        raise _Problem("expected a non-empty list of [metric, max|min] pairs")
    out: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise _Problem(f"expected [metric, max|min], got {item!r}", i)
        if item[0] == TIMING_SPREAD:
            raise _Problem(f"{TIMING_SPREAD} says how steadily a trial's speedup was timed, not how good its model "
                           "is: it is no objective", i)
        if item[0] not in METRIC_MODES:
            raise _Problem(f"{item[0]!r} is not a metric the trials report{_hint(item[0], METRIC_MODES)} "
                           f"(reported: {', '.join(m for m in METRIC_MODES if m != TIMING_SPREAD)})", i)
        if item[1] not in ("max", "min"):
            raise _Problem(f"mode must be max or min, got {item[1]!r}", i)
        if item[1] != METRIC_MODES[item[0]]:
            raise _Problem(_wrong_way(item[0], item[1]), i)
        if any(item[0] == name for name, _ in out):
            raise _Problem(f"{item[0]!r} is listed twice", i)
        out.append((item[0], item[1]))
    return out


def _with_defaults(defaults: dict[str, Any]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        return {**defaults, **_known_keys(value, defaults)}

    return check


class SweepSpace(_Section):
    """A validated search space. Treat the dicts as read-only."""

    name: str  # default experiment name (the file's stem unless given)
    path: Path  # the file (not a key of it)
    base: dict[str, Any] = Field(default_factory=dict)  # RunConfig values shared by every trial (and the teacher)
    algorithm: Annotated[str, _one_of(ALGORITHMS)] = "optuna"
    sampler: SamplerSpec | None = None  # algorithm optuna only; None: TPE with Optuna's defaults
    search: dict[str, ParamSpec]
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    objectives: Annotated[list[tuple[str, str]], BeforeValidator(_objectives)] = Field(
        default_factory=lambda: list(DEFAULT_OBJECTIVES))
    scheduler: SchedulerSpec | None = None
    num_samples: Annotated[int, _integer(1)]  # default 8 (grid: 1)
    max_concurrent: Annotated[int, _integer(1)] | None = None  # None: as many as the resources allow
    resources: Annotated[dict[str, NonNegative], BeforeValidator(_with_defaults(_RESOURCE_DEFAULTS))] = Field(
        default_factory=lambda: dict(_RESOURCE_DEFAULTS))
    max_failures: Annotated[int, _integer(0)] = 0  # retries of a failed trial
    reuse_workers: Flag = True  # an ended trial's worker process runs the next trial
    registry_section: RegistrySection = Field(alias="registry")  # read as ``registry``; see :attr:`registry`
    speedup: Annotated[dict[str, Annotated[int, _integer(1)]], BeforeValidator(_with_defaults(_SPEEDUP_DEFAULTS))] = (
        Field(default_factory=lambda: dict(_SPEEDUP_DEFAULTS)))
    seed: int | None = None  # seed of the search algorithm's sampler; None: base seed
    # The hypervolume's reference value per objective; objectives not listed take frontier.DEFAULT_REFERENCE.
    reference_point: dict[str, float] = Field(default_factory=dict, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any, info: ValidationInfo) -> Any:
        """The file's keys, plus what it leaves to defaults that depend on other keys."""
        path = (info.context or {}).get("path")
        if path is None or isinstance(data, BaseModel):  # built in code, not read from a file
            return data
        if not isinstance(data, Mapping):
            raise _Problem(f"expected a mapping of sweep keys at the top level, got {_kind(data)}")
        data = _known_keys(data, _TOP_KEYS)
        data["path"] = Path(path)
        name = data.get("name")
        if name is None:
            name = Path(path).stem
            if name_problem(name) is not None:
                raise _Problem(f"not given, and the file's name {name[:40]!r} cannot stand for it: set name to at "
                               f"most {NAME_LIMIT} letters, digits, '_', '.', '-' (it names directories)", "name")
        data["name"] = name
        data.setdefault("num_samples", 1 if data.get("algorithm") == "grid" else 8)
        registry = data.get("registry")
        if registry is None or isinstance(registry, Mapping):
            data["registry"] = {"name": data["name"], **(registry or {})}
        return data

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> Any:
        _text(value)
        if (problem := name_problem(value)) is not None:
            raise _Problem(problem)
        return value

    @field_validator("base", mode="before")
    @classmethod
    def _base_keys(cls, value: Any) -> Any:
        value = _run_config_keys(value)
        for key in value:
            if key in _SWEEP_OWNED:
                hint = "use teacher.path" if key == "teacher" else "every trial gets its own directory"
                raise _Problem(f"is set by the sweep ({hint})", key)
        return value

    @field_validator("base")
    @classmethod
    def _base_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            cfg = config_from_dict(value, source="-")
        except ConfigError as err:
            raise _config_problem(err) from None
        if cfg.method is Method.DENSE:
            raise _Problem("a sweep prunes: use topk, sigmoid_threshold or fisher (the teacher is the dense run)",
                           "method")
        return value

    @field_validator("search", mode="before")
    @classmethod
    def _searched_keys(cls, value: Any) -> Any:
        if not isinstance(value, Mapping) or not value:
            raise _Problem("expected a non-empty mapping of searched RunConfig keys")
        for key in value:
            if key not in _KINDS:
                raise _Problem(f"not a RunConfig key{_hint(key, _KINDS)}", key)
            if key in _NOT_SEARCHABLE:
                raise _Problem("cannot be searched (it must be the same for every trial; set it in base)", key)
        if LAMBDA_KEY in value:
            also = [k for k in ("lambda_attention", "lambda_ffn") if k in value]
            if also:
                raise _Problem(f"sets lambda_attention and lambda_ffn; do not also search {also[0]}", LAMBDA_KEY)
        return value

    @field_validator("search")
    @classmethod
    def _searchable_by_the_algorithm(cls, value: dict[str, ParamSpec], info: ValidationInfo) -> dict[str, ParamSpec]:
        algorithm = info.data.get("algorithm")
        for key, spec in value.items():
            if spec.values is not None:
                if spec.type == "grid" and algorithm == "optuna":
                    raise _Problem("grid needs algorithm random or grid (Optuna cannot enumerate a grid; use choice)",
                                   key, "type")
                if algorithm == "optuna":
                    for i, v in enumerate(spec.values):
                        if not (v is None or isinstance(v, (bool, int, float, str))):
                            raise _Problem(f"Optuna choices must be numbers, strings, booleans or null, got {v!r} "
                                           "(use algorithm random or grid)", key, f"values[{i}]")
                continue
            if algorithm == "grid":
                raise _Problem(f"{spec.type} cannot be enumerated by algorithm grid (use grid or choice)", key, "type")
            kind = _KINDS[key]
            if spec.type == "randint" and kind != "int":
                raise _Problem(f"randint gives integers but {key} is not an integer key", key, "type")
            if spec.type != "randint" and kind != "float":
                raise _Problem(f"{spec.type} gives floats but {key} is not a float key "
                               f"(use {'randint, ' if kind == 'int' else ''}choice or grid)", key, "type")
        return value

    @field_validator("registry_section")
    @classmethod
    def _default_density_cap(cls, value: RegistrySection, info: ValidationInfo) -> RegistrySection:
        if value.policy == "best_f1_under_density" and value.max_density is None and "base" in info.data:
            base = config_from_dict(info.data["base"], source="-")
            if _density_target_problem(base, info.data.get("search") or {}) is None:
                return value.model_copy(update={"max_density": base.target_density})
        return value  # without one to default to: refused once the sections are checked (_sections_agree)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> Any:
        if value is not None and not (_is_int(value) and 0 <= value <= MAX_SEED):
            raise _Problem(f"must be an integer from 0 to {MAX_SEED} or null, got {value!r}")
        return value

    @field_validator("reference_point", mode="before")
    @classmethod
    def _reference(cls, value: Any, info: ValidationInfo) -> Any:
        if "objectives" not in info.data:
            return {}  # the objectives' own error is reported
        objectives = info.data["objectives"]
        values = _known_keys(value, [name for name, _ in objectives])
        out = {}
        for key, v in values.items():
            try:
                out[key] = float(_number(v))
            except _Problem as err:
                raise _Problem(err.message, key) from None
            best, mode = METRIC_BEST.get(key), dict(objectives)[key]
            if best is not None and (out[key] >= best if mode == "max" else out[key] <= best):
                raise _Problem(f"{v!r} is at or beyond the best {key} a trial can have ({best:g}): no trial would "
                               "add to the hypervolume", key)
        try:
            _reference_point(objectives, out)
        except ValueError as err:
            raise _Problem(str(err).removeprefix("reference_point: ")) from None
        return out

    @model_validator(mode="after")
    def _sections_agree(self) -> SweepSpace:
        """What one section can only be checked against another: everything a trial or the teacher will get."""
        base_cfg = self.base_config
        _check_applicable(self.search, base_cfg)
        if "method" not in self.search:  # a searched method may read what the base method does not
            # A teacher the sweep trains reads the base's steps whatever the trials' method.
            keys = [k for k in self.base if self.teacher.path or k not in ("epochs", "max_steps")]
            try:
                check_keys_apply(base_cfg, keys)
            except ConfigError as err:
                raise _config_problem(err, "base") from None
        if base_cfg.model_config is not None:  # the trials' model or the teacher's is built from it
            problem = model_checks.vocabulary_problem(base_cfg)
            if problem is not None:
                raise _Problem(problem, "base", "model_config", "vocab_size")
        trial_model = self._trial_model(base_cfg)
        if trial_model.model_config is None and model_checks.is_packed(trial_model.model):
            # Every trial would stop before its first step (the trainer refuses to prune a packed model).
            raise _Problem(f"{trial_model.model}: is a packed model (fineprune_packed in config.json), whose layers "
                           "differ in width; the trials prune a model of the original shape: give the model it "
                           "was packed from", *self._trial_model_key())
        model = model_checks.model_config(trial_model)
        label = "the model_config" if trial_model.model_config is not None else f"the model {trial_model.model}"
        teacher_model = None
        teacher_cfg = None if self.teacher.student_init else self._teacher_model(base_cfg)
        if model is not None and teacher_cfg is not None and (teacher_cfg.model, teacher_cfg.model_config) != (
                trial_model.model, trial_model.model_config):
            teacher_model = model_checks.model_config(teacher_cfg)
        teacher_label = (f"the teacher {self.teacher.path}" if self.teacher.path is not None
                         else "the teacher the sweep trains")
        # The positions the trials' windows are cut to: the student's and the teacher's (None: not known here).
        limits = [model_checks.positions_of(model)]
        if teacher_cfg is not None and (teacher_cfg.model, teacher_cfg.model_config) != (
                trial_model.model, trial_model.model_config):
            limits.append(model_checks.positions_of(teacher_model))
        positions = None if None in limits else min(limits)

        def fits(cfg: RunConfig) -> None:
            model_checks.check_blocks(cfg, model, label)
            model_checks.check_teacher_shape(cfg, model, teacher_model, teacher_label)
            model_checks.check_layer_floor(cfg, model, label, positions)

        if model is not None:
            try:
                if not {"method", "attention_block"} & set(self.search):
                    model_checks.check_blocks(base_cfg, model, label)
                if "alpha_hidden" not in self.search:
                    model_checks.check_teacher_shape(base_cfg, model, teacher_model, teacher_label)
                if not {"method", "fisher_layer_floor", "target_density", "target_flops", "max_seq_length"} & set(
                        self.search):
                    model_checks.check_layer_floor(base_cfg, model, label, positions)
            except ConfigError as err:
                raise _config_problem(err, "base") from None
        _check_extremes(self.base, self.search, None if model is None else fits)
        if self.teacher.path is not None and not self.teacher.student_init:
            problem = model_checks.teacher_vocabulary_problem(base_cfg, self.teacher.path)
            if problem is not None:
                raise _Problem(problem, "teacher", "path")
        try:
            _teacher_values(self.base, self.teacher, "teacher")
        except ConfigError as err:
            problem = _config_problem(err)
            if problem.at and problem.at[0] in self.teacher.config:
                raise _Problem(problem.message, "teacher", "config", *problem.at) from None
            raise _Problem(_message(err), "teacher") from None
        if self.sampler is not None and self.algorithm != "optuna":
            raise _Problem(f"only algorithm optuna takes a sampler, not {self.algorithm}", "sampler")
        if self.scheduler is not None and base_cfg.eval_every is None:
            raise _Problem("ASHA acts on evaluation reports: set base.eval_every", "scheduler")
        if self.resources["cpu"] == 0 and self.resources["gpu"] == 0:
            raise _Problem("a trial needs some cpu or gpu", "resources")
        if base_cfg.device.startswith("cuda") and self.resources["gpu"] == 0:
            raise _Problem(f"base.device is {base_cfg.device} but trials get no GPU", "resources", "gpu")
        if base_cfg.device == "cpu" and self.resources["gpu"] > 0:
            raise _Problem("base.device is cpu: a GPU per trial would sit idle", "resources", "gpu")
        if self.resources["gpu"] > 1:
            raise _Problem(f"{self.resources['gpu']:g}: a trial trains on one device; the other GPUs it holds would "
                           "sit idle (use gpu: 1, or a fraction to share a GPU)", "resources", "gpu")
        index = _cuda_index(base_cfg.device)
        if index:  # Ray shows a trial only its own GPU, as cuda:0
            raise _Problem(f"{base_cfg.device}: a trial sees only the GPU Ray gives it, as cuda:0 (use cuda; Ray "
                           "chooses the GPU)", "base", "device")
        # The teacher runs as a Ray task with the trials' resources.
        teacher_device = self.teacher.config.get("device")
        if isinstance(teacher_device, str) and teacher_device.startswith("cuda"):
            if self.resources["gpu"] == 0:
                raise _Problem(f"teacher.config.device is {teacher_device} but the teacher, which takes a trial's "
                               "resources, gets no GPU", "resources", "gpu")
            if _cuda_index(teacher_device):
                raise _Problem(f"{teacher_device}: the teacher sees only the GPU Ray gives it, as cuda:0 (use cuda; "
                               "Ray chooses the GPU)", "teacher", "config", "device")
        # Of the model every trial starts from, and whose packed copies are timed.
        limit = model_checks.positions_of(model)
        if limit is not None and self.speedup["seq_len"] > limit:
            raise _Problem(f"{self.speedup['seq_len']} exceeds the {limit} positions the model takes",
                           "speedup", "seq_len")
        registry = self.registry_section
        if registry.policy == "best_f1_under_density" and registry.max_density is None:
            # The trials' density follows other keys: RunConfig's default target would cap the champion unseen.
            raise _Problem(f"not given, and there is no base.target_density to default to "
                           f"({_density_target_problem(base_cfg, self.search)}); give the largest linear density "
                           "the champion may have", "registry", "max_density")
        return self

    def _teacher_model(self, base_cfg: RunConfig) -> RunConfig | None:
        """A config whose ``model``/``model_config`` name the teacher: ``teacher.path``, or the model the sweep
        trains it from (the base overlaid with ``teacher.config``); None when that config is invalid (said below,
        naming the teacher's key)."""
        if self.teacher.path is not None:
            return config_from_dict({"model": self.teacher.path, "model_config": None, "tokenizer": None},
                                    source="-", base=base_cfg)
        try:
            return _teacher_values(self.base, self.teacher, "teacher")
        except ConfigError:
            return None

    def _trial_model(self, base_cfg: RunConfig) -> RunConfig:
        """A config whose ``model``/``model_config`` name the model every trial starts from: the base's, or with
        ``teacher.student_init`` the teacher's."""
        if not self.teacher.student_init:
            return base_cfg
        return self._teacher_model(base_cfg) or base_cfg

    def _trial_model_key(self) -> tuple[str, ...]:
        """Where the space names the model every trial starts from (:meth:`_trial_model`)."""
        if self.teacher.student_init and self.teacher.path is not None:
            return ("teacher", "path")
        if self.teacher.student_init and "model" in self.teacher.config:
            return ("teacher", "config", "model")
        return ("base", "model")

    @property
    def registry(self) -> RegistrySpec:
        """Which trial becomes the registered champion, as the sweep's record writes and reads it."""
        section = self.registry_section
        return RegistrySpec(section.name, section.policy, section.max_density, section.max_f1_drop,
                            section.max_latency_ms, section.onnx, section.max_int8_f1_drop)

    @property
    def base_config(self) -> RunConfig:
        """The base values as a RunConfig (output_dir and teacher at their defaults)."""
        return config_from_dict(self.base, source=f"{self.path}: base")

    @property
    def configurations(self) -> int | None:
        """How many distinct configurations the searched keys allow; None when a key is continuous."""
        sizes = [spec.size() for spec in self.search.values()]
        return None if None in sizes else math.prod(sizes)

    @property
    def search_seed(self) -> int:
        """The seed handed to the search algorithm's sampler."""
        return self.seed if self.seed is not None else self.base_config.seed

    def summary(self) -> dict[str, Any]:
        """The space as plain JSON values, without its path: what the sweep logs on its parent run."""
        return self.model_dump(mode="json", exclude={"path"}, by_alias=True)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _key_path(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker of an error in a dict key
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``key.path: what is wrong``."""
    loc = list(error["loc"])
    problem = (error.get("ctx") or {}).get("error")
    if isinstance(problem, _Problem):
        loc += problem.at
        message = problem.message
    elif error["type"] == "missing":
        message = "is required"
    else:
        message = str(error["msg"])
    key = _key_path(loc)
    return f"{key}: {message}" if key else message


def load_space(path: str | Path) -> SweepSpace:
    """Read and validate a search-space YAML file.

    Args:
        path: a ``tune_spaces/*.yaml`` file.

    Returns:
        The validated space.

    Raises:
        SpaceError: the file is missing, not YAML, not a mapping, has an unknown key at any level, or describes a
            sweep whose trials (or teacher) would not get a valid RunConfig.
    """
    path = Path(path)
    if path.is_dir():  # tune_spaces/ itself, say
        raise SpaceError(f"{path}: is a directory; a YAML search-space file is expected")
    if not path.exists():
        raise SpaceError(f"{path}: search-space file not found{path_hint(path)}")
    if not path.is_file():
        raise SpaceError(f"{path}: not a regular file (a pipe, as <(...) makes?): the sweep reads its space more "
                         "than once; give a file")
    try:
        raw = read_yaml(path)
    except ConfigError as err:
        raise SpaceError(str(err)) from None
    try:
        return SweepSpace.model_validate(raw, context={"path": path})
    except ValidationError as err:
        raise SpaceError(f"{path}: {_describe(err.errors()[0])}") from None


def _check_applicable(search: Mapping[str, ParamSpec], base_cfg: RunConfig) -> None:
    """Reject searched keys the (fixed) method ignores: they would make trials that differ in nothing."""
    if "method" in search:
        for i, v in enumerate(search["method"].values or ()):
            if v == Method.DENSE.value:
                raise _Problem("a sweep prunes: dense is the teacher, not a trial", "search", "method",
                               f"values[{i}]")
        return
    method = base_cfg.method
    for key in search:
        readers = METHOD_KEYS.get("lambda_attention" if key == LAMBDA_KEY else key)
        if ((readers is not None and method not in readers)
                or (key == "target_density" and base_cfg.target_flops is not None)):
            raise _Problem(f"has no effect with method {method.value}"
                           + (" and a target_flops" if key == "target_density" and base_cfg.target_flops else ""),
                           "search", key)
        problem = _unread_beside(key, search, base_cfg)
        if problem is not None:
            raise _Problem(f"has no effect {problem}", "search", key)


def _unread_beside(key: str, search: Mapping[str, ParamSpec], base_cfg: RunConfig) -> str | None:
    """Why a key the method reads is not read beside the base's other settings (and searched keys), or None."""
    init = base_cfg.mask_init if isinstance(base_cfg.mask_init, MaskInit) else MaskInit.CONSTANT
    warm = {"calibration_samples": (MaskInit.FISHER,), "mask_init_scale": (MaskInit.FISHER, MaskInit.MAGNITUDE)}
    if (key in warm and base_cfg.method is not Method.FISHER and "mask_init" not in search
            and init not in warm[key]):
        # The scores start from a constant: no importance is estimated, nor spread.
        shown = base_cfg.mask_init.value if isinstance(base_cfg.mask_init, MaskInit) else f"{base_cfg.mask_init:g}"
        return f"with mask_init {shown} (only mask_init {' or '.join(m.value for m in warm[key])} reads it)"
    if key == "temperature" and "alpha_distil" not in search and base_cfg.alpha_distil == 0:
        return "with alpha_distil 0 (no distillation)"
    return None


def _overlay(params: Mapping[str, Any], searched: Iterable[str]) -> dict[str, Any]:
    """Searched values -> RunConfig values: expand the lambda pseudo-key, complement alpha_ce ("hardness")."""
    searched = set(searched)
    values = {k: _plain(v) for k, v in params.items() if k != LAMBDA_KEY}
    if LAMBDA_KEY in params:
        values["lambda_attention"] = values["lambda_ffn"] = _plain(params[LAMBDA_KEY])
    if "alpha_distil" in values and "alpha_ce" not in searched:
        values["alpha_ce"] = round(1.0 - values["alpha_distil"], 12)
    return values


def _plain(value: Any) -> Any:
    """numpy scalars (which some samplers hand out) -> Python values, so configs compare and serialise cleanly."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str)) else value


def _check_plan(cfg: RunConfig, *at: str) -> None:
    """The warm-up check the trainer makes, done here when the number of pruning steps is already known."""
    if not cfg.masked or cfg.max_steps is None or cfg.method is Method.FISHER:
        return
    initial, final = warmups(cfg.initial_warmup, cfg.final_warmup, cfg.max_steps)
    if initial + final > cfg.max_steps:
        raise _Problem(f"initial_warmup + final_warmup ({initial} + {final} steps) exceed the "
                       f"{cfg.max_steps} pruning steps", *at)
    if final == 0 and initial >= cfg.max_steps:
        raise _Problem(f"initial_warmup ({initial} steps) leaves none of the {cfg.max_steps} pruning steps to reach "
                       "the target (final_warmup is 0)", *at)


def _check_extremes(base: Mapping[str, Any], search: Mapping[str, ParamSpec],
                    fits: Callable[[RunConfig], None] | None = None) -> None:
    """Every extreme of every searched value, then every corner of the search box, must make a valid config (and
    one that ``fits`` the model, when given: it raises ConfigError)."""
    base_cfg = config_from_dict(base, source="-")
    fits = fits or (lambda cfg: None)
    for key, spec in search.items():
        for suffix, value in spec.extremes():
            try:
                cfg = config_from_dict(_overlay({key: value}, search), source="-", base=base_cfg)
                fits(cfg)
            except ConfigError as err:
                raise _Problem(f"{value!r} gives an invalid config ({_message(err)})", "search", key, suffix) from None
            _check_plan(cfg, "search", key, suffix)
    per_key = [[value for _, value in spec.extremes()] for spec in search.values()]
    if len(search) < 2 or math.prod(len(v) for v in per_key) > _CORNER_LIMIT:
        return
    for corner in itertools.product(*per_key):
        params = dict(zip(search, corner))
        label = ", ".join(f"{k}={v!r}" for k, v in params.items())
        try:
            cfg = config_from_dict(_overlay(params, search), source="-", base=base_cfg)
            fits(cfg)
        except ConfigError as err:
            raise _Problem(f"the combination {label} gives an invalid config ({_message(err)})", "search") from None
        _check_plan(cfg, "search")


# --------------------------------------------------------------------------------------------------------------
# Configs of the runs
# --------------------------------------------------------------------------------------------------------------


def _cuda_index(device: str) -> int | None:
    """N of ``cuda:N``; None for any other device."""
    prefix, _, index = device.partition(":")
    return int(index) if prefix == "cuda" and index.isdigit() else None


def _placed(cfg: RunConfig, resources: Mapping[str, float]) -> RunConfig:
    """``cfg`` with device ``auto`` made the device Ray gives a trial: ``cuda`` with a GPU share, else ``cpu``.

    Ray hides the other GPUs only from a task that holds one: a trial without a GPU still sees every GPU of its
    node, and ``auto`` would put it (and every other trial of the node) on the first, which Ray never gave it.
    """
    if cfg.device != "auto":
        return cfg
    return dataclasses.replace(cfg, device="cuda" if resources.get("gpu", 0) else "cpu")


def trial_config(space: SweepSpace, params: Mapping[str, Any], output_dir: str | Path,
                 teacher: str | Path | None) -> RunConfig:
    """The RunConfig of one trial: ``base`` overlaid with the trial's sampled values.

    Searching ``alpha_distil`` without ``alpha_ce`` sets ``alpha_ce = 1 - alpha_distil`` (one "hardness" knob). The
    pseudo-key ``lambda`` sets both ``lambda_attention`` and ``lambda_ffn``. With ``teacher.student_init`` the
    trial starts from the teacher's weights (``model`` = ``teacher``; ``model_config`` and ``tokenizer`` cleared).
    Device ``auto`` becomes ``cuda`` when the trial has a GPU share and ``cpu`` when it has none.

    Args:
        space: a loaded space.
        params: the values Ray passes to the trainable (keys as in ``space.search``; a missing key keeps its base
            value).
        output_dir: the trial's own directory.
        teacher: the teacher model directory, or None for no distillation.

    Returns:
        The trial's config.

    Raises:
        SpaceError: ``params`` has a key the space does not search, the values make an invalid config, or
            ``teacher.student_init`` is set but ``teacher`` is None.
    """
    unknown = sorted(set(params) - set(space.search))
    if unknown:
        raise SpaceError(f"{space.path}: trial parameter {unknown[0]!r} is not searched by this space")
    values = _overlay(params, space.search)
    values["output_dir"] = str(output_dir)
    values["teacher"] = None if teacher is None else str(teacher)
    if space.teacher.student_init:
        if teacher is None:
            raise SpaceError(f"{space.path}: teacher.student_init: the trial has no teacher to start from")
        values.update(model=str(teacher), model_config=None, tokenizer=None)
    try:
        return _placed(config_from_dict(values, source="-", base=space.base_config), space.resources)
    except ConfigError as err:
        label = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise SpaceError(f"{space.path}: trial {label}: {_message(err)}") from None


def _teacher_values(base: Mapping[str, Any], teacher: TeacherSpec, output_dir: str) -> RunConfig:
    values = dict(base)
    values.update(teacher.config)
    # The teacher is a plain dense fine-tune; evaluation only at its end unless its config asks for more.
    # A base's fisher keys (FLOP target, stages, layer floor) are the trials'; a dense run takes none of them.
    values.update(method=Method.DENSE.value, teacher=None, alpha_hidden=0.0, fill_steps=0, fill_packed=False,
                  teacher_cache=False, target_flops=None, fisher_stages=1, fisher_layer_floor=0.0,
                  output_dir=str(output_dir))
    for key in ("eval_every", "save_every"):
        if key not in teacher.config:
            values[key] = None
    return config_from_dict(values, source="-")


def teacher_config(space: SweepSpace, output_dir: str | Path) -> RunConfig:
    """The dense teacher's RunConfig: ``base`` overlaid with ``teacher.config``, method dense, no distillation.

    Evaluation and checkpoints happen only at the end unless ``teacher.config`` sets ``eval_every``/``save_every``.
    With ``teacher.path`` nothing is trained: the config's ``model`` is that directory and its evaluation
    settings (data, limits, sequence length) are the ones to score the given teacher with.
    """
    try:
        cfg = _teacher_values(space.base, space.teacher, str(output_dir))
        if space.teacher.path is not None:
            cfg = config_from_dict({"model": space.teacher.path, "model_config": None, "tokenizer": None},
                                   source="-", base=cfg)
        return _placed(cfg, space.resources)
    except ConfigError as err:
        raise SpaceError(f"{space.path}: teacher.config: {_message(err)}") from None


def baseline_config(space: SweepSpace, output_dir: str | Path) -> RunConfig:
    """The RunConfig that scores the dense teacher as the trials are scored: the dense baseline's.

    It is :func:`teacher_config` with the base's evaluation data and settings (:data:`EVALUATION`): ``teacher.config``
    may train the teacher on other questions or windows, which score only the teacher's own run. The windows are cut
    to the positions of the model the trials start from when that model takes fewer than the teacher (a trial cuts
    its windows to its own positions and the teacher's; the evaluation cuts them to the teacher's); where that
    model cannot be read here (a path only a cluster's workers hold) they are left to the evaluation.
    """
    cfg = teacher_config(space, output_dir)
    base = space.base_config
    values = {key: getattr(base, key) for key in EVALUATION}
    student = model_checks.positions_of(model_checks.model_config(space._trial_model(base)))
    teacher = model_checks.positions_of(model_checks.model_config(cfg))
    if student is not None and (teacher is None or student < teacher):
        from pruning.squad import fit_windows  # pruning.squad imports torch: only a space scored here needs it

        values["max_seq_length"], values["doc_stride"] = fit_windows(base.max_seq_length, base.doc_stride, student)
    return dataclasses.replace(cfg, **values)
