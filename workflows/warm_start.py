"""Warm start: a new sweep's sampler learns, before its first trial, what an earlier sweep of the space measured.

A sweep is often run again after something changed that moves its outcomes a little but not where the frontier
lies: another seed, a retrained teacher, more evaluation questions. Its sampler need not rediscover the landscape
from random trials: ``fineprune sweep --warm-start SWEEP`` reads the earlier sweep's trials from MLflow (the
sweep's own store, or the one ``--warm-start-tracking-uri`` names, only read) and tells them to the Optuna sampler
as finished trials (:class:`workflows.distinct.EnqueueingOptunaSearch` ``prior``), so it models them from its first
suggestion. They are not this sweep's trials: none is logged, counted or registered
again, and the sampler may run any of their configurations again, to measure it under the new conditions.

A trial is told when it has a value for every key searched now, each one a value the space can give
(:meth:`workflows.space.ParamSpec.parse_logged`), and a finite value of every objective. A failed trial is left out,
as is one of a space that searched other keys or values, or one run at another value of a key that the earlier sweep
searched and this space holds at one value (the log says how many and why). An earlier sweep with no trial left is a
one-line error.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pruning.config import config_to_dict
from workflows import record, tracking
from workflows.retry import DEFAULT_OUTAGE_LIMIT_S
from workflows.space import LAMBDA_KEY, SweepSpace, logged_as, trial_config

__all__ = ["WarmStartError", "WarmStart", "check_applicable", "prior_outcomes", "is_run_id"]

logger = logging.getLogger(__name__)

FLAG = "--warm-start"
_RUN_ID = re.compile(r"[0-9a-f]{32}")


class WarmStartError(ValueError):
    """The earlier sweep cannot warm-start this one (no such sweep, a space it cannot teach, nothing usable)."""


@dataclass(frozen=True)
class WarmStart:
    """What a sweep was told before its first trial: the earlier sweep's parent run and its usable trials."""

    sweep_run_id: str
    experiment: str
    outcomes: list[tuple[dict[str, Any], dict[str, float]]]  # (searched values, objective values) per trial
    store: str | None = None  # the tracking URI it was read from, when not the new sweep's own

    def describe(self) -> str:
        where = f", tracking URI {self.store}" if self.store else ""
        return f"{len(self.outcomes)} trials of sweep run {self.sweep_run_id} (experiment {self.experiment!r}{where})"

    def summary(self) -> dict[str, Any]:
        """What a sweep's summary says of it."""
        return {"sweep_run_id": self.sweep_run_id, "trials": len(self.outcomes),
                **({"tracking_uri": self.store} if self.store else {})}


def is_run_id(text: str) -> bool:
    """Whether ``text`` names an MLflow run (32 hex digits) rather than an experiment."""
    return bool(_RUN_ID.fullmatch(text))


LAMBDA_KEY_FIELD = "lambda_attention"  # the pseudo-key ``lambda`` sets lambda_attention and lambda_ffn alike


def _usable(run, space: SweepSpace) -> tuple[dict[str, Any], dict[str, float]] | str:
    """A trial run's ``(configuration, objectives)``, or why it cannot be told."""
    if run.data.tags.get(record.TAG_STATUS) == record.STATUS_FAILED or run.info.status == "FAILED":
        return "failed"
    config = {}
    for key, spec in space.search.items():
        text = run.data.params.get(f"{record.PARAM_SEARCHED}{key}")
        if text is None:
            return f"{key} not searched"
        try:
            config[key] = spec.parse_logged(text)
        except ValueError:
            return f"{key} outside the space"
    # A key the earlier sweep searched and this space holds at one value: only trials run at that value are this
    # space's configurations (a trial at another temperature is not one of a sweep that fixes it).
    held = None
    for name, text in run.data.params.items():
        key = name[len(record.PARAM_SEARCHED):]
        if not name.startswith(record.PARAM_SEARCHED) or key in space.search:
            continue
        held = held or config_to_dict(trial_config(space, config, output_dir="<trial>", teacher="<teacher>"))
        field = LAMBDA_KEY_FIELD if key == LAMBDA_KEY else key
        if field not in held:
            return f"{key} searched then, not a run setting now"
        now = held[field]
        if not logged_as(text, now):
            return f"{key} searched then, held at {record.flat_params({key: now})[key]} now"
    values = {}
    for name, _ in space.objectives:
        value = run.data.metrics.get(name)
        if value is None or not math.isfinite(value):
            return f"no {name}"
        values[name] = value
    return config, values


def check_applicable(space: SweepSpace) -> None:
    """Refuse a space whose search algorithm learns nothing from earlier outcomes (before anything is written)."""
    if space.algorithm != "optuna":
        raise WarmStartError(f"{FLAG}: only algorithm optuna learns from earlier outcomes; {space.path} has "
                             f"algorithm {space.algorithm}")


def prior_outcomes(client, space: SweepSpace, source: str, store: str | None = None,
                   limit: float = DEFAULT_OUTAGE_LIMIT_S) -> WarmStart:
    """The outcomes of the earlier sweep ``source`` (a sweep's parent run id, or an experiment: its latest sweep)
    that the sampler of ``space`` can be told, read through ``client`` (the new sweep's store), or from ``store``
    where that names another one (checked first by :func:`tracking.check_readable_store`), only read, once it
    answers within ``limit`` seconds.

    Raises:
        WarmStartError: the space's algorithm learns from nothing, ``source`` is not a sweep, or none of its trials
            fits the space.
    """
    check_applicable(space)
    store = record.portable_uri(store) if store else None
    if store == record.portable_uri(client.tracking_uri):
        store = None  # the sweep's own, named again
    if store is not None:
        client = tracking.client_for(store, current=False, limit=limit)
        tracking.check_reachable(client, limit)
    run_id = source if is_run_id(source) else None
    try:
        sweep = tracking.find_sweep(client, source, run_id, flag=FLAG)
    except ValueError as err:
        raise WarmStartError(str(err)) from None
    if sweep is None:
        raise WarmStartError(f"{FLAG} {source}: no experiment or sweep run of that name in {client.tracking_uri}"
                             f"{record.experiment_hint(client, source)}")
    experiment = client.get_experiment(sweep.info.experiment_id).name
    runs = tracking.trial_runs(client, experiment, sweep.info.run_id)
    outcomes, left_out = [], Counter()
    for run in runs:
        usable = _usable(run, space)
        if isinstance(usable, str):
            left_out[usable] += 1
        else:
            outcomes.append(usable)
    why = ", ".join(f"{count} {reason}" for reason, count in left_out.most_common())
    if not outcomes:
        raise WarmStartError(f"{FLAG} {source}: none of the {len(runs)} trials of sweep run {sweep.info.run_id} "
                             f"(experiment {experiment!r}) fits {space.path}" + (f" ({why})" if why else ""))
    warm = WarmStart(sweep.info.run_id, experiment, outcomes, store)
    logger.info("the sampler starts from %s%s", warm.describe(), f"; left out: {why}" if why else "")
    return warm
