"""One trial per configuration: a searcher wrapper that never runs a configuration twice.

A model-based sampler over a discrete space (``choice``, ``grid``-like ladders, ``randint``) suggests configurations
it has already seen, more so as it converges: of 200 TPE suggestions over a 48-configuration space, 34.5 were
distinct (median of 10 seeds; bench/RESULTS.md, "One trial per configuration"). Each repeat would be a whole
training run whose outcome the sweep already has. :class:`DistinctConfigurations` answers a repeated suggestion
with the result its configuration already has (or, while that trial still runs, with the result it will have) and
asks the sampler again, so every trial a sweep spends is a configuration it has not measured.

The sweep ends early, with a warning, when the sampler asks for nothing but repeats ``patience`` times in a row
while no trial runs, or when a finite space has no configuration left.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from ray.tune.search import Searcher

__all__ = ["DistinctConfigurations", "configuration_key", "DEFAULT_PATIENCE"]

logger = logging.getLogger(__name__)

DEFAULT_PATIENCE = 100  # repeats in a row, with no trial running, after which the search is over


def configuration_key(config: dict[str, Any]) -> str:
    """A configuration's identity: equal values give equal keys (nested dicts, any key order)."""
    return json.dumps(config, sort_keys=True, default=str)


def _outcome(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a repeat is told: the trial's last result without its config (it is the same configuration)."""
    return None if result is None else {k: v for k, v in result.items() if k != "config"}


class DistinctConfigurations(Searcher):
    """Wraps a ``Searcher`` so that each configuration it suggests becomes at most one trial.

    Args:
        searcher: the searcher that samples (e.g. ``OptunaSearch``).
        size: how many configurations the space has, when that is finite (None: a continuous key makes repeats
            practically impossible, and the space never runs out).
        patience: repeats in a row, while no trial runs, after which the search ends.

    Attributes:
        repeats: how many suggestions were repeats, answered without a trial.
    """

    def __init__(self, searcher: Searcher, size: int | None = None, patience: int = DEFAULT_PATIENCE) -> None:
        if size is not None and size < 1:
            raise ValueError(f"size must be >= 1 or None, got {size}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.searcher = searcher
        self.size = size
        self.patience = patience
        self.repeats = 0
        self._live: dict[str, str] = {}  # trial id -> configuration key of a trial that runs
        self._inner: dict[str, str] = {}  # trial id -> the id the wrapped searcher knows its suggestion by
        self._results: dict[str, dict[str, Any] | None] = {}  # configuration key -> last result (None: it failed)
        self._waiting: dict[str, list[str]] = {}  # key of a running configuration -> repeats waiting for its result
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
                return Searcher.FINISHED
            inner_id = trial_id if attempt == 0 else f"{trial_id}~{attempt}"
            config = self.searcher.suggest(inner_id)
            if config is None or config == Searcher.FINISHED:
                return config
            key = configuration_key(config)
            if key not in self._results and key not in self._live.values():
                self._live[trial_id] = key
                self._inner[trial_id] = inner_id
                return config
            self.repeats += 1
            if key in self._results:
                result = self._results[key]
                self.searcher.on_trial_complete(inner_id, result=copy.deepcopy(result), error=result is None)
                logger.info("the searcher suggested %s again: told its result, no trial run", key)
            else:
                self._waiting.setdefault(key, []).append(inner_id)
                logger.info("the searcher suggested %s again while it runs: it gets that trial's result", key)
        if self._live:  # their results may change the sampler's mind: ask again once one ends
            self._stalled = True
            return None
        logger.warning("the searcher suggested only configurations that already ran, %d times in a row: the search "
                       "is over after %d configurations", self.patience, len(self._results))
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.searcher.on_trial_result(self._inner.get(trial_id, trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(self._inner.pop(trial_id, trial_id), result=result, error=error)
        self._stalled = False
        key = self._live.pop(trial_id, None)
        if key is None:
            return
        outcome = None if error or not result else _outcome(result)
        self._results[key] = outcome
        for waiting in self._waiting.pop(key, []):
            self.searcher.on_trial_complete(waiting, result=copy.deepcopy(outcome), error=outcome is None)

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
