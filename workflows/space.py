"""The search-space schema: a ``tune_spaces/*.yaml`` file -> a validated :class:`SweepSpace` -> Ray Tune objects.

A space file names a base :class:`~pruning.config.RunConfig`, how the dense teacher is obtained, which config keys
are searched and how, and how the sweep is run (search algorithm, scheduler, samples, resources) and judged
(objectives, registry policy). ``tune_spaces/README.md`` documents every key.

Everything a sweep could trip over later is checked in :func:`load_space`, before Ray starts: unknown keys at any
level, bounds, and every extreme of every searched value (and every corner of the search box) overlaid on the base
config must build a valid ``RunConfig``. Errors are one line naming the file and the key path, e.g.
``tune_spaces/x.yaml: search.target_density.high: 1.5 gives an invalid config (target_density: must be in (0, 1],
got 1.5)``.

Ray is imported only inside :func:`param_space`, :func:`search_algorithm`, :func:`scheduler` and
:func:`tune_config_kwargs`, so loading and validating a space is cheap.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from pruning.config import ConfigError, Method, RunConfig, config_from_dict, config_to_dict
from pruning.schedules import warmup_steps
from workflows.frontier import reference_point as _reference_point
from workflows.record import DENSITY_OBJECTIVES, EVAL_METRICS, RegistrySpec

__all__ = [
    "SpaceError",
    "ParamSpec",
    "TeacherSpec",
    "SchedulerSpec",
    "RegistrySpec",
    "SweepSpace",
    "ALGORITHMS",
    "PARAM_TYPES",
    "POLICIES",
    "LAMBDA_KEY",
    "load_space",
    "param_space",
    "search_algorithm",
    "scheduler",
    "tune_config_kwargs",
    "trial_config",
    "teacher_config",
    "teacher_fingerprint",
]

ALGORITHMS = ("optuna", "random", "grid")
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
TIME_ATTR = "training_iteration"  # one iteration = one evaluation report of the trainer

_TOP_KEYS = ("name", "base", "teacher", "search", "algorithm", "objectives", "scheduler", "num_samples",
             "max_concurrent", "resources", "max_failures", "registry", "speedup", "seed", "reference_point")
_SPEEDUP_DEFAULTS = {"batch_size": 1, "seq_len": 128, "repeats": 10}
_RESOURCE_DEFAULTS = {"cpu": 1.0, "gpu": 0.0}

# The sweep sets these per trial; a space must not.
_SWEEP_OWNED = ("output_dir", "teacher")
# Searching these would change what a trial is compared on or where it runs, not how it is trained.
_NOT_SEARCHABLE = _SWEEP_OWNED + ("model", "model_config", "tokenizer", "train_data", "eval_data", "eval_limit",
                                  "n_best", "max_answer_length", "max_windows", "eval_every", "save_every",
                                  "log_every", "device", "cache_dir")
_TOPK_ONLY = frozenset({"topk_scope"})
_DENSITY_TARGET = frozenset({"target_density"})  # topk and fisher
_SIGMOID_ONLY = frozenset({"initial_threshold", "final_threshold", "lambda_attention", "lambda_ffn", LAMBDA_KEY})
_FISHER_ONLY = frozenset({"target_flops", "mask_rearrange", "mask_tuning_samples"})
# Keys of the score-learning methods (topk, sigmoid_threshold) that a one-shot fisher run never reads.
_MOVEMENT_ONLY = frozenset({"mask_lr", "mask_init", "mask_init_scale", "initial_warmup", "final_warmup"})
_MASK_ONLY = (_TOPK_ONLY | _DENSITY_TARGET | _SIGMOID_ONLY | _FISHER_ONLY | _MOVEMENT_ONLY
              | {"attention_block", "fill_steps", "fill_learning_rate", "calibration_samples"})
_DISTIL_ONLY = frozenset({"alpha_ce", "alpha_distil", "temperature", "alpha_hidden"})
# Keys that cannot change the weights of a dense teacher run (left out of its fingerprint).
_NOT_IN_FINGERPRINT = (frozenset({"output_dir", "device", "log_every", "save_every", "eval_every", "eval_batch_size",
                                  "max_windows", "teacher", "method", "cache_dir"}) | _MASK_ONLY | _DISTIL_ONLY)
_FINGERPRINT_VERSION = "teacher-v1"
_CORNER_LIMIT = 4096  # above this many corners of the search box only single extremes are checked
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class SpaceError(ValueError):
    """A search-space file is invalid; the one-line message names the file and the key path."""


# --------------------------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """How one config key is searched.

    ``choice``/``grid`` use ``values``; ``uniform``, ``loguniform`` and ``randint`` (integers, both bounds
    inclusive) use ``low``/``high``; ``quniform`` also ``q`` (the step; ``low`` and ``high`` are multiples of it).
    """

    type: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] | None = None
    q: float | None = None

    def extremes(self) -> list[tuple[str, Any]]:
        """(key-path suffix, value) pairs that bound the values a trial can get."""
        if self.values is not None:
            return [(f"values[{i}]", v) for i, v in enumerate(self.values)]
        return [("low", self.low), ("high", self.high)]

    def to_tune(self, enumerate_choices: bool = False) -> Any:
        """The Ray Tune sample object; ``enumerate_choices`` turns a choice into a grid (grid algorithm)."""
        from ray import tune

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


@dataclass(frozen=True)
class TeacherSpec:
    """Where the distillation teacher comes from.

    ``path``: an existing QA model directory used as is (need not exist when the space is loaded). When it is
    None the sweep first fine-tunes a dense teacher from ``base`` overlaid with ``config`` (method forced to dense).
    ``student_init``: prune the fine-tuned teacher itself rather than the pre-trained ``base.model`` (the paper
    starts from the pre-trained model; starting from the teacher reaches a usable F1 in a short CPU budget).
    """

    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    student_init: bool = False  # start every trial from the teacher's weights instead of base.model


@dataclass(frozen=True)
class SchedulerSpec:
    """An ASHA early-stopping scheduler; its time unit is ``training_iteration`` = one evaluation report."""

    type: str = "asha"
    metric: str = "f1"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    max_t: int = 100


@dataclass(frozen=True)
class SweepSpace:
    """A validated search space. Treat the dicts as read-only."""

    name: str  # default experiment name (the file's stem unless given)
    path: Path
    base: dict[str, Any]  # RunConfig values shared by every trial (and the teacher)
    teacher: TeacherSpec
    search: dict[str, ParamSpec]
    registry: RegistrySpec
    algorithm: str = "optuna"
    objectives: list[tuple[str, str]] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    scheduler: SchedulerSpec | None = None
    num_samples: int = 8
    max_concurrent: int | None = None  # None: as many as the resources allow
    resources: dict[str, float] = field(default_factory=lambda: dict(_RESOURCE_DEFAULTS))
    max_failures: int = 0  # retries of a failed trial
    speedup: dict[str, int] = field(default_factory=lambda: dict(_SPEEDUP_DEFAULTS))
    seed: int | None = None  # seed of the search algorithm's sampler; None: base seed
    # The hypervolume's reference value per objective; objectives not listed take frontier.DEFAULT_REFERENCE.
    reference_point: dict[str, float] = field(default_factory=dict)

    @property
    def base_config(self) -> RunConfig:
        """The base values as a RunConfig (output_dir and teacher at their defaults)."""
        return config_from_dict(self.base, source=f"{self.path}: base")

    @property
    def search_seed(self) -> int:
        """The seed handed to the search algorithm's sampler."""
        return self.seed if self.seed is not None else self.base_config.seed


