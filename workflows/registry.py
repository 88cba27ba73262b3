"""Registering a sweep's packed models as versions of an MLflow pyfunc model, and choosing the champion.

Selection policies (pure, see :func:`select_champion`):
  * ``best_f1_under_density``: highest F1 among trials with ``linear_density <= max_density``;
  * ``min_density_within_f1_drop``: lowest linear density among trials within ``max_f1_drop`` F1 of dense;
  * ``fastest_within_f1_drop``: highest measured speedup among trials within ``max_f1_drop`` F1 of dense;
  * ``best_f1_under_latency``: highest F1 among registered versions whose latency, measured on this machine,
    is at most ``max_latency_ms`` (see :func:`select_by_latency`).

A version is made of the served model logged on its trial's run (:mod:`workflows.logged_model`: the packed weights,
the tokenizer and this project's QA post-processing, logged as code, with the model exported for ONNX Runtime
and served as int8 or fp32 as :mod:`workflows.int8_check` decides); the export and that check run once, when the
version is made. The policy's ``onnx: false`` (or ``fineprune register --no-onnx``) skips the export: such versions
serve through PyTorch, tagged ``skipped``. A version records the precision its EM/F1 were measured in (tag and
``model_config`` ``precision``: ``fp32`` or ``bf16``, from the trial).

Every point of the sweep's Pareto frontiers becomes a version (:func:`register_frontier`), tagged with its EM,
F1, densities, heads removed, speedup, precision, the trial's run id and the sweep's run id. The champion gets the alias
``champion``; no other version gets an alias unless :func:`select_by_latency` is asked to set one. Registering
the same trial twice adds no version, and a trial's served model is logged on its run once: a version of it under
another name, or made again (its version deleted, or a registration stopped before making it), reuses that model
when it serves as asked (exported for ONNX Runtime, or ``skipped``) and as one logged now would (its ``model_config``:
windows, span search, limits, ONNX variant and precision); a model logged with other settings (before they came
from the packed model's record, say) is left as it is and a new one logged, with a line saying so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pruning import atomic
from pruning.errors import error_line
from workflows import record
from workflows.int8_check import CHECK_TAGS, checked_variant, served_figures, variant_run
from workflows.logged_model import (ONNX_SKIPPED, UnreadableTrial, export_for_serving, fluent_store, log_qa_model,
                                    logged_qa_model, measured_precision, packed_model_of, settings_of)
from workflows.record import (ALIAS, DEFAULT_MAX_INT8_F1_DROP, EXACT_MATCH, F1, FINAL_METRICS, FORMER_POLICY_TAGS,
                              FRONTIER_TAGS, KIND_BASELINE, LINEAR_DENSITY, NULL_METRICS, PARAM_RESOURCES,
                              PARAM_SPEEDUP, REMOVED, RUNTIMES, SPEEDUP, STATUS_FINISHED, STATUS_INTERRUPTED,
                              TAG_CHAMPION_UNTIL, TAG_FINEPRUNE_VERSION, TAG_ONNX, TAG_ONNX_VARIANT, TAG_POLICY,
                              TAG_POLICY_THRESHOLD,
                              TAG_STATUS, TAG_SWEEP_RUN, TAG_TRIAL_RUN, TAG_VERSION_PRECISION, RegistrySpec,
                              deleted_source, metric_tag, run_deleted)
from workflows.space import load_space
from workflows.version_files import checked_once, version_files_lost
from workflows.version_timing import SeqLenError, latency_settings, time_versions

__all__ = ["POLICIES", "select_champion", "register_champion", "register_frontier", "register_from_experiment",
           "register_sweep", "select_by_latency", "check_alias", "SelectionError", "policy_choice",
           "no_trial_finished", "left_to_run"]

logger = logging.getLogger(__name__)

POLICIES = ("best_f1_under_density", "min_density_within_f1_drop", "fastest_within_f1_drop", "best_f1_under_latency")


class SelectionError(ValueError):
    """No registered version meets a latency budget, or the model to choose from does not exist."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_alias(alias: str) -> None:
    """A one-line :class:`SelectionError` for an alias the registry would refuse (empty, bad characters, too long,
    ``latest`` or a version's ``vN``), before anything is loaded or timed."""
    from mlflow.utils import validation

    try:
        validation._validate_model_alias_name(alias)
        validation._validate_model_alias_name_reserved(alias)
    except MlflowException as err:
        # MLflow's message repeats the alias, whose line break (if it has one) would end the message there.
        raise SelectionError(f"--alias {alias!r}: {' '.join(str(err.message).split())}") from None


def select_champion(points: list[dict[str, Any]], policy: str, dense_f1: float | None = None,
                    max_density: float | None = None, max_f1_drop: float | None = None,
                    max_latency_ms: float | None = None) -> dict[str, Any] | None:
    """The point a policy chooses, or None when no point qualifies.

    Args:
        points: trial results with ``f1``, ``linear_density``, (for ``fastest_...``) ``speedup`` and (for
            ``best_f1_under_latency``) a measured ``latency_ms``.
        policy: one of :data:`POLICIES`.
        dense_f1: F1 of the dense baseline (needed by the F1-drop policies).
        max_density: density cap of ``best_f1_under_density``.
        max_f1_drop: allowed F1 drop of the F1-drop policies.
        max_latency_ms: latency budget of ``best_f1_under_latency``; ties in F1 go to the faster point.
    """
    if policy not in POLICIES:
        raise ValueError(f"registry.policy: unknown policy {policy!r} (allowed: {', '.join(POLICIES)})")
    if policy == "best_f1_under_latency":
        if max_latency_ms is None:
            raise ValueError(f"registry.policy: {policy} needs max_latency_ms")
        pool = [p for p in points if _finite(p.get(F1)) and _finite(p.get("latency_ms"))
                and p["latency_ms"] <= max_latency_ms]
        return max(pool, key=lambda p: (p[F1], -p["latency_ms"]), default=None)
    valid = [p for p in points if _finite(p.get(F1)) and _finite(p.get(LINEAR_DENSITY))]
    if policy == "best_f1_under_density":
        cap = 1.0 if max_density is None else max_density
        pool = [p for p in valid if p[LINEAR_DENSITY] <= cap + 1e-9]
        return max(pool, key=lambda p: (p[F1], -p[LINEAR_DENSITY]), default=None)
    if dense_f1 is None or max_f1_drop is None:
        raise ValueError(f"registry.policy: {policy} needs the dense F1 and max_f1_drop")
    pool = [p for p in valid if p[F1] >= dense_f1 - max_f1_drop]
    if policy == "min_density_within_f1_drop":
        return min(pool, key=lambda p: (p[LINEAR_DENSITY], -p[F1]), default=None)
    pool = [p for p in pool if _finite(p.get(SPEEDUP))]
    return max(pool, key=lambda p: (p[SPEEDUP], p[F1]), default=None)


