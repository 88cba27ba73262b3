"""One trial per configuration: a searcher wrapper that never runs a configuration twice.

A model-based sampler over a discrete space (``choice``, ``grid``-like ladders, ``randint``) suggests configurations
it has already seen, more so as it converges: of 200 TPE suggestions over a 48-configuration space, 34.5 were
distinct (median of 10 seeds; bench/RESULTS.md, "One trial per configuration"). Each repeat would be a whole
training run whose outcome the sweep already has. :class:`DistinctConfigurations` answers a repeated suggestion
with the result its configuration already has (or, while that trial still runs, with the result it will have) and
asks the sampler again, so every trial a sweep spends is a configuration it has not measured.

In a finite space (every searched key a ``choice``, ``randint`` or ``quniform``) a repeat means the sampler is sure
where the frontier is, and asking it again mostly brings the same configuration back. There the next trial is the
configuration nearest the repeated one that has not run (:func:`nearest_untried`: fewest steps along the keys' sorted
values), which the sampler is told to suggest next: the budget goes to the neighbourhood the sampler trusts, and the
sampler learns from the result like any of its own. On the measured grid of bench/RESULTS.md this took GP from
stopping short of the grid's hypervolume to reaching it ("Nearest untried configuration").

The sweep ends early, with a warning, when the sampler asks for nothing but repeats ``patience`` times in a row
while no trial runs, or when a finite space has no configuration left.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import numbers
import random
from typing import Any, Mapping, Sequence

import optuna as ot
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import flatten_dict

__all__ = ["DistinctConfigurations", "EnqueueingOptunaSearch", "configuration_key", "nearest_untried", "snap",
           "DEFAULT_PATIENCE", "MAX_ENUMERATED"]

logger = logging.getLogger(__name__)

DEFAULT_PATIENCE = 100  # repeats in a row, with no trial running, after which the search is over
MAX_ENUMERATED = 100_000  # a finite space larger than this is not searched for a nearest untried configuration

Ladders = Mapping[str, Sequence[Any]]  # searched key -> every value it can take (numbers: in ascending order)


def configuration_key(config: dict[str, Any]) -> str:
    """A configuration's identity: equal values give equal keys (nested dicts, any key order)."""
    return json.dumps(config, sort_keys=True, default=str)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _ordered(values: Sequence[Any]) -> bool:
    """A ladder of numbers: its values are steps apart; any other ladder is a set of unrelated values."""
    return all(_is_number(v) for v in values)


def _rank(values: Sequence[Any], value: Any) -> int:
    """The position of ``value`` in a ladder: the nearest number of an ordered one, the equal value otherwise (-1
    when there is none)."""
    if _ordered(values) and _is_number(value):
        return min(range(len(values)), key=lambda i: abs(float(values[i]) - float(value)))
    key = configuration_key(value)
    return next((i for i, v in enumerate(values) if configuration_key(v) == key), -1)


def snap(config: Mapping[str, Any], ladders: Ladders) -> dict[str, Any]:
    """``config`` with each laddered key's value replaced by the ladder's own (0.7000000000000001 becomes 0.7), so
    that one configuration has one key however the sampler rounded it."""
    out = dict(config)
    for key, values in ladders.items():
        if key in out and (i := _rank(values, out[key])) >= 0:
            out[key] = values[i]
    return out


def nearest_untried(config: Mapping[str, Any], ladders: Ladders, tried: set[str], rng: random.Random,
                    limit: int = MAX_ENUMERATED) -> dict[str, Any] | None:
    """The configuration nearest ``config`` whose :func:`configuration_key` is not in ``tried``.

    Distance is the number of steps: along a numeric key's sorted values, one per position; a key of other values
    (strings, lists) counts one when its value differs. Ties are broken by ``rng``. Keys of ``config`` outside
    ``ladders`` keep their values.

    Returns:
        The configuration, or None when every configuration was tried or the space has more than ``limit``.
    """
    keys = list(ladders)
    sizes = [len(ladders[k]) for k in keys]
    if not keys or math.prod(sizes) > limit:
        return None
    here = [_rank(ladders[k], config.get(k)) for k in keys]
    ordered = [_ordered(ladders[k]) for k in keys]
    best: list[tuple[int, ...]] = []
    best_distance = math.inf
    for point in itertools.product(*(range(n) for n in sizes)):
        distance = sum(abs(i - h) if o and h >= 0 else int(i != h) for i, h, o in zip(point, here, ordered))
        if distance > best_distance:
            continue
        candidate = {**config, **{k: ladders[k][i] for k, i in zip(keys, point)}}
        if configuration_key(candidate) in tried:
            continue
        if distance < best_distance:
            best, best_distance = [], distance
        best.append(point)
    if not best:
        return None
    return {**config, **{k: ladders[k][i] for k, i in zip(keys, rng.choice(best))}}