# --------------------------------------------------------------------------------------------------------------
# YAML reading
# --------------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads ``1e-4`` as a number (plain YAML 1.1 wants ``1.0e-4``) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _Ctx:
    """The file being read, for error messages."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, message: str) -> SpaceError:
        return SpaceError(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    def mapping(self, value: Any, key: str, allowed: Iterable[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a mapping, got {_kind(value)}")
        allowed = tuple(allowed)
        for k in value:
            if k not in allowed:
                where = f"{key}.{k}" if key else str(k)
                raise self.error(where, f"unknown key (allowed: {', '.join(allowed)})")
        return dict(value)

    def integer(self, value: Any, key: str, minimum: int) -> int:
        if not (_is_int(value) and value >= minimum):
            raise self.error(key, f"must be an integer >= {minimum}, got {value!r}")
        return int(value)

    def number(self, value: Any, key: str) -> float:
        if not _is_number(value):
            raise self.error(key, f"must be a number, got {value!r}")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
# Loading and validation
# --------------------------------------------------------------------------------------------------------------


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
    ctx = _Ctx(path)
    if not path.is_file():
        raise ctx.error("", "search-space file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        lines = str(err).replace('in "<unicode string>", ', "at ").strip().splitlines()
        raise ctx.error("", f"not valid YAML ({' '.join(line.strip() for line in lines[:3])})") from None
    if not isinstance(raw, Mapping):
        raise ctx.error("", f"expected a mapping of sweep keys at the top level, got {_kind(raw)}")
    top = ctx.mapping(raw, "", _TOP_KEYS)

    name = path.stem if top.get("name") is None else ctx.string(top["name"], "name")
    if not _NAME_RE.fullmatch(name):
        raise ctx.error("name", f"{name!r}: use letters, digits, '_', '.', '-' (it names directories)")

    base = _parse_base(ctx, top.get("base"))
    base_cfg = _config(ctx, "base", base)
    if base_cfg.method is Method.DENSE:
        raise ctx.error("base.method", "a sweep prunes: use topk, sigmoid_threshold or fisher (the teacher is the "
                                       "dense run)")

    algorithm = top.get("algorithm", "optuna")
    if algorithm not in ALGORITHMS:
        raise ctx.error("algorithm", f"unknown value {algorithm!r} (allowed: {', '.join(ALGORITHMS)})")
    search = _parse_search(ctx, top.get("search"), algorithm)
    _check_applicable(ctx, search, base_cfg)
    _check_extremes(ctx, base, search)

    teacher = _parse_teacher(ctx, top.get("teacher"), base)
    objectives = _parse_objectives(ctx, top.get("objectives"))
    sched = _parse_scheduler(ctx, top.get("scheduler"), base_cfg)
    resources = _parse_resources(ctx, top.get("resources"), base_cfg)
    registry = _parse_registry(ctx, top.get("registry"), name, base_cfg)
    speedup = _parse_speedup(ctx, top.get("speedup"), base_cfg)
    reference = _parse_reference(ctx, top.get("reference_point"), objectives)

    default_samples = 1 if algorithm == "grid" else 8
    num_samples = ctx.integer(top.get("num_samples", default_samples), "num_samples", 1)
    max_concurrent = top.get("max_concurrent")
    if max_concurrent is not None:
        max_concurrent = ctx.integer(max_concurrent, "max_concurrent", 1)
    max_failures = ctx.integer(top.get("max_failures", 0), "max_failures", 0)
    seed = top.get("seed")
    if seed is not None and not _is_int(seed):
        raise ctx.error("seed", f"must be an integer or null, got {seed!r}")

    return SweepSpace(name=name, path=path, base=base, teacher=teacher, search=search, algorithm=algorithm,
                      objectives=objectives, scheduler=sched, num_samples=num_samples, max_concurrent=max_concurrent,
                      resources=resources, max_failures=max_failures, registry=registry, speedup=speedup, seed=seed,
                      reference_point=reference)


def _message(err: ConfigError) -> str:
    """A ConfigError's message without its source prefix: ``key: what is wrong``."""
    message = str(err)
    return message[3:] if message.startswith("-: ") else message