def register_champion(client, experiment: str, parent_run_id: str, spec: RegistrySpec,
                      dense_metrics: dict[str, Any] | None = None,
                      latency: dict[str, Any] | None = None, frontier_registered: bool = False) -> dict[str, Any]:
    """Select the champion among the sweep's finished trials and register its packed model (idempotent).

    With ``best_f1_under_latency`` the sweep's frontier is registered first (unless ``frontier_registered``: the
    caller has just registered it) and the champion is the most accurate of its versions within
    ``max_latency_ms``, timed here with ``latency`` (``batch_size``, ``seq_len``, ``threads``, ``repeats``; see
    :func:`select_by_latency`).
    """
    policy, name = spec.policy, spec.name
    if policy == "best_f1_under_latency":
        if not frontier_registered:
            register_frontier(client, experiment, parent_run_id, name, spec.onnx, spec.max_int8_f1_drop)
        try:
            chosen = select_by_latency(client, name, float(spec.max_latency_ms), alias=ALIAS,
                                       sweep_run_id=parent_run_id, **(latency or {}))
        except SelectionError as err:
            logger.warning("registry policy %s: %s; no champion", policy, err)
            _warn_alias_set_aside(client, name)
            return {"registered": False, "policy": policy, "name": name, "reason": str(err)}
        keep = ("name", "version", "model_uri", "run_id", F1, EXACT_MATCH, LINEAR_DENSITY, SPEEDUP, "served_by",
                "served_f1", "latency_ms", "served_speedup")
        moved = {"alias_moved_from": chosen["alias_moved_from"]} if "alias_moved_from" in chosen else {}
        # What it serves, as a registration's result names it: it was timed as it serves.
        return {"registered": True, "policy": policy, **{k: chosen.get(k) for k in keep}, **_null_figures(chosen),
                "onnx_variant": variant_run(chosen["served_by"]), **moved}

    runs = record.trials(client, parent_run_id)
    chosen = policy_choice(runs, spec, parent_run_id, (dense_metrics or {}).get(F1))
    if chosen is None:
        unfinished = no_trial_finished(runs)
        if unfinished is None:
            reason = f"no trial satisfies the registry policy {spec.describe()}"
        else:  # no policy could choose one: what the sweep has to do first, not what the policy asks
            uri = client.tracking_uri
            reason = f"no trial to choose: {unfinished}" + (
                f"; {record.resume_command(uri, parent_run_id)} runs what is left ({record.SPACE_PLACEHOLDER})"
                if left_to_run(runs) else "")
        logger.warning("experiment %r: %s; nothing registered", experiment, reason)
        _warn_alias_set_aside(client, name)
        return {"registered": False, "policy": policy, "name": name, "reason": reason}
    return register_run(client, chosen["run_id"], name, parent_run_id, policy, spec.onnx, spec.threshold(),
                        spec.max_int8_f1_drop)


def no_trial_finished(runs: pd.DataFrame) -> str | None:
    """What says that none of a sweep's trials (``runs``, :func:`record.trials`) finished with a packed model, so
    that no registry policy has one to choose, with how many there are and how they ended; None where one did."""
    trials = runs[runs["kind"] != KIND_BASELINE]
    if bool(((trials["status"] == STATUS_FINISHED) & trials["packed"]).any()):
        return None
    if not len(trials):
        return "no trial run of the sweep is left (none was recorded, or all were deleted)"
    if len(trials) == 1:
        return f"its one trial did not finish with a packed model ({trials['status'].iloc[0].replace('_', ' ')})"
    counts = trials["status"].value_counts().items()
    ended = ", ".join(f"{count} {status.replace('_', ' ')}" for status, count in counts)
    return f"none of its {len(trials)} trials finished with a packed model ({ended})"


def left_to_run(runs: pd.DataFrame) -> bool:
    """Whether a sweep's record holds trials that a resume runs again: interrupted, or never ended (running)."""
    return bool(runs.loc[runs["kind"] != KIND_BASELINE, "status"].isin((STATUS_INTERRUPTED, "running")).any())