def _outcome(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a repeat is told: the trial's last result without its config (it is the same configuration)."""
    return None if result is None else {k: v for k, v in result.items() if k != "config"}


class DistinctConfigurations(Searcher):
    """Wraps a ``Searcher`` so that each configuration it suggests becomes at most one trial.

    Args:
        searcher: the searcher that samples (e.g. ``OptunaSearch``). When it has an ``enqueue(config)`` method
            (:class:`EnqueueingOptunaSearch`) and ``ladders`` are given, a repeat is followed by the nearest
            untried configuration.
        size: how many configurations the space has, when that is finite (None: a continuous key makes repeats
            practically impossible, and the space never runs out). Defaults to the ladders' product.
        patience: repeats in a row, while no trial runs, after which the search ends.
        ladders: every value of each searched key, for a finite space (:func:`workflows.tune_search.ladders`).
        seed: for the choice among equally near untried configurations.

    Attributes:
        repeats: how many suggestions were repeats, answered without a trial.
        over: None while the search goes on; ``"exhausted"`` once every configuration of the space has run (or
            runs), ``"converged"`` once the sampler offered only repeats ``patience`` times in a row. Either way
            the sweep is complete with fewer trials than it asked for.
    """

    def __init__(self, searcher: Searcher, size: int | None = None, patience: int = DEFAULT_PATIENCE,
                 ladders: Ladders | None = None, seed: int | None = None) -> None:
        if ladders is not None and any(not values for values in ladders.values()):
            raise ValueError("every ladder needs at least one value")
        if size is None and ladders is not None:
            size = math.prod(len(values) for values in ladders.values())
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1 or None, got {size}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.searcher = searcher
        self.size = size
        self.patience = patience
        self.ladders = None if ladders is None else {k: list(v) for k, v in ladders.items()}
        self.rng = random.Random(seed)
        self.repeats = 0
        self.steered = 0  # untried configurations the searcher was told to suggest next, each after a repeat
        self.over: str | None = None  # why the search ended: "exhausted" (every configuration ran) or "converged"
        self._live: dict[str, str] = {}  # trial id -> configuration key of a trial that runs
        self._inner: dict[str, str] = {}  # trial id -> the id the wrapped searcher knows its suggestion by
        self._results: dict[str, dict[str, Any] | None] = {}  # configuration key -> last result (None: it failed)
        self._waiting: dict[str, list[str]] = {}  # key of a running configuration -> repeats waiting for its result
        self._configs: dict[str, dict[str, Any]] = {}  # trial id -> configuration, while it runs or after it failed
        self._failed: dict[str, str] = {}  # trial id -> configuration key of a trial that failed (it may run again)
        self._stalled = False  # only repeats came: ask again once a trial ends
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    # ---- what Tune asks ----------------------------------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        done = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return done

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._stalled:
            return None
        for attempt in range(self.patience):
            if self.size is not None and len(self._results) + len(self._live) >= self.size:
                logger.info("every one of the space's %d configurations has run: the search is over", self.size)
                self.over = "exhausted"
                return Searcher.FINISHED
            inner_id = trial_id if attempt == 0 else f"{trial_id}~{attempt}"
            config = self.searcher.suggest(inner_id)
            if config is None or config == Searcher.FINISHED:
                return config
            key = self._key(config)
            if key not in self._results and key not in self._live.values():
                self._live[trial_id] = key
                self._inner[trial_id] = inner_id
                self._configs[trial_id] = copy.deepcopy(config)
                return config
            self.repeats += 1
            if key in self._results:
                result = self._results[key]
                self._tell(inner_id, copy.deepcopy(result), error=result is None)
                logger.info("the searcher suggested %s again: told its result, no trial run", key)
            else:
                self._waiting.setdefault(key, []).append(inner_id)
                logger.info("the searcher suggested %s again while it runs: it gets that trial's result", key)
            self._steer(config)
        if self._live:  # their results may change the sampler's mind: ask again once one ends
            self._stalled = True
            return None
        logger.warning("the searcher suggested only configurations that already ran, %d times in a row: the search "
                       "is over after %d configurations", self.patience, len(self._results))
        self.over = "converged"
        return Searcher.FINISHED

    def _key(self, config: dict[str, Any]) -> str:
        return configuration_key(config if self.ladders is None else snap(config, self.ladders))

    def _steer(self, repeated: dict[str, Any]) -> None:
        """Tell the searcher to suggest, next, the untried configuration nearest to the one it repeated."""
        enqueue = getattr(self.searcher, "enqueue", None)
        if self.ladders is None or enqueue is None:
            return
        tried = set(self._results) | set(self._live.values())
        nearest = nearest_untried(snap(repeated, self.ladders), self.ladders, tried, self.rng)
        if nearest is not None:
            enqueue(nearest)
            self.steered += 1
            logger.info("next: %s, the nearest configuration not yet run", configuration_key(nearest))

    def failed(self, trial_id: str) -> bool:
        """Whether ``trial_id`` is a trial that failed, and that a resumed sweep may run again."""
        return trial_id in self._failed

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        # A failed trial that runs again (a resumed sweep) stays failed until it completes: the searcher has the
        # failure on record and no open trial to report to.
        if trial_id in self._failed:
            return
        # An evaluation before the trial's end lacks an objective reported at the end only (speedup): the searcher
        # reads it from the final result (single-objective Optuna read each result's, and stopped at the first).
        if not self._holds_objectives(result):
            return
        self.searcher.on_trial_result(self._inner.get(trial_id, trial_id), result)

    def _holds_objectives(self, result: dict[str, Any]) -> bool:
        """Whether ``result`` holds every metric the searcher optimises."""
        metric = self.searcher.metric
        return all(name in result for name in ([metric] if isinstance(metric, str) else metric or []))

    def _tell(self, inner_id: str, result: dict[str, Any] | None, error: bool) -> None:
        """Tell the searcher how a trial (or a repeat of its configuration) ended. A trial the scheduler stopped
        before its end, where objectives such as speedup are reported, ends without them: it is told as pruned (no
        result, no error); told its partial result, Optuna refused the missing value, with a warning, and kept the
        trial running in its study, unseen by the sampler."""
        if not error and result is not None and not self._holds_objectives(result):
            result = None
        self.searcher.on_trial_complete(inner_id, result=result, error=error)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        # Tune ran a failed trial again, under its id and without a suggest (``resume_errored``).
        rerun = self._failed.pop(trial_id, None)
        if rerun is None:
            self._tell(self._inner.pop(trial_id, trial_id), result, error)
        self._stalled = False
        key = self._live.pop(trial_id, None) or rerun
        if key is None:
            return
        outcome = None if error or not result else _outcome(result)
        self._results[key] = outcome
        if outcome is None:
            self._failed[trial_id] = key
        else:
            config = self._configs.pop(trial_id, None)
            add = getattr(self.searcher, "add_outcome", None)
            if rerun is not None and config is not None and add is not None:
                add(config, outcome)  # the searcher learns the result it was told was a failure
        for waiting in self._waiting.pop(key, []):
            self._tell(waiting, copy.deepcopy(outcome), error=outcome is None)

    def add_evaluated_point(self, parameters: dict, value: float, error: bool = False, pruned: bool = False,
                            intermediate_values: list[float] | None = None) -> None:
        self.searcher.add_evaluated_point(parameters, value, error, pruned, intermediate_values)

    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(self._inner.get(trial_id, trial_id))

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(self._inner.get(trial_id, trial_id))

    # ---- saved with the sweep (Tune saves a wrapper's state beside its innermost searcher's) ----------------------

    def get_state(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


class DistinctLimiter(ConcurrencyLimiter):
    """``ConcurrencyLimiter`` over :class:`DistinctConfigurations` that also passes on the completion of a failed
    trial a resumed sweep runs again. Tune runs it without asking for a configuration, so Ray's limiter, which
    passes on only the trials it let through, would drop it, and its configuration would stay failed for the
    search."""

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self.live_trials and self.searcher.failed(trial_id):
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


class EnqueueingOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that can be told the configuration to suggest next, as Ray's own ``points_to_evaluate``
    are: the configuration waits in the study's queue, and the sampler learns its result like any other.

    ``prior``: outcomes measured before this search, as ``(configuration, result)`` pairs (an earlier sweep's
    trials, :mod:`workflows.warm_start`). They join the study as finished trials before its first suggestion, so
    the sampler models them from the start; they are not this search's trials, and a configuration among them can
    still run (Ray's ``evaluated_rewards`` take one objective)."""

    def __init__(self, *args: Any, prior: Sequence[tuple[dict[str, Any], dict[str, Any]]] = (), **kwargs: Any):
        self._prior = [(copy.deepcopy(config), dict(result)) for config, result in prior]
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list[str]) -> None:
        super()._setup_study(mode)
        for config, result in self._prior:
            self.add_outcome(config, result)

    def enqueue(self, config: dict[str, Any]) -> None:
        self._ot_study.enqueue_trial(flatten_dict(config))

    def add_outcome(self, config: dict[str, Any], result: dict[str, Any]) -> None:
        """Add a finished trial of ``config`` to the study (``add_evaluated_point`` takes a single objective)."""
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(metric) for metric in metrics]
        if any(value is None for value in values):
            return
        params = flatten_dict(config)
        self._ot_study.add_trial(ot.trial.create_trial(
            state=ot.trial.TrialState.COMPLETE, values=values,
            params={k: v for k, v in params.items() if k in self._space},
            distributions={k: d for k, d in self._space.items() if k in params}))