def _config(ctx: _Ctx, key: str, values: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig; an error becomes a SpaceError at ``key.<the config key>``."""
    try:
        return config_from_dict(values, source="-", base=base)
    except ConfigError as err:
        raise SpaceError(f"{ctx.path}: {key}.{_message(err)}") from None


def _parse_base(ctx: _Ctx, value: Any) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ctx.error("base", f"expected a mapping of RunConfig keys, got {_kind(value)}")
    base = dict(value)
    for key in base:
        if key not in _KINDS or key == LAMBDA_KEY:
            raise ctx.error(f"base.{key}", "unknown RunConfig key")
    for key in _SWEEP_OWNED:
        if key in base:
            hint = "use teacher.path" if key == "teacher" else "every trial gets its own directory"
            raise ctx.error(f"base.{key}", f"is set by the sweep ({hint})")
    return base


def _parse_search(ctx: _Ctx, value: Any, algorithm: str) -> dict[str, ParamSpec]:
    if not isinstance(value, Mapping) or not value:
        raise ctx.error("search", "expected a non-empty mapping of searched RunConfig keys")
    search: dict[str, ParamSpec] = {}
    for key, spec in value.items():
        where = f"search.{key}"
        if key not in _KINDS:
            raise ctx.error(where, "not a RunConfig key")
        if key in _NOT_SEARCHABLE:
            raise ctx.error(where, "cannot be searched (it must be the same for every trial; set it in base)")
        search[key] = _parse_param(ctx, where, key, spec, algorithm)
    if LAMBDA_KEY in search:
        also = [k for k in ("lambda_attention", "lambda_ffn") if k in search]
        if also:
            raise ctx.error(f"search.{LAMBDA_KEY}",
                            f"sets lambda_attention and lambda_ffn; do not also search {also[0]}")
    return search


def _parse_param(ctx: _Ctx, where: str, key: str, spec: Any, algorithm: str) -> ParamSpec:
    if not isinstance(spec, Mapping):
        raise ctx.error(where, f"expected a mapping with a type ({', '.join(PARAM_TYPES)}), got {_kind(spec)}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ctx.error(f"{where}.type", f"unknown or missing type {kind!r} (allowed: {', '.join(PARAM_TYPES)})")
    field_kind = _KINDS[key]

    if kind in ("choice", "grid"):
        ctx.mapping(spec, where, ("type", "values"))
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ctx.error(f"{where}.values", f"must be a non-empty list, got {values!r}")
        if kind == "grid" and algorithm == "optuna":
            raise ctx.error(f"{where}.type", "grid needs algorithm random or grid (Optuna cannot enumerate a grid; "
                                             "use choice)")
        if algorithm == "optuna":
            for i, v in enumerate(values):
                if not (v is None or isinstance(v, (bool, int, float, str))):
                    raise ctx.error(f"{where}.values[{i}]", f"Optuna choices must be numbers, strings, booleans or "
                                                            f"null, got {v!r} (use algorithm random or grid)")
        canonical = [json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(canonical)) != len(canonical):
            raise ctx.error(f"{where}.values", "has duplicates")
        return ParamSpec(kind, values=tuple(values))

    if algorithm == "grid":
        raise ctx.error(f"{where}.type", f"{kind} cannot be enumerated by algorithm grid (use grid or choice)")
    allowed = ("type", "low", "high", "q") if kind == "quniform" else ("type", "low", "high")
    ctx.mapping(spec, where, allowed)
    for bound in ("low", "high"):
        if bound not in spec:
            raise ctx.error(f"{where}.{bound}", f"is required for type {kind}")
    low = ctx.number(spec["low"], f"{where}.low")
    high = ctx.number(spec["high"], f"{where}.high")
    if kind == "randint":
        if field_kind != "int":
            raise ctx.error(f"{where}.type", f"randint gives integers but {key} is not an integer key")
        if not (_is_int(low) and _is_int(high)):
            raise ctx.error(f"{where}.low", f"randint bounds must be integers, got {low!r}, {high!r}")
    elif field_kind != "float":
        raise ctx.error(f"{where}.type", f"{kind} gives floats but {key} is not a float key "
                                         f"(use {'randint, ' if field_kind == 'int' else ''}choice or grid)")
    if not low < high:
        raise ctx.error(f"{where}.low", f"must be < high ({low!r} >= {high!r})")
    if kind == "loguniform" and low <= 0:
        raise ctx.error(f"{where}.low", f"must be > 0 for loguniform, got {low!r}")
    q = None
    if kind == "quniform":
        if "q" not in spec:
            raise ctx.error(f"{where}.q", "is required for type quniform")
        q = ctx.number(spec["q"], f"{where}.q")
        if q <= 0:
            raise ctx.error(f"{where}.q", f"must be > 0, got {q!r}")
        for bound, v in (("low", low), ("high", high)):
            # Ray rounds samples to multiples of q: bounds off that lattice would let samples leave [low, high].
            if abs(v / q - round(v / q)) > 1e-9:
                raise ctx.error(f"{where}.{bound}", f"{v!r} is not a multiple of q={q!r}")
    return ParamSpec(kind, low=low, high=high, q=q)


def _check_applicable(ctx: _Ctx, search: Mapping[str, ParamSpec], base_cfg: RunConfig) -> None:
    """Reject searched keys the (fixed) method ignores: they would make trials that differ in nothing."""
    if "method" in search:
        for i, v in enumerate(search["method"].values or ()):
            if v == Method.DENSE.value:
                raise ctx.error(f"search.method.values[{i}]", "a sweep prunes: dense is the teacher, not a trial")
        return
    method = base_cfg.method
    for key in search:
        if ((key in _TOPK_ONLY and method is not Method.TOPK)
                or (key in _DENSITY_TARGET and method not in (Method.TOPK, Method.FISHER))
                or (key in _SIGMOID_ONLY and method is not Method.SIGMOID_THRESHOLD)
                or (key in _FISHER_ONLY and method is not Method.FISHER)
                or (key in _MOVEMENT_ONLY and method is Method.FISHER)
                or (key == "target_density" and base_cfg.target_flops is not None)):
            raise ctx.error(f"search.{key}", f"has no effect with method {method.value}"
                            + (" and a target_flops" if key == "target_density" and base_cfg.target_flops else ""))


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


def _check_plan(ctx: _Ctx, key: str, cfg: RunConfig) -> None:
    """The warm-up check the trainer makes, done here when the number of pruning steps is already known."""
    if not cfg.masked or cfg.max_steps is None or cfg.method is Method.FISHER:
        return
    initial, final = warmup_steps(cfg.initial_warmup, cfg.max_steps), warmup_steps(cfg.final_warmup, cfg.max_steps)
    if initial + final > cfg.max_steps:
        raise ctx.error(key, f"initial_warmup + final_warmup ({initial} + {final} steps) exceed the "
                             f"{cfg.max_steps} pruning steps")


def _check_extremes(ctx: _Ctx, base: Mapping[str, Any], search: Mapping[str, ParamSpec]) -> None:
    """Every extreme of every searched value, then every corner of the search box, must make a valid config."""
    base_cfg = _config(ctx, "base", base)
    for key, spec in search.items():
        for suffix, value in spec.extremes():
            where = f"search.{key}.{suffix}"
            try:
                cfg = config_from_dict(_overlay({key: value}, search), source="-", base=base_cfg)
            except ConfigError as err:
                raise ctx.error(where, f"{value!r} gives an invalid config ({_message(err)})") from None
            _check_plan(ctx, where, cfg)
    per_key = [[value for _, value in spec.extremes()] for spec in search.values()]
    if len(search) < 2 or math.prod(len(v) for v in per_key) > _CORNER_LIMIT:
        return
    for corner in itertools.product(*per_key):
        params = dict(zip(search, corner))
        label = ", ".join(f"{k}={v!r}" for k, v in params.items())
        try:
            cfg = config_from_dict(_overlay(params, search), source="-", base=base_cfg)
        except ConfigError as err:
            raise ctx.error("search", f"the combination {label} gives an invalid config ({_message(err)})") from None
        _check_plan(ctx, "search", cfg)


def _parse_teacher(ctx: _Ctx, value: Any, base: Mapping[str, Any]) -> TeacherSpec:
    if isinstance(value, str):  # shorthand: `teacher: path/to/model`
        value = {"path": value}
    spec = ctx.mapping(value, "teacher", ("path", "config", "student_init"))
    path = spec.get("path")
    overrides = spec.get("config")
    student_init = spec.get("student_init", False)
    if not isinstance(student_init, bool):
        raise ctx.error("teacher.student_init", f"must be true or false, got {student_init!r}")
    if path is not None:
        path = ctx.string(path, "teacher.path")
        if overrides:
            raise ctx.error("teacher.config", "is unused when teacher.path is set (the teacher is not trained)")
        return TeacherSpec(path=str(path), config={}, student_init=student_init)
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        raise ctx.error("teacher.config", f"expected a mapping of RunConfig keys, got {_kind(overrides)}")
    overrides = dict(overrides)
    for key in overrides:
        where = f"teacher.config.{key}"
        if key not in _KINDS or key == LAMBDA_KEY:
            raise ctx.error(where, "unknown RunConfig key")
        if key in _SWEEP_OWNED or key == "method":
            raise ctx.error(where, "is set by the sweep (the teacher is a dense run in its own directory)")
        if key in _MASK_ONLY or key in _DISTIL_ONLY:
            raise ctx.error(where, "does not apply to the dense teacher")
    spec_out = TeacherSpec(path=None, config=overrides, student_init=student_init)
    try:
        _teacher_values(base, spec_out, "teacher")
    except ConfigError as err:
        message = _message(err)
        key = message.split(":", 1)[0]
        raise SpaceError(f"{ctx.path}: teacher.config.{message}" if key in overrides
                         else f"{ctx.path}: teacher: {message}") from None
    return spec_out


def _parse_objectives(ctx: _Ctx, value: Any) -> list[tuple[str, str]]:
    if value is None:
        return list(DEFAULT_OBJECTIVES)
    if not isinstance(value, list) or not value:
        raise ctx.error("objectives", "expected a non-empty list of [metric, max|min] pairs")
    out: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        where = f"objectives[{i}]"
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise ctx.error(where, f"expected [metric, max|min], got {item!r}")
        if item[1] not in ("max", "min"):
            raise ctx.error(where, f"mode must be max or min, got {item[1]!r}")
        if any(item[0] == name for name, _ in out):
            raise ctx.error(where, f"{item[0]!r} is listed twice")
        out.append((item[0], item[1]))
    return out


def _parse_scheduler(ctx: _Ctx, value: Any, base_cfg: RunConfig) -> SchedulerSpec | None:
    if value is None:
        return None
    spec = ctx.mapping(value, "scheduler", ("type", "metric", "mode", "grace_period", "reduction_factor", "max_t"))
    if spec.get("type", "asha") != "asha":
        raise ctx.error("scheduler.type", f"unknown value {spec.get('type')!r} (allowed: asha)")
    metric = spec.get("metric", "f1")
    if metric not in EVAL_METRICS:
        raise ctx.error("scheduler.metric", f"{metric!r} is not reported at each evaluation "
                                            f"(allowed: {', '.join(EVAL_METRICS)})")
    mode = spec.get("mode", "max" if metric in ("exact_match", "f1", "heads_removed") else "min")
    if mode not in ("max", "min"):
        raise ctx.error("scheduler.mode", f"must be max or min, got {mode!r}")
    grace = ctx.integer(spec.get("grace_period", 1), "scheduler.grace_period", 1)
    factor = ctx.integer(spec.get("reduction_factor", 2), "scheduler.reduction_factor", 2)
    max_t = ctx.integer(spec.get("max_t", 100), "scheduler.max_t", 1)
    if grace > max_t:
        raise ctx.error("scheduler.grace_period", f"{grace} exceeds max_t {max_t}")
    if base_cfg.eval_every is None:
        raise ctx.error("scheduler", "ASHA acts on evaluation reports: set base.eval_every")
    return SchedulerSpec("asha", metric, mode, grace, factor, max_t)


def _parse_resources(ctx: _Ctx, value: Any, base_cfg: RunConfig) -> dict[str, float]:
    spec = ctx.mapping(value, "resources", ("cpu", "gpu"))
    out = dict(_RESOURCE_DEFAULTS)
    for key in ("cpu", "gpu"):
        if key in spec:
            v = ctx.number(spec[key], f"resources.{key}")
            if v < 0:
                raise ctx.error(f"resources.{key}", f"must be >= 0, got {v!r}")
            out[key] = float(v)
    if out["cpu"] == 0 and out["gpu"] == 0:
        raise ctx.error("resources", "a trial needs some cpu or gpu")
    if base_cfg.device.startswith("cuda") and out["gpu"] == 0:
        raise ctx.error("resources.gpu", f"base.device is {base_cfg.device} but trials get no GPU")
    if base_cfg.device == "cpu" and out["gpu"] > 0:
        raise ctx.error("resources.gpu", "base.device is cpu: a GPU per trial would sit idle")
    return out


def _parse_registry(ctx: _Ctx, value: Any, name: str, base_cfg: RunConfig) -> RegistrySpec:
    spec = ctx.mapping(value, "registry", ("name", "policy", *POLICIES.values()))
    reg_name = ctx.string(spec.get("name", name), "registry.name")
    policy = spec.get("policy", "best_f1_under_density")
    if policy not in POLICIES:
        raise ctx.error("registry.policy", f"unknown value {policy!r} (allowed: {', '.join(POLICIES)})")
    needed = POLICIES[policy]
    for key in set(POLICIES.values()):
        if key in spec and key != needed:
            raise ctx.error(f"registry.{key}", f"is not used by policy {policy} (it takes {needed})")
    max_density = max_f1_drop = max_latency_ms = None
    if needed == "max_latency_ms":
        if "max_latency_ms" not in spec:
            raise ctx.error("registry.max_latency_ms", f"is required by policy {policy}")
        max_latency_ms = ctx.number(spec["max_latency_ms"], "registry.max_latency_ms")
        if not max_latency_ms > 0:
            raise ctx.error("registry.max_latency_ms", f"must be > 0 (milliseconds), got {max_latency_ms!r}")
    elif needed == "max_density":
        max_density = ctx.number(spec.get("max_density", base_cfg.target_density), "registry.max_density")
        if not 0 < max_density <= 1:
            raise ctx.error("registry.max_density", f"must be in (0, 1], got {max_density!r}")
    else:
        if "max_f1_drop" not in spec:
            raise ctx.error("registry.max_f1_drop", f"is required by policy {policy}")
        max_f1_drop = ctx.number(spec["max_f1_drop"], "registry.max_f1_drop")
        if max_f1_drop < 0:
            raise ctx.error("registry.max_f1_drop", f"must be >= 0 (F1 points), got {max_f1_drop!r}")
    return RegistrySpec(reg_name, policy, max_density, max_f1_drop, max_latency_ms)


def _parse_reference(ctx: _Ctx, value: Any, objectives: list[tuple[str, str]]) -> dict[str, float]:
    names = [name for name, _ in objectives]
    spec = ctx.mapping(value, "reference_point", names)
    out = {key: float(ctx.number(v, f"reference_point.{key}")) for key, v in spec.items()}
    try:
        _reference_point(objectives, out)
    except ValueError as err:
        raise ctx.error("reference_point", str(err).removeprefix("reference_point: ")) from None
    return out


def _parse_speedup(ctx: _Ctx, value: Any, base_cfg: RunConfig) -> dict[str, int]:
    spec = ctx.mapping(value, "speedup", tuple(_SPEEDUP_DEFAULTS))
    out = dict(_SPEEDUP_DEFAULTS)
    for key in out:
        if key in spec:
            out[key] = ctx.integer(spec[key], f"speedup.{key}", 1)
    if base_cfg.model_config is not None:
        limit = base_cfg.model_config.get("max_position_embeddings", 512)
        if out["seq_len"] > limit:
            raise ctx.error("speedup.seq_len", f"{out['seq_len']} exceeds the model's max_position_embeddings {limit}")
    return out


# --------------------------------------------------------------------------------------------------------------
# Ray Tune objects
# --------------------------------------------------------------------------------------------------------------


def param_space(space: SweepSpace) -> dict[str, Any]:
    """The Tuner's ``param_space``: searched key -> Ray Tune sample object (``tune.uniform``, ...).

    With algorithm ``grid`` a ``choice`` is enumerated like a ``grid``. With algorithm ``random`` every ``grid``
    key is enumerated and the others are sampled ``num_samples`` times per grid point.
    """
    enumerate_choices = space.algorithm == "grid"
    return {key: spec.to_tune(enumerate_choices) for key, spec in space.search.items()}


def search_algorithm(space: SweepSpace, metric_names: Iterable[str] | None = None) -> Any:
    """The Ray search algorithm for ``space``.

    * ``optuna``: ``OptunaSearch`` with every objective (multi-objective when there are several; Optuna's TPE
      sampler, seeded), wrapped in a ``ConcurrencyLimiter`` when ``max_concurrent`` is set. Optuna is told each
      trial's last reported result, so the objectives must be in the trial's final report.
    * ``random`` / ``grid``: ``BasicVariantGenerator`` (seeded), which limits concurrency itself.

    Args:
        space: a loaded space.
        metric_names: the metrics a trial reports at its end; when given, every objective must be among them.

    Returns:
        A ``Searcher`` or ``SearchAlgorithm`` for ``TuneConfig(search_alg=...)``. Do not also pass
        ``max_concurrent_trials`` to ``TuneConfig``.

    Raises:
        SpaceError: an objective is not among ``metric_names``.
    """
    if metric_names is not None:
        known = set(metric_names)
        for i, (name, _) in enumerate(space.objectives):
            if name not in known:
                raise SpaceError(f"{space.path}: objectives[{i}]: {name!r} is not a metric the trials report "
                                 f"(reported: {', '.join(sorted(known))})")
    if space.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        metrics = [name for name, _ in space.objectives]
        modes = [mode for _, mode in space.objectives]
        if len(metrics) == 1:
            searcher = OptunaSearch(metric=metrics[0], mode=modes[0], seed=space.search_seed)
        else:
            searcher = OptunaSearch(metric=metrics, mode=modes, seed=space.search_seed)
        if space.max_concurrent is not None:
            return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)
        return searcher
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=space.max_concurrent or 0, random_state=space.search_seed)


def scheduler(space: SweepSpace) -> Any:
    """The trial scheduler: ``ASHAScheduler`` or None.

    ASHA's time unit is ``training_iteration``: one iteration is one evaluation report of the trainer (every
    ``base.eval_every`` steps, and once at the end). The scheduler carries its own ``metric``/``mode``: in Ray 2.60
    ``Tuner`` then needs ``TuneConfig(metric=None, mode=None)`` -- passing a metric there as well raises
    ``ValueError`` ("the scheduler you are using was already instantiated with their own metric and mode"), and
    ``TuneConfig.metric`` cannot hold the list a multi-objective ``OptunaSearch`` optimises anyway. So read the
    ``ResultGrid`` with explicit ``get_best_result(metric=..., mode=...)``.

    ``stop_last_trials`` is off: a trial that reaches ``max_t`` still runs to its end, so its final report (after
    packing) is never cut off; ``max_t`` only places the rungs. Note that ASHA ranks trials on one metric: in a
    density/F1 sweep it stops the sparse trials first, so keep it for smoke tests or F1-only searches.
    """
    if space.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = space.scheduler
    return ASHAScheduler(time_attr=TIME_ATTR, metric=s.metric, mode=s.mode, max_t=s.max_t,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor, stop_last_trials=False)


def tune_config_kwargs(space: SweepSpace, metric_names: Iterable[str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``ray.tune.TuneConfig`` that fit together (see :func:`scheduler` for why metric and
    mode are None)."""
    return {"search_alg": search_algorithm(space, metric_names), "scheduler": scheduler(space),
            "num_samples": space.num_samples, "metric": None, "mode": None}


