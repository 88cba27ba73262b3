"""The Ray Tune objects a sweep runs a :class:`~workflows.space.SweepSpace` with: the Tuner's ``param_space``, the
search algorithm (Optuna's samplers, or Ray's grid and random search) and the trial scheduler.

Kept apart from the schema (:mod:`workflows.space`), which reads and checks a space without Ray: these need Ray Tune
and Optuna, which only the sweep imports.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from workflows.distinct import MAX_ENUMERATED, DistinctConfigurations, DistinctLimiter, EnqueueingOptunaSearch
from workflows.space import SamplerSpec, SpaceError, SweepSpace

__all__ = ["TIME_ATTR", "ladders", "param_space", "optuna_sampler", "search_algorithm", "scheduler",
           "tune_config_kwargs"]

TIME_ATTR = "training_iteration"  # one iteration = one evaluation report of the trainer


def ladders(space: SweepSpace) -> dict[str, tuple[Any, ...]] | None:
    """Every value of each searched key (:meth:`~workflows.space.ParamSpec.ladder`), which a repeated suggestion's
    nearest untried configuration is searched among; None when a key is continuous or the space has more
    configurations than that search takes (:data:`~workflows.distinct.MAX_ENUMERATED`: their values are never
    listed, so a wide ``randint`` costs nothing)."""
    size = space.configurations
    if size is None or size > MAX_ENUMERATED:
        return None
    return {key: spec.ladder() for key, spec in space.search.items()}


def param_space(space: SweepSpace) -> dict[str, Any]:
    """The Tuner's ``param_space``: searched key -> Ray Tune sample object (``tune.uniform``, ...).

    With algorithm ``grid`` a ``choice`` is enumerated like a ``grid``. With algorithm ``random`` every ``grid``
    key is enumerated and the others are sampled ``num_samples`` times per grid point.
    """
    enumerate_choices = space.algorithm == "grid"
    return {key: spec.to_tune(enumerate_choices) for key, spec in space.search.items()}


def optuna_sampler(spec: SamplerSpec | None, seed: int | None) -> Any:
    """The Optuna sampler ``spec`` names (TPE with Optuna's defaults when None), seeded with ``seed``."""
    import optuna

    spec = spec or SamplerSpec()
    startup = {} if spec.startup_trials is None else {"n_startup_trials": spec.startup_trials}
    if spec.type == "tpe":
        if not spec.multivariate:
            return optuna.samplers.TPESampler(seed=seed, **startup)
        with warnings.catch_warnings():  # Optuna marks the option experimental; it is documented and measured here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, **startup)
    if spec.type == "gp":
        return optuna.samplers.GPSampler(seed=seed, **startup)
    if spec.type == "nsga2":
        population = {} if spec.population_size is None else {"population_size": spec.population_size}
        return optuna.samplers.NSGAIISampler(seed=seed, **population)
    return optuna.samplers.RandomSampler(seed=seed)


def search_algorithm(space: SweepSpace, metric_names: Iterable[str] | None = None,
                     prior: Sequence[tuple[dict[str, Any], dict[str, float]]] = ()) -> Any:
    """The Ray search algorithm for ``space``.

    * ``optuna``: ``OptunaSearch`` with every objective (multi-objective when there are several) and the space's
      ``sampler`` (:func:`optuna_sampler`: TPE unless the space names another, seeded), wrapped in
      :class:`~workflows.distinct.DistinctConfigurations` (no configuration runs twice; a repeated suggestion is told
      the result its configuration has and, in a finite space, followed by the nearest untried configuration) and
      in a ``ConcurrencyLimiter`` (:class:`~workflows.distinct.DistinctLimiter`) when ``max_concurrent`` is set.
      Optuna is told each trial's last reported result, so the objectives must be in the trial's final report.
    * ``random`` / ``grid``: ``BasicVariantGenerator`` (seeded), which limits concurrency itself.

    Args:
        space: a loaded space.
        metric_names: the metrics a trial reports at its end; when given, every objective must be among them.
        prior: ``(configuration, objectives)`` of trials measured before (``optuna`` only): the sampler is told them
            before its first suggestion (:mod:`workflows.warm_start`).

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
        metrics = [name for name, _ in space.objectives]
        modes = [mode for _, mode in space.objectives]
        sampler = optuna_sampler(space.sampler, space.search_seed)
        if len(metrics) == 1:
            searcher = EnqueueingOptunaSearch(metric=metrics[0], mode=modes[0], sampler=sampler, prior=prior)
        else:
            searcher = EnqueueingOptunaSearch(metric=metrics, mode=modes, sampler=sampler, prior=prior)
        searcher = DistinctConfigurations(searcher, size=space.configurations, ladders=ladders(space),
                                          seed=space.search_seed)
        if space.max_concurrent is not None:
            return DistinctLimiter(searcher, max_concurrent=space.max_concurrent)
        return searcher
    if prior:
        raise SpaceError(f"{space.path}: algorithm {space.algorithm} learns from no earlier outcomes (use optuna)")
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
    s = space.scheduler
    return ASHAScheduler(time_attr=TIME_ATTR, metric=s.metric, mode=s.mode, max_t=s.max_t,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor, stop_last_trials=False)


def tune_config_kwargs(space: SweepSpace, metric_names: Iterable[str] | None = None,
                       prior: Sequence[tuple[dict[str, Any], dict[str, float]]] = ()) -> dict[str, Any]:
    """Keyword arguments for ``ray.tune.TuneConfig`` that fit together (see :func:`scheduler` for why metric and
    mode are None); ``prior`` as in :func:`search_algorithm`.

    With ``reuse_workers`` (the default) a trial that ends hands its worker process to the next trial
    (``reuse_actors``): a new process would import torch and transformers again (about 8 s on 2 CPU cores, the
    whole of a small trial) and set up its GPU anew. The trainable keeps nothing between trials; a worker that dies
    (a failed trial) is replaced. Tune gives a waiting trial a freed worker even when one is starting for it
    elsewhere, so trials shorter than a new worker's start stay on the nodes that already have workers."""
    return {"search_alg": search_algorithm(space, metric_names, prior), "scheduler": scheduler(space),
            "num_samples": space.num_samples, "metric": None, "mode": None, "reuse_actors": space.reuse_workers}