def policy_choice(runs: pd.DataFrame, spec: RegistrySpec, parent_run_id: str,
                  dense_f1: float | None = None) -> dict[str, Any] | None:
    """The finished trial with a packed model among ``runs`` (the sweep ``parent_run_id``'s record,
    :func:`record.trials`) that the policy ``spec`` (not ``best_f1_under_latency``, which times versions) chooses,
    as a dict of its row, or None when none qualifies. ``dense_f1``: the dense baseline's F1 (default: its run's).

    Raises:
        record.RecordError: an F1-drop policy, and trials, but no F1 of the dense baseline to measure the drop from.
    """
    candidates = runs[(runs["kind"] != KIND_BASELINE) & (runs["status"] == STATUS_FINISHED) & runs["packed"]]
    points = [{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
              for row in candidates.to_dict("records")]
    if dense_f1 is None and F1 in runs.columns:
        baseline = runs.loc[runs["kind"] == KIND_BASELINE, F1].dropna()
        dense_f1 = float(baseline.iloc[0]) if len(baseline) else None
    if dense_f1 is None and spec.policy in ("min_density_within_f1_drop", "fastest_within_f1_drop"):
        if points:  # the policy cannot tell which of them are within its F1 drop
            raise record.RecordError(f"sweep run {parent_run_id} records no F1 of its dense baseline (no baseline "
                                     f"run with an f1 metric), which the registry policy {spec.policy} needs; "
                                     "nothing registered as champion (pass --space with another policy)")
        return None
    return select_champion(points, spec.policy, dense_f1=dense_f1, max_density=spec.max_density,
                           max_f1_drop=spec.max_f1_drop)


def _warn_alias_set_aside(client, name: str) -> None:
    """Say so when the champion alias, left where it was for want of a new champion, is on a version whose trial
    run or sweep run was deleted (set aside: no registration or selection would choose it now)."""
    try:
        current = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:  # no such model, or no champion
        return
    reason = deleted_source(client, current.tags, _trial_of(current), {})
    if reason is not None:
        logger.warning("alias %r of %s is left on version %s, which nothing chooses now: %s", ALIAS, name,
                       current.version, reason)


def _ensure_model(client, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Packed fine-pruned QA models chosen by fineprune sweeps")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # made meanwhile by a registration running beside this
                raise


def _trial_of(version) -> str | None:
    """The trial run a version was made from: its ``fineprune.trial_run_id`` tag, else (that tag removed by hand)
    the run MLflow records it was made on, which is the trial's."""
    return version.tags.get(TAG_TRIAL_RUN) or version.run_id or None


def _versions_of_trial(client, name: str, run_id: str) -> list:
    """The versions of ``name`` made from the trial run ``run_id`` by a registration, oldest first: searched by the
    store by the trial tag each is made with (a model with a long history holds thousands of versions)."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{TAG_TRIAL_RUN}` = '{run_id}'")
    return sorted(found, key=lambda v: int(v.version))


def _one_version(client, name: str, run_id: str, made) -> Any:
    """The version ``made`` of the trial ``run_id``, unless a registration running beside this one (another
    ``fineprune register``, a sweep) made one of the same trial first: then that one, and ``made`` is deleted, so
    that a trial is never two versions."""
    first = _versions_of_trial(client, name, run_id)[0]
    if int(first.version) < int(made.version):
        logger.info("trial run %s became version %s of %s meanwhile (another registration); version %s is deleted",
                    run_id, first.version, name, made.version)
        client.delete_model_version(name, made.version)
        return first
    return made


class LostVersion(UnreadableTrial):
    """A trial's version has lost files its served model loads (deleted from the artifact store by hand)."""


def _model_versions(client, name: str) -> list:
    """Every version of ``name``, in one search; none when the model does not exist yet."""
    try:
        return list(client.search_model_versions(f"name = '{name}'"))
    except MlflowException:  # no such model yet: nothing was registered
        return []


def _versions_by_trial(versions) -> dict[str, Any]:
    """``versions`` by the trial run each was made from (a trial's first version)."""
    out: dict[str, Any] = {}
    for version in sorted(versions, key=lambda v: int(v.version)):
        trial = _trial_of(version)
        if trial:
            out.setdefault(trial, version)
    return out


def _version_of_run(client, name: str, run, onnx: bool = True, known: dict[str, Any] | None = None,
                    max_int8_f1_drop: float | None = DEFAULT_MAX_INT8_F1_DROP,
                    tags: Mapping[str, str] | None = None) -> Any:
    """The version of ``name`` made from the trial ``run``: the existing one, else a new one of the served model
    logged on the trial's run: the one an earlier registration logged there (under another name, or stopped
    before its version was made), else one logged now from its ``packed_model`` artifact, exported for ONNX
    Runtime unless ``onnx`` is False (its ``onnx`` tag then reads ``skipped``), serving int8 when it loses at
    most ``max_int8_f1_drop`` F1 against fp32 (:func:`~workflows.int8_check.checked_variant`).

    ``known``: the model's versions by trial run (:func:`_versions_by_trial`), read once by a caller that
    registers several trials; a version made here is added to it. Default: searched here. ``tags``: a new
    version's trial tags (:func:`_trial_tags`), written as it is made rather than one by one after.
    """
    run_id = run.info.run_id
    if known is None:
        known = _versions_by_trial(_model_versions(client, name))
    if run_id in known:
        version = known[run_id]
        lost = version_files_lost(client, name, version.version)
        if lost is not None:  # deleted from the artifact store by hand: the version cannot be served
            raise LostVersion(f"version {version.version} of {name} (trial run {run_id}) cannot be served: {lost}; "
                              "delete the version and register again to make it anew from the trial's packed model")
        logger.info("trial run %s is already version %s of %s", run_id, version.version, name)
        return version
    version = _new_version_of_run(client, name, run, onnx, max_int8_f1_drop, tags)
    known[run_id] = version
    return version


def _new_version_of_run(client, name: str, run, onnx: bool,
                        max_int8_f1_drop: float | None = DEFAULT_MAX_INT8_F1_DROP,
                        tags: Mapping[str, str] | None = None) -> Any:
    """A new version of ``name`` made from the trial ``run``, with ``tags`` (see :func:`_version_of_run`)."""
    run_id = run.info.run_id
    # Not yet the tags that make it a version of its sweep, or of its frontier: a registration beside this one may
    # have made the trial's version first, and this one is then deleted (_one_version); until then, nothing that
    # looks for the sweep's versions should find it. The caller writes them once it is the one kept.
    tags = {**{key: value for key, value in (tags or {}).items() if key not in (TAG_SWEEP_RUN, *FRONTIER_TAGS)},
            TAG_TRIAL_RUN: run_id}
    settings = settings_of(client, run)
    logged = logged_qa_model(client, run, onnx, settings, max_int8_f1_drop)
    if logged is not None:
        logger.info("trial run %s: a new version of %s from the model logged on it before (%s)", run_id, name,
                    logged.model_id)
        with fluent_store(client.tracking_uri):  # which resolves the version's source, as below
            made = client.create_model_version(name, source=logged.model_uri, run_id=run_id,
                                               model_id=logged.model_id,
                                               tags={**tags, **_served_tags(logged.tags)})
        return _one_version(client, name, run_id, made)
    # The registry resolves the new version's source through the tracking store of the fluent API.
    with atomic.scratch_dir("register") as tmp, fluent_store(client.tracking_uri):
        local = packed_model_of(client, run_id, tmp)
        # Only here, for a new version: a registered trial is never exported again.
        what = f"the packed model of trial run {run_id}"
        variant, checked = "none", {TAG_ONNX_VARIANT: "none"}
        if onnx:
            onnx_dir, onnx_tag = export_for_serving(local, Path(tmp) / "onnx_model", what=what)
            if onnx_dir is not None:
                variant, checked = checked_variant(onnx_dir, run, settings, max_int8_f1_drop, what)
        else:
            onnx_dir, onnx_tag = None, ONNX_SKIPPED
            logger.info("the packed model of trial run %s: not exported for ONNX Runtime (onnx: false); it serves "
                        "through PyTorch", run_id)
        # The model is logged on the trial's run, which is reopened for it: its status and end are set back
        # however the logging ends (an error or Ctrl-C would leave it FAILED and ended now). A registration killed
        # outright leaves it RUNNING with its end kept; it ended as its fineprune.status tag says (a finished trial:
        # the only kind registered), which the next registration sets back.
        status = "FINISHED" if run.data.tags.get(TAG_STATUS) == STATUS_FINISHED else run.info.status
        interrupted = False
        try:
            with mlflow.start_run(run_id=run_id):
                info = log_qa_model(local, settings, onnx_dir, tags={TAG_ONNX: onnx_tag, **checked},
                                    variant=variant)
        except BaseException as err:
            interrupted = isinstance(err, KeyboardInterrupt) or isinstance(err.__context__, KeyboardInterrupt)
            if interrupted and not isinstance(err, KeyboardInterrupt):  # MLflow's ending of the run failed after it
                raise KeyboardInterrupt from err
            raise
        finally:
            if run.info.end_time:  # the trial's duration is part of the record
                _set_back(client, run_id, status, run.info.end_time, interrupted)
        made = client.create_model_version(name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                                           tags={**tags, **_served_tags(info.tags)})
    return _one_version(client, name, run_id, made)


# The tags a version takes from the served model it is made of: how it serves (exported or not, which ONNX variant
# and why), and the release whose code the model ships.
_SERVED_TAGS = (TAG_ONNX, *CHECK_TAGS, TAG_FINEPRUNE_VERSION)


def _served_tags(model_tags: Mapping[str, str]) -> dict[str, str]:
    """Of a logged served model's tags, those its versions carry (:data:`_SERVED_TAGS`)."""
    return {key: model_tags[key] for key in _SERVED_TAGS if key in model_tags}


def _set_back(client, run_id: str, status: str, end_time: int, interrupted: bool = False) -> None:
    """End the reopened trial run ``run_id`` as it had ended. A Ctrl-C while this is written (it lands here when
    the model's logging has just finished) would leave the run RUNNING: the write is made again, then the Ctrl-C
    goes on.

    After a Ctrl-C (``interrupted``) that landed inside one of MLflow's writes to a SQLite store, the database can
    stay locked by that write until the process ends: the run is then left as a killed registration leaves it,
    with one warning, for the next registration to set back, and the Ctrl-C goes on (not a traceback)."""
    try:
        try:
            client.set_terminated(run_id, status=status, end_time=end_time)
        except KeyboardInterrupt:
            client.set_terminated(run_id, status=status, end_time=end_time)
            raise
    except MlflowException as err:
        if not interrupted:
            raise
        _forget_active_run(run_id)
        logger.warning("trial run %s: not ended as it had ended (%s); the next registration ends it so",
                       run_id, error_line(err)[:200])


def _forget_active_run(run_id: str) -> None:
    """Drop ``run_id`` from this thread's active MLflow runs without ending it, where MLflow could not end it:
    otherwise MLflow ends it FAILED, and now, when the process exits (once the lock is gone), and its end as a
    trial is lost. (MLflow has no public call for this; without the stack it is left for the exit to end.)"""
    stack = getattr(mlflow.tracking.fluent, "_active_run_stack", None)
    runs = stack.get() if stack is not None else []
    if runs and runs[-1].info.run_id == run_id:
        runs.pop()


def _written_once(write, done) -> None:
    """Make one registry ``write`` that another registration (a second ``fineprune register``, a sweep's own) may be
    making at the same moment. MLflow's stores look a tag or alias up and then insert it, so when both find it
    missing the second insert breaks the store's unique key; that write was already made by the other, so ``done()``
    (read again from the store) accepts it, and a write that still differs is made once more, over the row now
    there. Any other failure raises from that second write."""
    try:
        write()
    except MlflowException:
        if not done():
            write()


def _set_version_tag(client, name: str, version, key: str, value: str) -> None:
    """Set tag ``key`` of ``version`` of ``name`` to ``value``, as :func:`_written_once` makes a write."""
    _written_once(lambda: client.set_model_version_tag(name, version, key, value),
                  lambda: (client.get_model_version(name, str(version)).tags or {}).get(key) == value)


def _set_alias(client, name: str, alias: str, version) -> None:
    """Point ``alias`` of ``name`` at ``version``, which another registration may be doing at the same moment."""
    def done() -> bool:
        try:
            return str(client.get_model_version_by_alias(name, alias).version) == str(version)
        except MlflowException:
            return False
    _written_once(lambda: client.set_registered_model_alias(name, alias, version), done)


def _move_alias(client, name: str, alias: str, version) -> Any:
    """Point ``alias`` of ``name`` at ``version`` (as :func:`_set_alias` does) and return the version it left: the
    model version it was on, as read before the move, or None when it was on no version or on ``version`` already."""
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:  # the alias is on no version yet (or that version was deleted by hand)
        current = None
    _set_alias(client, name, alias, version)
    return current if current is not None and str(current.version) != str(version) else None


def _null_figures(metrics: Mapping[str, float]) -> dict[str, float]:
    """The SQuAD v2.0 figures a trial's run holds (:data:`~workflows.record.NULL_METRICS`), for a registration's
    result; none for a trial scored on answerable questions alone."""
    return {key: metrics[key] for key in NULL_METRICS if key in metrics}


def _trial_tags(run, parent_run_id: str, extra: Mapping[str, str]) -> dict[str, str]:
    """A version's tags from its trial ``run``: its metrics, precision and run ids, and ``extra``."""
    metrics = run.data.metrics
    tags = {TAG_SWEEP_RUN: parent_run_id, TAG_TRIAL_RUN: run.info.run_id,
            TAG_VERSION_PRECISION: measured_precision(run), **extra}
    for key in (*FINAL_METRICS, *NULL_METRICS):
        if key in metrics:
            tags[key] = metric_tag(metrics[key])
    return tags


def _set_changed_tags(client, name: str, version, tags: Mapping[str, str]) -> None:
    """Write those of ``tags`` that ``version`` (as read) lacks or holds with another value: registering a sweep
    again writes nothing new, nor does tagging a version made with its trial's tags (:func:`_trial_tags`)."""
    current = version.tags or {}
    for key, value in tags.items():
        if current.get(key) != value:
            _set_version_tag(client, name, version.version, key, value)


def register_run(client, run_id: str, name: str, parent_run_id: str, policy: str,
                 onnx: bool = True, threshold: str = "",
                 max_int8_f1_drop: float | None = DEFAULT_MAX_INT8_F1_DROP) -> dict[str, Any]:
    """Register a trial run's packed model under ``name`` with alias ``champion``; reuse an existing version.

    ``onnx``: export a new version for ONNX Runtime (False: it serves through PyTorch), serving int8 when it loses
    at most ``max_int8_f1_drop`` F1 against fp32 (:class:`RegistrySpec`). The version is tagged with the ``policy``
    that chose it and its ``threshold`` (:meth:`RegistrySpec.threshold`).
    """
    _ensure_model(client, name)
    run = client.get_run(run_id)
    versions = _model_versions(client, name)  # one search: the trial's version, if it has one
    tags = _trial_tags(run, parent_run_id, {})
    try:
        version = _version_of_run(client, name, run, onnx, _versions_by_trial(versions), max_int8_f1_drop, tags)
    except LostVersion as err:
        raise LostVersion(f"{err}; alias {ALIAS!r} left where it was") from None
    _set_changed_tags(client, name, version, tags)
    left = _make_champion(client, name, version, {TAG_POLICY: policy, TAG_POLICY_THRESHOLD: threshold},
                          f"{policy} {threshold}".strip())
    uri = f"models:/{name}@{ALIAS}"
    metrics = run.data.metrics
    logger.info("registered %s (version %s, trial run %s)", uri, version.version, run_id)
    result = {"registered": True, "name": name, "version": str(version.version), "model_uri": uri,
              "run_id": run_id, "policy": policy, **{k: metrics.get(k) for k in (F1, EXACT_MATCH, LINEAR_DENSITY,
                                                                                    SPEEDUP)},
              **_null_figures(metrics), **served_figures(version.tags or {})}
    return result if left is None else {**result, "alias_moved_from": left}


def _make_champion(client, name: str, version, policy: dict[str, str], chosen_by: str | None = None) -> str | None:
    """Point the champion alias of ``name`` at ``version``, tag it with the ``policy`` tags that chose it, and keep
    one version saying a policy chose it: the alias's. In that order, from the model's versions as they are once
    the alias has moved: every other version holding the policy tags (the version the alias leaves, or one it left
    before versions lost them) keeps them under :data:`~workflows.record.FORMER_POLICY_TAGS`' names; the champion,
    champion again, loses those. Stopped before the alias moves (Ctrl-C), it changes no tag; run beside another
    choice of champion, it leaves the policy with the version the alias ends on (the tags were written first, from
    versions read before, and a version the alias never reached kept them).

    ``chosen_by``: the policy and threshold a registration chose ``version`` by (as its tags hold them, e.g.
    ``best_f1_under_density max_density 0.5``); None for
    ``fineprune select``, which is asked to move the alias. A registration that moves the alias off a version
    another choice put it on (``select``, another policy) or whose trial or sweep run was deleted or removed for
    good says so in a warning naming both versions, so what serves does not change without a word.

    Returns:
        The version the alias left, or None when it was on no other version.
    """
    current = _move_alias(client, name, ALIAS, version.version)
    left = None
    if current is not None:
        left = str(current.version)
        held = current.tags or {}
        before = f"{held.get(TAG_POLICY, '')} {held.get(TAG_POLICY_THRESHOLD, '')}".strip() \
            if held.get(TAG_POLICY) else "no policy"
        gone = deleted_source(client, held, _trial_of(current), {})
        line = (f"alias {ALIAS!r} of {name} moved from version {left} (chosen by {before}) to version "
                f"{version.version}" + (f" (chosen by {chosen_by})" if chosen_by else ""))
        if chosen_by is not None and (before != chosen_by or gone is not None):
            logger.warning("%s%s", line, f"; version {left}: {gone}" if gone else "")
        else:
            logger.info("%s", line)
    _set_changed_tags(client, name, version, policy)
    held = version.tags or {}
    for former in (*FORMER_POLICY_TAGS.values(), TAG_CHAMPION_UNTIL):
        if former in held:
            client.delete_model_version_tag(name, version.version, former)
    # The versions first, then the alias: a policy another command wrote on its version (after moving the alias
    # there) that this list holds is seen with the alias on that version, and left.
    versions = _model_versions(client, name)
    try:
        champion = str(client.get_model_version_by_alias(name, ALIAS).version)
    except MlflowException:  # the alias was deleted meanwhile (by hand): no version is the champion
        champion = None
    if champion != str(version.version):
        logger.warning("alias %r of %s was moved to version %s by another command while this one moved it to version "
                       "%s; it stays there", ALIAS, name, champion, version.version)
    for other in versions:
        tags = other.tags or {}
        if str(other.version) == champion:
            continue
        if TAG_POLICY in tags:  # the alias left it (now, or before versions lost their policy)
            _set_version_tag(client, name, other.version, TAG_CHAMPION_UNTIL, str(int(time.time() * 1000)))
        for key, former in FORMER_POLICY_TAGS.items():
            if key in tags:
                _set_version_tag(client, name, other.version, former, tags[key])
                client.delete_model_version_tag(name, other.version, key)
    return left


def register_frontier(client, experiment: str, parent_run_id: str, name: str, onnx: bool = True,
                      max_int8_f1_drop: float | None = DEFAULT_MAX_INT8_F1_DROP) -> list[dict[str, Any]]:
    """Register every finished trial on one of the sweep's Pareto frontiers as a version of ``name`` (idempotent).

    The frontiers are those the sweep tagged (``pareto``: the space's objectives; ``pareto_speedup``: F1 against
    measured speedup). A trial already registered keeps its version; its tags are refreshed. A version this sweep
    registered earlier whose trial has left the frontiers since (a resumed sweep's later trials dominate it) keeps
    its version and model but its frontier tags turn ``false``. A trial whose packed model is missing or cannot be
    read is left out with a warning; the other points are registered. No alias is set.
    ``onnx``: export each new version for ONNX Runtime (False: they serve through PyTorch), each serving int8 when
    it loses at most ``max_int8_f1_drop`` F1 against fp32 (see :class:`RegistrySpec`).

    Returns:
        One row per frontier version, sparsest first: ``version``, ``model_uri``, ``run_id``, the metrics, and what
        it serves (``onnx_variant``) with the F1 its check measured for that model (``served_f1``, see
        :func:`~workflows.int8_check.checked_variant`; None without the check).
    """
    frame = record.trials(client, parent_run_id, include_baseline=False)
    on_front = frame[list(FRONTIER_TAGS)].any(axis=1)
    chosen = frame[(frame["status"] == STATUS_FINISHED) & frame["packed"] & on_front]
    if LINEAR_DENSITY in chosen.columns:
        chosen = chosen.assign(_density=chosen[LINEAR_DENSITY].fillna(1.0))
    else:
        chosen = chosen.assign(_density=1.0)
    runs = [client.get_run(run_id) for run_id in chosen.sort_values(["_density", "run_id"])["run_id"]]
    if not runs:
        logger.warning("sweep run %s has no finished frontier trial with a packed model; nothing registered",
                       parent_run_id)
        _untag_left_frontier(client, name, parent_run_id, set(), _model_versions(client, name))
        return []
    _ensure_model(client, name)
    before = _model_versions(client, name)  # one search for the whole frontier
    known = _versions_by_trial(before)
    rows = []
    for run in runs:
        tags = _trial_tags(run, parent_run_id, {tag: run.data.tags.get(tag, "false") for tag in FRONTIER_TAGS})
        try:
            version = _version_of_run(client, name, run, onnx, known, max_int8_f1_drop, tags)
        except UnreadableTrial as err:  # one spoilt trial costs its own point, not the rest of the frontier
            logger.warning("%s; the frontier's other points are registered", err)
            continue
        _set_changed_tags(client, name, version, tags)
        rows.append({"version": str(version.version), "model_uri": f"models:/{name}/{version.version}",
                     "run_id": run.info.run_id, **{k: run.data.metrics.get(k) for k in FINAL_METRICS},
                     **_null_figures(run.data.metrics), **served_figures(version.tags or {})})
    # A point whose version cannot be served (its files gone) is still on the frontier: its tags stay.
    _untag_left_frontier(client, name, parent_run_id, {run.info.run_id for run in runs}, before)
    if not rows:
        logger.warning("no trial on the frontiers of sweep run %s could be registered as a version of %s",
                       parent_run_id, name)
        return rows
    logger.info("registered the %s on the frontiers of sweep run %s (of its objectives, and of F1 against measured "
                "speedup) as %s %s of %s", "trial" if len(rows) == 1 else f"{len(rows)} trials", parent_run_id,
                "version" if len(rows) == 1 else "versions", ", ".join(row["version"] for row in rows), name)
    return rows


def _on_frontier(tags: Mapping[str, str]) -> bool:
    """Whether a version's (or run's) tags put it on one of its sweep's frontiers."""
    return any(tags.get(tag) == "true" for tag in FRONTIER_TAGS)


def _untag_left_frontier(client, name: str, parent_run_id: str, current: set[str], versions) -> None:
    """Turn the frontier tags ``false`` on the ``versions`` (of ``name``, as read before this registration) this
    sweep registered whose trials are not in ``current`` (left the frontier, or their runs deleted by hand)."""
    for version in versions:
        tags = version.tags
        trial = _trial_of(version)
        if tags.get(TAG_SWEEP_RUN) == parent_run_id and trial not in current and _on_frontier(tags):
            for tag in FRONTIER_TAGS:
                _set_version_tag(client, name, version.version, tag, "false")
            state = run_deleted(client, trial)
            if state == REMOVED:  # gone with its record: nothing brings it back
                logger.warning("version %s of %s: its trial run %s was removed for good (`mlflow gc`), so it is no "
                               "longer a point of the frontier of sweep run %s (its frontier tags turn false)",
                               version.version, name, trial, parent_run_id)
            elif state:  # the sweep's record no longer holds it: it did not leave the frontier
                logger.warning("version %s of %s: its trial run %s was deleted, so it is no longer a point of the "
                               "frontier of sweep run %s (its frontier tags turn false; restore the run, `%s`, and "
                               "register the frontier again to have it back)", version.version, name, trial,
                               parent_run_id, record.restore_command(client.tracking_uri, trial))
            else:
                logger.info("version %s of %s (trial run %s) has left the frontier of sweep run %s", version.version,
                            name, trial, parent_run_id)


def select_by_latency(client, name: str, max_latency_ms: float, batch_size: int = 1, seq_len: int = 128,
                      threads: int | None = None, alias: str = ALIAS, repeats: int = 10, warmup: int = 2,
                      sweep_run_id: str | None = None, runtime: str = "served",
                      seq_len_from: str | None = None) -> dict[str, Any]:
    """Time every registered version of ``name`` here and point ``alias`` at the most accurate within budget.

    Each version is timed as it serves (``runtime="served"``: through ONNX Runtime when it carries the exported
    model, which is what its pyfunc and ``mlflow models serve`` run; ``"torch"``: its packed PyTorch model) on
    random input of ``batch_size`` x ``seq_len`` with the benches' helper
    (:func:`pruning.bench.interleaved_latency`): the versions and the dense shape(s) they were pruned from (in
    PyTorch) run round-robin, ``repeats`` times after ``warmup`` rounds, and each latency is a median; versions are
    loaded until they fill half the memory free, then timed and let go, so a model of many versions is timed in
    groups, each beside its dense shape (:func:`~workflows.version_timing.time_versions`). Among the versions within
    ``max_latency_ms`` the one with the highest F1 (its ``f1`` tag) wins, the faster on a tie.

    Args:
        client: an MLflow client of the registry.
        name: the registered model.
        max_latency_ms: the budget, in milliseconds per forward pass.
        batch_size, seq_len: the input shape the budget is for.
        threads: threads of torch and of ONNX Runtime while timing (default: torch's current setting).
        alias: the alias to set on the chosen version.
        repeats, warmup: timed and untimed rounds.
        sweep_run_id: only the versions registered by this sweep and on one of its frontiers now (default: every
            version).
        runtime: ``served`` or ``torch``, see above.
        seq_len_from: what gave ``seq_len`` when a registration times the versions (``FILE: speedup.seq_len``): a
            version whose model takes fewer positions is then that field's error, :class:`SeqLenError`; without it
            (``fineprune select --seq-len``) such a version is listed with why, and not chosen.

    Two speedups, of different things: ``speedup`` is the trial's, as its version's tag records it (its packed
    PyTorch model against the dense shape, in the trial's precision, timed where the trial ran); ``served_speedup``
    is timed here, ``dense_latency_ms / latency_ms``: the version as it runs here (``served_by``:
    ``onnxruntime-int8``, ``onnxruntime-fp32``, ``torch-bf16`` or ``torch``) against the dense shape in PyTorch
    fp32, so it holds the runtime's and the precision's gain as well as the pruning's.

    Returns:
        The chosen version (``version``, ``model_uri``, ``served_by``, ``latency_ms``, ``dense_latency_ms``,
        ``served_speedup``, ``served_f1``: the F1 of the ONNX model it runs as, measured when it was made on its
        trial's first 500 questions at most (:func:`~workflows.int8_check.checked_variant`; None for PyTorch),
        and its trial's ``f1``, ``speedup``, ..., and for a trial on SQuAD v2.0 questions its
        :data:`~workflows.record.NULL_METRICS`), the settings (``runtime`` among them: the option given), and
        ``versions``: every version's trial figures with how it ran (``served_by``) and its ``latency_ms``,
        ``dense_latency_ms``, ``served_speedup`` timed here and whether it is ``within_budget``, or
        for a version that cannot be loaded or fails when run here, whose model takes fewer positions than
        ``seq_len``, or whose trial run or sweep run was deleted (set aside in the MLflow UI; it is not loaded), its
        ``error`` (it is not chosen, and the others are timed).

    Raises:
        SelectionError: the model or its versions do not exist, none can be loaded and run, or no version is
            within the budget; the alias is then left as it was.
    """
    if not (max_latency_ms > 0 and math.isfinite(max_latency_ms)):  # an infinite budget is no budget
        raise SelectionError(f"--max-latency-ms must be a finite number > 0, got {max_latency_ms}")
    check_alias(alias)
    if runtime not in RUNTIMES:
        raise SelectionError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    versions = _versions_to_time(client, name, sweep_run_id)
    if not threads:  # torch is needed only to time models; the registry module stays light without it
        import torch

        threads = torch.get_num_threads()
    threads = int(threads)
    rows, none_timed = time_versions(client, name, versions, runtime, threads, batch_size=batch_size,
                                     seq_len=seq_len, repeats=repeats, warmup=warmup, seq_len_from=seq_len_from)
    if none_timed is not None:
        raise SelectionError(f"{none_timed}; alias {alias!r} left as it was")
    for row in rows:
        if "latency_ms" in row:
            row["within_budget"] = row["latency_ms"] <= max_latency_ms
    settings = {"name": name, "alias": alias, "max_latency_ms": max_latency_ms, "batch_size": batch_size,
                "seq_len": seq_len, "threads": threads, "repeats": repeats, "runtime": runtime}
    # The budget is checked once, on the unrounded latencies; the record keeps them to 4 decimals.
    chosen = select_champion(rows, "best_f1_under_latency", max_latency_ms=max_latency_ms)
    if chosen is None:
        fastest = min((r for r in rows if "latency_ms" in r), key=lambda r: r["latency_ms"])
        reason = ("none of them has an F1 tag" if fastest["within_budget"] else
                  f"fastest: version {fastest['version']} at {fastest['latency_ms']:.4g} ms")
    for row in rows:
        for key in ("latency_ms", "dense_latency_ms", "served_speedup"):
            if row.get(key) is not None:
                row[key] = round(row[key], 4)
    if chosen is None:
        for row in rows:
            logger.info("version %s: %s", row["version"], json.dumps(row, sort_keys=True))
        raise SelectionError(f"no version of {name!r} is within {max_latency_ms:g} ms at batch {batch_size}, "
                             f"sequence {seq_len}, {threads} threads ({reason}); alias {alias!r} left as it was")
    version = next(v for v in versions if str(v.version) == chosen["version"])
    left = _point_alias(client, name, alias, version, max_latency_ms, in_sweep=sweep_run_id is not None)
    f1 = chosen.get(F1)
    logger.info("%s@%s -> version %s (F1 %s, %.2f ms <= %g ms)", name, alias, chosen["version"],
                f"{f1:.2f}" if isinstance(f1, (int, float)) else "not recorded", chosen["latency_ms"], max_latency_ms)
    return {**settings, "version": chosen["version"], "model_uri": f"models:/{name}@{alias}",
            "run_id": chosen["run_id"], "served_by": chosen["served_by"], "latency_ms": chosen["latency_ms"],
            "dense_latency_ms": chosen["dense_latency_ms"], "served_speedup": chosen["served_speedup"],
            "served_f1": chosen.get("served_f1"), **{k: chosen.get(k) for k in FINAL_METRICS},
            **_null_figures(chosen), "versions": rows,
            **({"alias_moved_from": left} if left is not None else {})}


def _versions_to_time(client, name: str, sweep_run_id: str | None) -> list:
    """The versions of ``name`` :func:`select_by_latency` times (those of the sweep ``sweep_run_id`` on one of its
    frontiers now, or every one), in order.

    Raises:
        SelectionError: the model does not exist or has no such versions.
    """
    try:
        if sweep_run_id is None:  # `fineprune select`: a model deleted by hand goes with its versions
            client.get_registered_model(name)
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":  # the registry forgets a deleted model outright
            raise SelectionError(f"registered model {name!r} does not exist in {client.tracking_uri} (it was deleted, "
                                 f"or never registered){record.registered_model_hint(client, name)}") from None
        raise SelectionError(f"registered model {name!r}: {error_line(err)}") from None
    if sweep_run_id is not None:
        versions = [v for v in versions if v.tags.get(TAG_SWEEP_RUN) == sweep_run_id and _on_frontier(v.tags)]
    versions = sorted(versions, key=lambda v: int(v.version))
    if not versions:
        where = f" on the frontier of sweep run {sweep_run_id}" if sweep_run_id else ""
        raise SelectionError(f"registered model {name!r} has no versions{where} in {client.tracking_uri}")
    return versions


def _point_alias(client, name: str, alias: str, version, max_latency_ms: float, in_sweep: bool) -> str | None:
    """Point ``alias`` of ``name`` at ``version``, chosen by :func:`select_by_latency` within ``max_latency_ms``
    (``in_sweep``: by a sweep's ``best_f1_under_latency`` policy); the version the alias left, or None.

    The champion alias goes as :func:`_make_champion` moves it, its version tagged with the policy that chose it.

    Raises:
        SelectionError: the registry refused the alias.
    """
    number = str(version.version)
    try:
        if alias == ALIAS:  # the champion: its version records the policy that made it one, and only it
            by = f"best_f1_under_latency max_latency_ms {max_latency_ms:g}" if in_sweep else None
            return _make_champion(client, name, version, {TAG_POLICY: "best_f1_under_latency",
                                                          TAG_POLICY_THRESHOLD: f"max_latency_ms {max_latency_ms:g}"},
                                  by)
        moved = _move_alias(client, name, alias, number)
        left = None if moved is None else str(moved.version)
        if left is not None:
            logger.info("alias %r of %s moved from version %s to version %s", alias, name, left, number)
        return left
    except MlflowException as err:
        raise SelectionError(f"alias {alias!r} of {name!r}: {error_line(err)}") from None


def register_from_experiment(experiment: str, tracking_uri: str | None = None, space: str | None = None,
                             frontier: bool = False, onnx: bool | None = None,
                             sweep_run_id: str | None = None) -> dict[str, Any]:
    """``fineprune register``: the latest sweep of ``experiment`` (or the sweep ``sweep_run_id``; a later sweep
    deleted by hand is passed over with a warning, see :func:`record.latest_sweep`), its policy (or ``space``'s),
    its champion. The result names the sweep (``sweep_run_id``). Without ``sweep_run_id``, a champion alias on a
    version of a later sweep that was deleted is not moved back to the earlier sweep's champion: see
    :func:`_check_alias_not_taken_back`.

    With ``frontier`` every point of the sweep's frontiers is registered first (``frontier_versions`` in the
    result).
    ``onnx`` overrides the policy's ``onnx`` (whether new versions are exported for ONNX Runtime).

    MLflow's fluent API points at the store while it runs (it logs the versions' models), and at the caller's after.
    """
    uri = record.tracking_uri(tracking_uri)
    with fluent_store(uri):
        return _register_from_experiment(uri, experiment, space, frontier, onnx, sweep_run_id)


def _register_from_experiment(uri: str, experiment: str, space: str | None, frontier: bool, onnx: bool | None,
                              sweep_run_id: str | None) -> dict[str, Any]:
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = record.latest_sweep(client, experiment, sweep_run_id)
    params = parent.data.params
    if space is not None:
        loaded = load_space(space)
        spec = loaded.registry
        latency = latency_settings(loaded.speedup, loaded.resources, source=str(loaded.path))
    else:
        try:
            spec = RegistrySpec.from_params(params)
        except record.RecordError as err:
            raise record.RecordError(f"sweep run {parent.info.run_id}: {err}; pass --space") from None
        latency = latency_settings(record.params_under(params, PARAM_SPEEDUP),
                                   record.params_under(params, PARAM_RESOURCES),
                                   source=f"sweep run {parent.info.run_id}")
    if onnx is not None:
        spec = dataclasses.replace(spec, onnx=onnx)
    if sweep_run_id is None:
        _check_alias_not_taken_back(client, spec.name, parent)
    registered = register_sweep(client, experiment, parent.info.run_id, spec, frontier=frontier, latency=latency)
    result = {**registered["champion"], "sweep_run_id": parent.info.run_id}
    # Named as in a sweep's summary, whose ``frontier`` is the table of frontier trials.
    return result if registered["frontier"] is None else {**result, "frontier_versions": registered["frontier"]}


def register_sweep(client, experiment: str, parent_run_id: str, spec: RegistrySpec, frontier: bool = True,
                   dense_metrics: dict[str, Any] | None = None, latency: dict[str, Any] | None = None,
                   latest_left: bool = False, keep_going: bool = False) -> dict[str, Any]:
    """Register a sweep: every point of its frontiers (with ``frontier``, :func:`register_frontier`), then its
    champion (:func:`register_champion`), what ``fineprune register`` and a sweep's end do. Each version's files are
    checked once, though the frontier's versions, the champion's and (``best_f1_under_latency``) the versions timed
    are read in turn.

    ``latest_left``: the sweep was taken as its experiment's latest sweep left (``fineprune sweep --resume`` without
    a run id), a later one deleted. Where the champion alias points at a version of such a later, deleted sweep, the
    alias is left there, as ``fineprune register`` leaves it (:func:`_check_alias_not_taken_back`): the frontier is
    registered, the champion is not, with a warning that says how to move it (the result's ``champion`` gives the
    line as ``alias_left``).

    ``keep_going``: a sweep's end, whose trials' results are recorded whatever registering them gives: a champion
    that cannot be chosen for a field of the space (:class:`SeqLenError`) is a warning and no champion (the line as
    the champion's ``error``), not an error.

    Returns:
        ``champion``: :func:`register_champion`'s result; ``frontier``: the frontier's rows, or None without
        ``frontier``.
    """
    with checked_once():
        rows = (register_frontier(client, experiment, parent_run_id, spec.name, spec.onnx, spec.max_int8_f1_drop)
                if frontier else None)
        held = _alias_taken_back(client, spec.name, client.get_run(parent_run_id)) if latest_left else None
        if held is not None:
            version, sweep = held
            move = record.fineprune_command("register", client.tracking_uri, "--experiment", experiment,
                                            "--sweep-run", parent_run_id)
            line = (f"alias {ALIAS!r} of {spec.name} is left on version {version}, of sweep run {sweep}, which was "
                    f"deleted: this sweep, {parent_run_id}, is an earlier one (`{move}` moves the alias to its "
                    f"champion; or restore sweep run {sweep}, `{record.restore_command(client.tracking_uri, sweep)}`"
                    "); no champion registered")
            logger.warning("%s", line)
            champion = {"registered": False, "policy": spec.policy, "name": spec.name, "alias_left": line}
        else:
            try:
                champion = register_champion(client, experiment, parent_run_id, spec, dense_metrics,
                                             latency=latency, frontier_registered=frontier)
            except SeqLenError as err:
                if not keep_going:
                    raise
                logger.warning("registry policy %s: %s", spec.policy, err)
                champion = {"registered": False, "policy": spec.policy, "name": spec.name, "error": str(err)}
    return {"champion": champion, "frontier": rows}


def _check_alias_not_taken_back(client, name: str, parent) -> None:
    """Refuse to move the champion back to an earlier sweep unasked: the alias points at a version of a sweep of
    the same experiment started after ``parent`` (the latest sweep left, taken without ``--sweep-run``) whose run
    was deleted.

    The latest sweep was passed over for being deleted; the alias on its version may be what serves now, and
    moving it to an older, perhaps less accurate, model is not to be done on a warning.

    Raises:
        record.RecordError: in one line naming the version, the deleted sweep, and the two ways on.
    """
    held = _alias_taken_back(client, name, parent)
    if held is not None:
        version, sweep = held
        raise record.RecordError(
            f"alias {ALIAS!r} of {name} points at version {version}, of sweep run {sweep}, which was "
            f"deleted; the latest sweep left, {parent.info.run_id}, is an earlier one: pass --sweep-run "
            f"{parent.info.run_id} to move the alias to its champion, or restore sweep run {sweep} "
            f"(`{record.restore_command(client.tracking_uri, sweep)}`); nothing registered")


def _alias_taken_back(client, name: str, parent) -> tuple[str, str] | None:
    """``(version, sweep run id)`` when the champion alias of ``name`` points at a version of a sweep of the same
    experiment started after ``parent`` (a sweep run) whose run was deleted, else None."""
    try:
        current = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:  # no such model, or no champion
        return None
    sweep = current.tags.get(TAG_SWEEP_RUN)
    if not sweep or sweep == parent.info.run_id:
        return None
    try:
        run = client.get_run(sweep)
    except MlflowException:  # removed for good: set aside for good
        return None
    if run.info.lifecycle_stage == "deleted" and run.info.experiment_id == parent.info.experiment_id \
            and (run.info.start_time or 0) > (parent.info.start_time or 0):  # passed over by record.latest_sweep
        return str(current.version), sweep
    return None