# --------------------------------------------------------------------------------------------------------------
# Configs of the runs
# --------------------------------------------------------------------------------------------------------------


def trial_config(space: SweepSpace, params: Mapping[str, Any], output_dir: str | Path,
                 teacher: str | Path | None) -> RunConfig:
    """The RunConfig of one trial: ``base`` overlaid with the trial's sampled values.

    Searching ``alpha_distil`` without ``alpha_ce`` sets ``alpha_ce = 1 - alpha_distil`` (one "hardness" knob). The
    pseudo-key ``lambda`` sets both ``lambda_attention`` and ``lambda_ffn``. With ``teacher.student_init`` the
    trial starts from the teacher's weights (``model`` = ``teacher``; ``model_config`` and ``tokenizer`` cleared).

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
        return config_from_dict(values, source="-", base=space.base_config)
    except ConfigError as err:
        label = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise SpaceError(f"{space.path}: trial {label}: {_message(err)}") from None


def _teacher_values(base: Mapping[str, Any], teacher: TeacherSpec, output_dir: str) -> RunConfig:
    values = dict(base)
    values.update(teacher.config)
    # The teacher is a plain dense fine-tune; evaluation only at its end unless its config asks for more.
    values.update(method=Method.DENSE.value, teacher=None, fill_steps=0, output_dir=str(output_dir))
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
        return cfg
    except ConfigError as err:
        raise SpaceError(f"{space.path}: teacher.config: {_message(err)}") from None


def teacher_fingerprint(space: SweepSpace) -> str:
    """A stable 16-hex-digit hash of what determines the teacher, to reuse a teacher trained earlier.

    For a trained teacher it covers the model, data and every value of :func:`teacher_config` that can change
    the teacher's weights or its evaluation (not the output directory, device, feature cache, logging/checkpoint
    cadence, nor mask and distillation keys, which a dense run ignores). It hashes values, not file contents. For
    ``teacher.path`` it is the hash of that path.
    """
    if space.teacher.path is not None:
        payload: Any = {"path": space.teacher.path}
    else:
        values = config_to_dict(teacher_config(space, "-"))
        payload = {k: v for k, v in sorted(values.items()) if k not in _NOT_IN_FINGERPRINT}
    text = json.dumps([_FINGERPRINT_VERSION, payload], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

