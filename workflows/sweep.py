"""The sweep driver: a search space in, a tracked Ray Tune sweep, a Pareto frontier and a champion out.

:func:`run_sweep` takes four steps, each delegated to library code:
  1. validate the space (:func:`workflows.space.load_space`) and, for a private local Ray, what it names on this
     machine (:mod:`workflows.preflight`): an invalid space fails before Ray starts;
  2. make sure a dense teacher exists (:func:`ensure_teacher`: trained once as a Ray task, reused for the same
     model/data/config);
  3. ``Tuner.fit()`` over :func:`trial_main`, which calls :func:`pruning.trainer.train` and, at the end,
     :func:`pruning.packing.pack_and_verify`, and reports the final metrics with the packed model as checkpoint;
     a driver-side callback (:class:`workflows.tracking.MlflowTrialCallback`) writes every trial to MLflow;
  4. tag the frontier and log its hypervolume, register every frontier point and the champion
     (:mod:`workflows.registry`), write the report (:mod:`workflows.report`).

Run it as ``fineprune sweep --space FILE`` (or, on a cluster head, through ``workflows/submit.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import ray
import torch
import transformers
from ray import tune
from ray._private.services import canonicalize_bootstrap_address_or_die
from ray.exceptions import AuthenticationError
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from pruning import atomic, squad
from pruning.checkpoint import STATE, CheckpointError, load_model, read_null_answers
from pruning.config import CHECKPOINT_DIR, FINAL_DIR, ConfigError, config_to_dict, home_path
from pruning.errors import error_line
from pruning.packing import PACK_METRICS, pack_and_verify, save_packed
from pruning.quiet import leaving_out, starting_with
from pruning.resources import resolve_data
from pruning.resume import check_resume_config
from pruning.tokenizer import load_tokenizer
from pruning.trainer import evaluate, resolve_device, train
from workflows import frontier, record, registry, tracking, version_timing
from workflows.distinct import DistinctConfigurations
from workflows.report import write_report
from workflows.preflight import check_local_data, check_machine, trials_at_once
from workflows.retry import TrackingUnavailable, call_with_retries, is_transient, outage_limit, quick_http_failures
from workflows.fingerprint import scoring_fingerprint, teacher_fingerprint
from workflows.space import (EVAL_METRICS, EVALUATION, SpaceError, SweepSpace, baseline_config, load_space,
                             teacher_config, trial_config)
from workflows.tune_search import param_space, tune_config_kwargs
from workflows.user_errors import output_path_problem
from workflows.version_files import checked_once
from workflows.warm_start import WarmStart, WarmStartError, check_applicable, prior_outcomes

__all__ = ["run_sweep", "trial_main", "ensure_teacher", "frontier_summary", "sweep_complete", "FAULT_ENV",
           "TRIAL_METRICS", "RayUnavailable", "ResumeError", "StorageError", "RAY_CONNECT_TIMEOUT_S"]

logger = logging.getLogger(__name__)

# Testing aid: when set to a directory, every trial kills its own worker process once, right after its first
# report, so that retries from the last checkpoint can be exercised end to end.
FAULT_ENV = "FINEPRUNE_FAULT_ONCE_DIR"
CHECKPOINT_KIND = "fineprune_checkpoint.json"
RAY_CONNECT_TIMEOUT_S = 10.0  # how long an explicit Ray address may take to accept a connection
# What a trial's final report holds besides the run's bookkeeping: an objective must be one of these.
TRIAL_METRICS = (*EVAL_METRICS, *PACK_METRICS)
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Where Ray Train logs each checkpoint it persists (its two storage modules).
_RAY_CHECKPOINT_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's token authentication: "token" sends the token to an explicit address
_TOKEN_PLACES = "RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token"


def _worker_output() -> None:
    """What a Ray worker (the teacher's, a trial's) prints: log lines, and no progress bars. Ray forwards each
    redraw of a bar as a line of its own, so the trainer runs without them, and transformers' bars of loading and
    saving a model ("Loading weights", "Writing model shards": several each trial) are turned off too. So is Ray's
    line for each checkpoint a trial reports ("Checkpoint successfully created at: Checkpoint(...)", a repr at
    every evaluation of every trial): the sweep's directory, logged when it starts, holds them all. Nor does a
    worker that Ray stops print a traceback for it (:func:`_worker_unraisable`)."""
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    transformers.utils.logging.disable_progress_bar()
    for name in _RAY_CHECKPOINT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.unraisablehook = _worker_unraisable


def _worker_unraisable(report: Any) -> None:
    """A Ray worker's report of an exception Python cannot raise, but not of a ``SystemExit``: Ray stops a worker it
    no longer needs (a trial's, once no trial is left for it) with SIGTERM, which its handler raises as
    ``SystemExit`` wherever the worker is. Landing in a finalizer, it was printed as a traceback among the sweep's
    output ("Exception ignored in ... SystemExit: 1"), though nothing went wrong; Ray ends the worker all the same."""
    if report.exc_type is not None and issubclass(report.exc_type, SystemExit):
        return
    sys.__unraisablehook__(report)


class RayUnavailable(Exception):
    """The Ray address given (``--address`` or ``RAY_ADDRESS``) does not answer; one line naming it."""


class ResumeError(Exception):
    """``--resume`` names nothing to resume; one line."""


DEFAULT_STORAGE = "runs/ray"  # the sweeps' storage without --storage-path, under the working directory


class StorageError(ValueError):
    """``--storage-path`` names no storage this machine reaches; one line."""


# --------------------------------------------------------------------------------------------------------------
# The trial (runs in a Ray worker)
# --------------------------------------------------------------------------------------------------------------


# After its own columns, Tune's table of trials shows the first four metrics the first result reports: the sweep's
# objectives, then these, rather than the step, the epoch and the threshold schedule's state.
_SHOWN_FIRST = (record.F1, record.LINEAR_DENSITY, record.EXACT_MATCH, record.SPEEDUP, record.HEADS_REMOVED)
# And after them, what Tune's table of a trial's last result shows.
_RESULT_SHOWN = (record.TOTAL_DENSITY, record.PARAMS_AFTER, "train_seconds", "prune_seconds")


def _report_metrics(metrics: dict[str, Any], first: tuple[str, ...] = ()) -> dict[str, Any]:
    """The metrics a trial reports to Tune (numbers, strings and flags), those named in ``first`` first."""
    values = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    return {**{k: values[k] for k in first if k in values}, **values}


def _shown_first(space: SweepSpace) -> tuple[str, ...]:
    """The metrics a trial reports first: the space's objectives, then :data:`_SHOWN_FIRST`."""
    return tuple(dict.fromkeys([name for name, _ in space.objectives] + list(_SHOWN_FIRST)))


def trial_main(config: dict[str, Any], space: SweepSpace, teacher: str | None, cache_dir: str | None = None,
               held_out_checked: bool = False) -> None:
    """The Tune function trainable: one fine-pruning run, then packing and the final report.

    ``held_out_checked``: the driver has said whether the trials are scored on questions they train on, so the
    trial does not say it again (once per trial)."""
    _worker_output()
    context = tune.get_context()
    # Training writes (and atomically replaces) checkpoints; keep that churn out of the directory Tune syncs. What an
    # earlier attempt of this trial left here (its worker killed, the sweep stopped) goes first: an attempt goes on
    # from the checkpoint it reported to the sweep's storage, never from these files.
    work_dir = trial_scratch(context.get_experiment_name()) / context.get_trial_id()
    _remove_work_dir(work_dir)
    torch.set_num_threads(max(1, int(space.resources.get("cpu", 1) or 1)))
    cfg = trial_config(space, dict(config), output_dir=str(work_dir / "run"), teacher=teacher)
    if cfg.cache_dir is None and cache_dir is not None:  # trials share one tokenization of the data
        cfg = replace(cfg, cache_dir=cache_dir)
    node_id = ray.get_runtime_context().get_node_id()

    resume_from = None
    restored = tune.get_checkpoint()
    if restored is not None:
        kind = _checkpoint_kind(restored)
        if kind.get("kind") == "packed":
            # It had ended (Tune had not recorded it so): the final result again, its packed model copied within the
            # sweep's storage. Nothing is fetched to this machine, where code after a last report may never run.
            tune.report({**kind["metrics"], "node_id": node_id}, checkpoint=restored)
            return
        resume_from = Path(restored.to_directory(str(work_dir / "restored")))
        logger.info("trial %s resumes from its checkpoint at step %s", context.get_trial_id(), kind.get("step"))

    fault_dir = os.environ.get(FAULT_ENV)
    reports = {"n": 0}
    shown_first = _shown_first(space)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        values = {**_report_metrics(metrics, shown_first), "node_id": node_id, "final": False}
        checkpoint = None
        if checkpoint_dir is not None:
            Path(checkpoint_dir, CHECKPOINT_KIND).write_text(json.dumps({"kind": "train", "step": metrics.get("step")}))
            checkpoint = tune.Checkpoint.from_directory(checkpoint_dir)
        tune.report(values, checkpoint=checkpoint)
        reports["n"] += 1
        if fault_dir and resume_from is None and reports["n"] == 1:
            marker = Path(fault_dir) / f"{context.get_trial_id()}.failed"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("killed once on purpose\n")
                logger.warning("fault injection: killing the worker of trial %s", context.get_trial_id())
                os._exit(1)

    logger.info("trial %s: %s", context.get_trial_id(), ", ".join(f"{k}={v}" for k, v in config.items()))
    packed_dir = work_dir / "packed"
    try:
        # No progress bars in a worker: Ray prints each redraw as a line; the trainer logs every log_every steps.
        metrics = train(cfg, report=report, resume_from=resume_from, progress=False,
                        held_out_warning=not held_out_checked)
        final = _pack_and_measure(metrics, packed_dir, space, cfg.device, cfg.precision)
        _check_objectives(final, space)
    except BaseException:
        # What it reported is in the sweep's storage, which a retry or a resume restores from.
        _remove_work_dir(work_dir)
        raise
    final.update({"node_id": node_id, "final": True})
    (packed_dir / CHECKPOINT_KIND).write_text(json.dumps({"kind": "packed", "metrics": final}))
    # Every checkpoint reported so far is already in the sweep's storage; the training run's files (hundreds of
    # MB a trial) go before the final report, since code after a trial's last report may not run.
    for stale in (work_dir / "run", work_dir / "restored"):
        shutil.rmtree(stale, ignore_errors=True)
    tune.report(final, checkpoint=tune.Checkpoint.from_directory(str(packed_dir)))
    _remove_work_dir(work_dir)  # the packed copy, now in storage too


def _check_objectives(final: dict[str, Any], space: SweepSpace) -> None:
    """Refuse a trial's final result that lacks one of the space's objectives: with Tune's check of every result
    off (:data:`_NO_STRICT_METRICS`), the sampler was told None, and the trial left off the frontier, without a
    word (a run that trains no step, a one-shot fisher run without fill_steps, reports no loss)."""
    for name, _ in space.objectives:
        if not isinstance(final.get(name), (int, float)):
            hint = " (a run that trains no step, such as fisher without fill_steps, reports no loss)" \
                if name.startswith("loss") else ""
            raise SpaceError(f"{space.path}: objectives: the trial's final result has no {name!r}{hint}; give "
                             "objectives every trial reports")


def trial_scratch(tune_experiment: str) -> Path:
    """Where a sweep's trials keep their local files on a machine: ``<temporary directory>/fineprune-trials/`` and the
    sweep's Tune experiment (its directory's name, ``NAME-DATE-TIME-ID``), a directory a trial each."""
    return Path(tempfile.gettempdir()) / "fineprune-trials" / tune_experiment


def _remove_trial_scratch(sweep_dir: str) -> None:
    """The sweep's trial files on this machine, once its trials have stopped: what a trial stopped with the sweep
    (Ctrl-C, SIGTERM) or a worker that died left, and a finished trial's packed copy where the code after its last
    report did not run."""
    scratch = trial_scratch(sweep_dir.rsplit("/", 1)[-1])
    shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):  # another sweep's trials have files there
        scratch.parent.rmdir()


def _checkpoint_kind(checkpoint: tune.Checkpoint) -> dict[str, Any]:
    """The :data:`CHECKPOINT_KIND` record of a reported checkpoint, read where the checkpoint is stored; ``{}`` where
    it has none."""
    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_KIND}"
    if not checkpoint.filesystem.get_file_info(path).is_file:
        return {}
    with checkpoint.filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read().decode("utf-8"))


def _remove_work_dir(work_dir: Path) -> None:
    """A trial's local files, the sweep's directory of them once no other trial of this machine has one, and the
    trials' directory (:func:`trial_scratch`) once no other sweep's trial has one."""
    shutil.rmtree(work_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # another trial's files are still there, or another sweep's
        work_dir.parent.rmdir()
        work_dir.parent.parent.rmdir()


def _pack_and_measure(metrics: dict[str, Any], packed_dir: Path, space: SweepSpace, device: str,
                      precision: str) -> dict[str, Any]:
    """Pack the trial's final model, check it against the masked one and time it against the dense shape, on the
    trial's device in the run's precision; the final metrics with the packing ones added."""
    model_dir = Path(metrics["model_dir"])
    masked = load_model(model_dir).to(resolve_device(device))
    speed = space.speedup
    packed, report = pack_and_verify(masked, batch_size=int(speed["batch_size"]), seq_len=int(speed["seq_len"]),
                                     repeats=int(speed["repeats"]), precision=precision)
    save_packed(packed.to("cpu"), load_tokenizer(model_dir), packed_dir, overwrite=True)
    final = {k: v for k, v in {**metrics, **report.metrics()}.items() if k != "model_dir"}
    return _report_metrics(final, _shown_first(space))


# --------------------------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------------------------


_NOTES = "_notes"  # what a teacher task tells the sweep's log: (level, message) pairs, beside its metrics


@ray.remote(max_retries=0)
def _dense_teacher(cfg, given: str | None, held_out_checked: bool = False) -> dict[str, Any]:
    """Fine-tune the dense teacher (``given`` None; see :func:`_fine_tune_teacher`) or evaluate the given one, in a
    Ray worker."""
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    _worker_output()
    if given is None:
        return _fine_tune_teacher(cfg, held_out_checked)
    device = resolve_device(cfg.device)
    model = load_model(given, qa_head=True).to(device)
    data = resolve_data(cfg.eval_data)
    examples = squad.load_squad(data, limit=cfg.eval_limit, spans=False)
    with squad.questions_of(data):
        metrics = evaluate(model, load_tokenizer(given), examples, cfg, device=device, progress=False,
                           null_answers=read_null_answers(given))
    return {**metrics, "model_dir": given}


def _fine_tune_teacher(cfg, held_out_checked: bool) -> dict[str, Any]:
    """Fine-tune the dense teacher into ``cfg.output_dir``, on the machine whose files those are (a cluster's node):
    from the checkpoint a sweep stopped while it trained (Ctrl-C, a lost worker) left there, else from the start
    (also where that checkpoint is another run's or cannot be read). The checkpoint, the model and its optimizer
    state, goes once the final model is written. Its metrics, with :data:`_NOTES` for the sweep's log."""
    checkpoint = Path(cfg.output_dir) / CHECKPOINT_DIR
    notes: list[tuple[int, str]] = []
    resume = (checkpoint / STATE).is_file()
    if resume:
        try:
            check_resume_config(cfg, checkpoint)  # another run's: trained from the start
        except (CheckpointError, ConfigError) as err:
            notes.append((logging.WARNING, f"{error_line(err)}; the dense teacher was fine-tuned from the start"))
            resume = False
    metrics = None
    if resume:
        try:  # progress by log lines, not bars (see trial_main)
            metrics = train(cfg, resume_from=checkpoint, progress=False, held_out_warning=not held_out_checked)
            notes.append((logging.INFO, f"the dense teacher went on from the checkpoint {checkpoint}, where an "
                                        "earlier sweep stopped"))
        except CheckpointError as err:
            if str(checkpoint) not in str(err):  # not the checkpoint's fault: the run's own error
                raise
            notes.append((logging.WARNING, f"{error_line(err)}; the dense teacher was fine-tuned from the start"))
    if metrics is None:
        metrics = train(cfg, progress=False, held_out_warning=not held_out_checked)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return {**metrics, _NOTES: notes}


def ensure_teacher(space: SweepSpace, root: Path, held_out_checked: bool = False) -> tuple[str, dict[str, Any]]:
    """The teacher directory and its dense EM/F1: the space's own, or one fine-tuned once and then reused.

    The EM/F1 are the dense baseline's: the teacher scored as the trials are (:func:`~workflows.space.baseline_config`:
    the base's evaluation data and settings), whatever ``teacher.config`` trained and scored the teacher with.
    The work runs as a Ray task with the trials' resources (a GPU on a GPU cluster); its metrics are cached as
    ``metrics.json`` under the sweep's teacher directory, so a second sweep over the same model/data/config starts
    at once (:func:`~workflows.fingerprint.teacher_fingerprint`: the same contents, not only the same paths). A
    teacher trained with other evaluation settings than the trials' is scored again with theirs, and that score is
    cached beside it under ``scores/``, by those settings and the evaluation data's contents
    (:func:`~workflows.fingerprint.scoring_fingerprint`). A given teacher directory is only read; its metrics are
    computed again when it or the evaluation data changes. Sweeps that need the same teacher at once take turns: the
    first makes (or scores) it, the others wait for it and reuse it.
    """
    fingerprint = teacher_fingerprint(space)
    run_dir = root / (f"given-{fingerprint}" if space.teacher.path else fingerprint)
    # Sweeps started at once that need the same teacher: one trains (or evaluates) it, the others wait and reuse it,
    # rather than each training it into the same directory and removing the one another's trials read.
    root.mkdir(parents=True, exist_ok=True)
    with atomic.locked(run_dir.with_name(f".{run_dir.name}.lock"), str(run_dir), wait=True,
                       waiting=f"waiting for the dense teacher in {run_dir}, which another sweep is making"):
        return _make_teacher(space, run_dir, held_out_checked)


def _make_teacher(space: SweepSpace, run_dir: Path, held_out_checked: bool) -> tuple[str, dict[str, Any]]:
    """The teacher of :func:`ensure_teacher` and its baseline scores (under its lock): reused when cached, else
    fine-tuned or evaluated now."""
    metrics_file = run_dir / "metrics.json"
    if space.teacher.path:
        # The user's model directory is only read; its dense metrics are cached beside the sweep's own teachers.
        model_dir = Path(space.teacher.path)
        cfg = baseline_config(space, str(run_dir))
        return str(model_dir), _scored(space, cfg, model_dir, metrics_file, held_out_checked)
    model_dir = run_dir / FINAL_DIR
    cfg = teacher_config(space, str(run_dir))
    trained = _cached_teacher(run_dir)
    if trained is not None:
        logger.info("reusing the dense teacher in %s", model_dir)
    else:
        logger.info("fine-tuning the dense teacher %s", model_dir)
        trained = _teacher_task(space, cfg, None, held_out_checked)
        atomic.write_text(metrics_file, json.dumps(trained, indent=2))
    # The training checkpoint a teacher of an earlier release kept here, of no use once its final model is scored.
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    scoring = baseline_config(space, str(run_dir))
    differ = [key for key in EVALUATION if getattr(cfg, key) != getattr(scoring, key)]
    if not differ:  # the teacher's own run scored it as the trials are scored
        return str(model_dir), trained
    logger.info("the dense teacher's run scored it with %s; the dense baseline is scored as the trials are, with %s",
                ", ".join(f"{key} {getattr(cfg, key)}" for key in differ),
                ", ".join(f"{key} {getattr(scoring, key)}" for key in differ))
    scores_file = run_dir / "scores" / f"{scoring_fingerprint(scoring)}.json"
    return str(model_dir), {**trained, **_scored(space, scoring, model_dir, scores_file, held_out_checked)}


def _scored(space: SweepSpace, cfg, model_dir: Path, metrics_file: Path, held_out_checked: bool) -> dict[str, Any]:
    """The dense metrics of the model in ``model_dir`` scored with ``cfg``'s evaluation data and settings: cached in
    ``metrics_file``, else computed (and then cached there)."""
    cached = _teacher_metrics(metrics_file) if (model_dir / "config.json").exists() else None
    if cached is not None:
        logger.info("reusing the dense teacher's scores in %s", metrics_file)
        return cached
    logger.info("evaluating the dense teacher %s", model_dir)
    metrics = _teacher_task(space, cfg, str(model_dir), held_out_checked)
    atomic.write_text(metrics_file, json.dumps(metrics, indent=2))
    return metrics


def _teacher_task(space: SweepSpace, cfg, given: str | None, held_out_checked: bool) -> dict[str, Any]:
    """Fine-tune the dense teacher (``given`` None) or score the model in ``given``, as a Ray task with the trials'
    resources; its numeric metrics. What the task noted (:data:`_NOTES`) is logged here."""
    task = _dense_teacher.options(num_cpus=_teacher_cpus(space.resources),
                                  num_gpus=space.resources.get("gpu", 0) or 0)
    try:
        metrics = ray.get(task.remote(cfg, given, held_out_checked))
    except ray.exceptions.RayTaskError as err:
        # The task's own error (a teacher directory that is not there, a bad value), not Ray's multi-line wrapper.
        if isinstance(err.cause, Exception):
            raise err.cause from err
        raise
    for level, note in metrics.pop(_NOTES, ()):
        logger.log(level, "%s", note)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _cached_teacher(run_dir: Path) -> dict[str, Any] | None:
    """The dense metrics of the teacher an earlier sweep fine-tuned in ``run_dir``, when it is there to reuse (its
    final model and its cached metrics); else None."""
    return _teacher_metrics(run_dir / "metrics.json") if (run_dir / FINAL_DIR / "config.json").exists() else None


def _teacher_metrics(metrics_file: Path) -> dict[str, Any] | None:
    """The teacher's cached dense metrics, or None when there are none to trust: no file, or one that is not the
    JSON object a sweep writes (then the teacher is evaluated again, and the file written anew)."""
    if not metrics_file.is_file():
        return None
    try:
        value = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        logger.warning("%s: unreadable (%s); the teacher's metrics are computed again", metrics_file, err)
        return None
    if not isinstance(value, dict):
        logger.warning("%s: not a JSON object; the teacher's metrics are computed again", metrics_file)
        return None
    return value


def _teacher_cpus(resources: dict[str, Any]) -> float:
    # Nothing else runs while the teacher trains: give it every CPU one node offers (at least the trials' share).
    # Per node, not summed over the cluster: a request for all of a multi-node cluster's CPUs fits no node. Only
    # nodes with the GPUs the task asks for count (a CPU head node cannot run it).
    gpus = float(resources.get("gpu", 0) or 0)
    fitting = [float(node["Resources"].get("CPU", 0)) for node in ray.nodes()
               if node.get("Alive") and float(node["Resources"].get("GPU", 0)) >= gpus]
    available = float(ray.available_resources().get("CPU", 1))
    return max(float(resources.get("cpu", 1) or 1), min(max(fitting, default=1.0), available))


# --------------------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------------------


def _check_ray_answers(address: str) -> None:
    """Fail fast, naming ``address``, when nothing listens there (``ray.init`` would wait for it forever).

    Raises:
        RayUnavailable: not an address Ray takes, or no connection within ``RAY_CONNECT_TIMEOUT_S`` seconds (read
            when called).
    """
    timeout = RAY_CONNECT_TIMEOUT_S
    target = address
    if address == "auto":  # the cluster `ray start` recorded on this machine, as Ray itself reads it
        try:
            target = canonicalize_bootstrap_address_or_die("auto")
        except (ConnectionError, ValueError) as err:
            raise RayUnavailable(f"Ray address auto: {err}") from err
    scheme, _, rest = target.rpartition("://")
    host, _, port = rest.rstrip("/").rpartition(":")
    if scheme not in ("", "ray") or not host.strip() or not port.isdigit() or not 0 < int(port) < 65536:
        # ray.init would stop the sweep with a traceback, once its MLflow run and storage were made
        raise RayUnavailable(f"Ray address {address!r}: not auto, HOST:PORT or ray://HOST:PORT")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise RayUnavailable(f"Ray address {address}: nothing answers at {host}:{port} within "
                                     f"{timeout:.0f} s ({err.strerror or err})") from err
            time.sleep(1.0)


# Ray's notice as it starts a local cluster with token authentication ("Token authentication is enabled for this Ray
# cluster. Set RAY_AUTH_MODE=disabled to opt out."): said of the private local Ray a sweep starts and stops itself, it
# asks nothing of the user. Joining a cluster, Ray's notices are kept.
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


def _init_ray(cluster: str | None) -> bool:
    """Join ``cluster``, or start a private local Ray (``address="local"``) when it is None; False where Ray was
    already running in this process (the caller's, which the sweep runs on and leaves running)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "logging_level": logging.WARNING,
                              "runtime_env": {"env_vars": _forwarded_env()}}
    if cluster:
        kwargs["address"] = cluster
    else:
        kwargs.update(address="local", include_dashboard=False)
    mode = os.environ.get(AUTH_MODE_ENV)  # read first: ray.init may set it
    # ray.init makes SIGTERM a sys.exit (and its core logs a crash report for it); a handler the caller set (the
    # command line's, which stops the sweep as Ctrl-C does) or "ignore" is set back. The default is not: it would
    # end the process at once, where Ray's exit still ends the sweep's run and stops its Ray.
    main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main else None
    quiet = contextlib.nullcontext() if cluster else leaving_out(_TOKEN_LOGGER, starting_with(_TOKEN_NOTICE))
    try:
        with quiet:
            ray.init(**kwargs)
    except (ConnectionError, AuthenticationError) as err:
        raise RayUnavailable(_connect_failure(cluster, err, mode)) from err
    finally:
        if callable(on_term) or on_term is signal.SIG_IGN:
            signal.signal(signal.SIGTERM, on_term)
    return True


def _connect_failure(cluster: str | None, err: BaseException, mode: str | None) -> str:
    """Why joining ``cluster`` failed, in one line; a refused or missing Ray token said as such (Ray's own
    message about it comes wrapped in a generic "failed to connect")."""
    where = f"Ray address {cluster}"
    if isinstance(err, AuthenticationError) and "no authentication token" in str(err):
        return f"{where}: RAY_AUTH_MODE=token but no Ray token was found (give the cluster's token in {_TOKEN_PLACES})"
    chain, seen = [], err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, AuthenticationError) or "InvalidAuthToken" in str(e) for e in chain):
        if (mode or "").lower() != "token":
            return (f"{where}: the cluster requires token authentication and RAY_AUTH_MODE is "
                    f"{mode or 'unset'}: set RAY_AUTH_MODE=token and give the cluster's token in {_TOKEN_PLACES}")
        return f"{where}: the cluster refused this client's Ray token (from {_TOKEN_PLACES}): give the one it uses"
    return f"{where}: {' '.join(str(err).split())}"


# Set by Ray in the driver of a `ray job submit` job: the job's config, its runtime env (working_dir, env_vars) in it.
_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _forwarded_env() -> dict[str, str]:
    keep = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", FAULT_ENV, "MLFLOW_TRACKING_URI", "TOKENIZERS_PARALLELISM",
            "RAY_CHDIR_TO_TRIAL_DIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Trials keep their worker's working directory (the sweep's, or the job's working_dir on every node), so the
    # space's relative paths mean the same in a trial as in the driver; trial outputs use absolute paths.
    env.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Under `ray job submit` the job's own env_vars reach every worker already, and ray.init refuses a runtime
    # env that names one of them again.
    job = json.loads(os.environ.get(_RAY_JOB_ENV) or "{}")
    taken = set((job.get("runtime_env") or {}).get("env_vars") or {})
    return {k: v for k, v in env.items() if k not in taken}


def _check_job_store(tracking_uri: str) -> None:
    """Under ``ray job submit`` the driver runs in the job's temporary copy of the working directory, which Ray
    deletes after the job: a SQLite store at a relative path (the default ``sqlite:///mlflow.db``) would hold the
    whole record there, and lose it.

    Raises:
        tracking.TrackingStoreError: such a store, under a Ray job.
    """
    database = record.sqlite_database(tracking_uri)
    if os.environ.get(_RAY_JOB_ENV) and database is not None and not database.is_absolute():
        raise tracking.TrackingStoreError(
            f"tracking URI {tracking_uri}: under `ray job submit` a relative database is made in the job's temporary "
            "copy of the working directory and deleted with it; pass --tracking-uri of an MLflow server (or set "
            "MLFLOW_TRACKING_URI), or an absolute sqlite:////PATH the driver keeps (docs/cluster.md)")


def _tune_resources(resources: dict[str, Any]) -> dict[str, float]:
    return {"cpu": float(resources.get("cpu", 1) or 0), "gpu": float(resources.get("gpu", 0) or 0)}


def _local_storage(storage_path: str | None) -> str | None:
    """``--storage-path`` with a ``file:`` URI (``file:///shared/my%20runs``) as the local path it names, its
    percent-escapes decoded: taken as it was, the sweep wrote into a directory named ``my%20runs``.

    Raises:
        StorageError: a ``file:`` URI of another host, or a local path that is a file, lies under one, or lies in a
            directory that takes no new files.
    """
    try:
        storage_path = storage_path and home_path(storage_path)  # `~` from Python too, as on the command line
        local = storage_path and record.file_uri_path(storage_path)
    except (ValueError, ConfigError) as err:
        raise StorageError(f"--storage-path {err}") from None
    local = local or storage_path
    if not (local and "://" in local):  # a directory of this machine, which the sweep makes
        problem = output_path_problem(local or DEFAULT_STORAGE, directory=True, writable=True, staged=False,
                                      utf8=True)
        if problem is not None:
            where = (f"--storage-path {storage_path}" if storage_path
                     else f"{DEFAULT_STORAGE} (the default --storage-path)")
            raise StorageError(f"{where}: {problem}")
    return local


def _storage_roots(storage_path: str | None, make: bool = True) -> tuple[str, Path]:
    """Tune's storage root (an absolute local path, or a URI such as ``s3://bucket/prefix`` kept as it is) and the
    local directory for what trials read by file path (trained teachers, the feature cache), made unless ``make`` is
    False."""
    storage_path = _local_storage(storage_path)
    if storage_path and "://" in storage_path:
        local = Path(DEFAULT_STORAGE).resolve()
        if make:
            logger.info("checkpoints go to %s; teachers and caches stay in %s on each node (on a multi-node cluster, "
                        "give teacher.path on a filesystem every node reads)", storage_path, local)
        root = storage_path.rstrip("/")
    else:
        local = Path(storage_path or DEFAULT_STORAGE).resolve()
        root = str(local)
    if make:
        local.mkdir(parents=True, exist_ok=True)
    return root, local


def _warm_start_again(client, space: SweepSpace, previous, sweep_dir: str, limit: float) -> WarmStart | None:
    """The warm start of a sweep being resumed that stopped before Tune first saved its state (its driver died, or
    the store stayed away while the teacher's baseline was logged): its new Tune run is told the earlier outcomes
    its run says it was warm-started from, as the first was to be. None when Tune's state holds its sampler (told
    them already) or the sweep was not warm-started."""
    source = previous.data.tags.get(record.TAG_WARM_START)
    if not source or tune.Tuner.can_restore(sweep_dir):
        return None
    logger.info("the sweep stopped before Ray Tune saved its state: its sampler is told the outcomes of sweep run "
                "%s again", source)
    return prior_outcomes(client, space, source, previous.data.tags.get(record.TAG_WARM_START_STORE), limit)


def _tuner(space: SweepSpace, trainable: Any, callback: tracking.MlflowTrialCallback, sweep_dir: str,
           storage_root: str, resume: bool, warm: WarmStart | None = None) -> tune.Tuner:
    """The Tuner of a new sweep (its sampler told ``warm``'s outcomes first), or the restored one of the sweep being
    resumed (its sampler restored with all it was told)."""
    if resume and tune.Tuner.can_restore(sweep_dir):
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True)
        # The restored Tuner carries the callbacks pickled when the sweep started; log through this driver's.
        tuner._local_tuner.get_run_config().callbacks = _callbacks(callback)
        return tuner
    # A new sweep, or one whose driver died before Tune first saved its state.
    run_config = tune.RunConfig(
        name=sweep_dir.rsplit("/", 1)[1],
        storage_path=storage_root,
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
        # The last one alone: a trial goes on from it, and a finished trial's is its packed model (the training
        # checkpoint before it, a model and its optimizer state, would be kept for nothing).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=_callbacks(callback),
        verbose=1,
    )
    return tune.Tuner(trainable, param_space=param_space(space),
                      tune_config=tune.TuneConfig(**tune_config_kwargs(space, TRIAL_METRICS,
                                                                       warm.outcomes if warm else ())),
                      run_config=run_config)


# Tune adds, unless this is set, its default loggers: a trial's result.json and progress.csv (Tune's own files of a
# trial, beside its checkpoints), and TensorBoard event files, with a line at the start of every sweep telling the
# user to run TensorBoard over them. The sweep's record is MLflow's: it passes the first two loggers itself. A user who
# sets it (0 to have TensorBoard's files) is obeyed.
_NO_DEFAULT_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


def _callbacks(callback: tracking.MlflowTrialCallback) -> list[Any]:
    """The Tune run's callbacks: the sweep's MLflow logging, Tune's JSON and CSV files of each trial, and the removal
    of what a trial stopped early leaves."""
    return [callback, JsonLoggerCallback(), CSVLoggerCallback(), StoppedEarlyCheckpoints()]


class StoppedEarlyCheckpoints(tune.Callback):
    """Removes the last checkpoint of each trial the scheduler stops early, as it stops.

    That checkpoint is a training one (a model and its optimizer state: about 270 MB for MiniLM, 1.3 GB for
    BERT-base) that nothing reads again: a stopped trial has no packed model and is never resumed, and its record
    is MLflow's. A trial that finished keeps its packed model; one a Ctrl-C stopped is not completed (Tune calls
    no ``on_trial_complete`` for it) and keeps its checkpoint for a resume; a failed one keeps it for ``--resume``,
    which runs it again from there.
    """

    def on_trial_complete(self, iteration, trials, trial, **info):
        checkpoint = trial.checkpoint
        if checkpoint is None or (trial.last_result or {}).get("final", True):
            return
        try:
            checkpoint.filesystem.delete_dir(checkpoint.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            logger.warning("could not remove the training checkpoint of trial %s, stopped early, at %s: %s",
                           trial.trial_id, checkpoint.path, err)


# Tune checks, unless this is set, that every result a trial reports holds every objective the search algorithm has.
# A trial reports its evaluations as it trains, and its packing metrics (speedup, params_after, ...) once, at its
# end, where the sampler reads its objectives: a sweep with such an objective stopped at the first evaluation. The
# space has checked each objective against what a trial reports at its end.
_NO_STRICT_METRICS = "TUNE_DISABLE_STRICT_METRIC_CHECKING"


@contextlib.contextmanager
def _unless_set(name: str, value: str) -> Iterator[None]:
    """Within the block, the environment variable ``name`` is ``value``, unless the user's environment sets it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _without_tensorboard() -> contextlib.AbstractContextManager[None]:
    """Within the block, Tune adds none of its default loggers (see :data:`_NO_DEFAULT_LOGGERS`), unless the user's
    environment says otherwise."""
    return _unless_set(_NO_DEFAULT_LOGGERS, "1")


# Where Tuner.fit reads the trials' files back once the Tune run has ended (its ResultGrid, unused by the sweep).
_READ_BACK_MODULES = ("ray.tune.result_grid", "ray.tune.analysis.experiment_analysis")
# Tune's warning, three lines long, each time two trials end within seconds of each other: a trial's last checkpoint
# forces a snapshot of the sweep's state (CheckpointConfig num_to_keep), which is what makes a resume see every
# ended trial. Its advice (keep more checkpoints, snapshot less often) would undo that.
_SNAPSHOT_LOGGER = "ray.tune.execution.experiment_state"
_SNAPSHOT_ADVICE = "Experiment state snapshotting has been triggered multiple times"


# Optuna's line as the sampler starts, "A new study created in memory with name: optuna": the study is the sampler's
# memory of the sweep's trials, not something a user made or can find. Left out while Tune runs, as Tune's advice is.
_STUDY_LOGGER = "optuna.storages._in_memory"
_STUDY_CREATED = "A new study created"


# Tune's advice once a Ctrl-C stopped it, "Resume experiment with: Tuner.restore(path=..., trainable=...)": a sweep
# goes on with `fineprune sweep --resume`, which the sweep's own line gives.
_TUNE_LOGGER = "ray.tune.tune"
_TUNE_RESTORE_ADVICE = "Experiment has been interrupted"


@contextlib.contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """The process's handlers of SIGINT and SIGUSR1 put back after the block. Tune takes both while it runs and puts
    SIGINT's back only when one arrives: the first Ctrl-C after the trials (while the sweep exports, checks and
    registers its frontier, minutes for a real model) said "ending Ray Tune run" and did nothing, and the sweep went
    on to end as finished."""
    if threading.current_thread() is not threading.main_thread():  # no handler can be set there: Tune sets none
        yield
        return
    caught = [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    before = {number: signal.getsignal(number) for number in caught}
    try:
        yield
    finally:
        for number, handler in before.items():
            if handler is not None:  # None: one set outside Python, which cannot be put back from here
                signal.signal(number, handler)


def _fit(tuner: tune.Tuner, sweep_dir: str) -> None:
    """Run the Tune loop, leaving the process's signal handlers as they were (:func:`_own_signal_handlers`).

    ``Tuner.fit`` ends by reading every trial's files back from the sweep's storage into a ResultGrid, which the
    sweep does not use: its record is what the callback logged. A file that cannot be read back then (an error file
    cut short when the storage's disk filled) is a warning, not a traceback ending a sweep whose trials all ended.
    """
    try:
        with leaving_out(_SNAPSHOT_LOGGER, starting_with(_SNAPSHOT_ADVICE)), \
                leaving_out(_STUDY_LOGGER, starting_with(_STUDY_CREATED)), \
                leaving_out(_TUNE_LOGGER, starting_with(_TUNE_RESTORE_ADVICE)), _without_tensorboard(), \
                _unless_set(_NO_STRICT_METRICS, "1"), _own_signal_handlers():
            tuner.fit()
    except Exception as err:  # noqa: BLE001 - raised again unless it came from reading the results back
        raised_in = {frame.f_globals.get("__name__") for frame, _ in traceback.walk_tb(err.__traceback__)}
        if not raised_in & set(_READ_BACK_MODULES):
            raise
        text = " ".join(str(err).split())[:300]
        logger.warning("Ray Tune could not read its trials' files back from %s (%s: %s); the sweep goes on from what "
                       "MLflow recorded", sweep_dir, type(err).__name__, text)


def _distinct(tuner: tune.Tuner) -> DistinctConfigurations | None:
    """The sweep's :class:`DistinctConfigurations` (algorithm optuna), as the Tuner ran it, restored or not."""
    searcher = getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None)
    searcher = getattr(searcher, "search_alg", None)
    while searcher is not None and not isinstance(searcher, DistinctConfigurations):
        searcher = getattr(searcher, "searcher", None)
    return searcher


def _search_stats(distinct: DistinctConfigurations | None) -> dict[str, Any] | None:
    """How the search went: repeated suggestions answered without a trial, untried configurations run in their
    place, and why the search ended early (``over``: "exhausted", "converged", or None)."""
    if distinct is None:
        return None
    return {"repeats": distinct.repeats, "steered": distinct.steered, "over": distinct.over}


def sweep_complete(statuses: list[str], num_samples: int, search_over: str | None) -> bool:
    """Whether a sweep whose Tune run returned is complete: every trial ended normally, and either all
    ``num_samples`` trials ran or the search ended on its own (``search_over``: a finite space used up, or a sampler
    with nothing new to offer). Otherwise the run was interrupted and can be resumed."""
    if not all(status == "TERMINATED" for status in statuses):
        return False
    return len(statuses) >= num_samples or (search_over is not None and len(statuses) > 0)


# --------------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------------


def run_sweep(space_path: str | Path, experiment: str | None = None, tracking_uri: str | None = None,
              address: str | None = None, resume: bool | str = False, storage_path: str | None = None,
              report_dir: str | Path | None = None, tracking_timeout: float | None = None,
              warm_start: str | None = None, warm_start_tracking_uri: str | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep and return its summary: frontier, champion, where things are.

    A new sweep gets a Tune directory of its own (``<storage>/<experiment>-<time>-<id>``) and an MLflow parent run
    recording it, both before Ray, the teacher or any trial starts; ``resume=True`` resumes the experiment's last sweep
    started, ``resume=RUN_ID`` the sweep with that parent run. Resuming a complete sweep changes nothing and says so.

    Args:
        address: a Ray cluster to join (default ``RAY_ADDRESS``); without one, or with ``"local"``, a private local
            Ray is started and shut down at the end.
        tracking_timeout: how long the tracking server may be away (seconds) before the sweep stops; default
            ``FINEPRUNE_TRACKING_TIMEOUT`` or 300.
        warm_start: an earlier sweep (its parent run id, or an experiment: its latest sweep) whose trials the
            sampler is told before its first suggestion (:mod:`workflows.warm_start`); a new sweep only.
        warm_start_tracking_uri: the tracking store that sweep is in (default: the sweep's own); only read.

    Raises:
        SpaceError: the space is invalid (raised before Ray starts).
        RayUnavailable: the cluster address does not answer (nothing is written).
        ResumeError: there is no such sweep to resume.
        WarmStartError: ``warm_start`` names no sweep, or none of its trials fits the space.
        TrackingUnavailable: the tracking server stayed away longer than ``tracking_timeout``.
    """
    if not isinstance(space_path, (str, os.PathLike)):  # a loaded SweepSpace, say: its file is what a sweep records
        raise TypeError(f"space_path must be the path of a search-space YAML file, got {type(space_path).__name__}")
    # MLflow's fluent API points at the sweep's store while it runs (its models are logged so), and at the caller's
    # after: a notebook's next runs went to the sweep's store.
    before = mlflow.get_tracking_uri()
    try:
        return _run_sweep(space_path, experiment, tracking_uri, address, resume, storage_path, report_dir,
                          tracking_timeout, warm_start, warm_start_tracking_uri)
    finally:
        mlflow.set_tracking_uri(before)


def _run_sweep(space_path: str | Path, experiment: str | None, tracking_uri: str | None, address: str | None,
               resume: bool | str, storage_path: str | None, report_dir: str | Path | None,
               tracking_timeout: float | None, warm_start: str | None, warm_start_tracking_uri: str | None
               ) -> dict[str, Any]:
    # 1. Validate: the space, the cluster and the tracking server, before anything is written.
    space, cluster, experiment, tracking_uri = _checked(space_path, experiment, tracking_uri, address, storage_path,
                                                        resume, warm_start, warm_start_tracking_uri)
    limit = outage_limit(tracking_timeout)
    started = time.time()
    client = tracking.client_for(tracking_uri, limit=limit)
    tracking.check_reachable(client, limit)
    warm = prior_outcomes(client, space, warm_start, warm_start_tracking_uri, limit) if warm_start else None

    if resume:
        previous = _sweep_to_resume(client, experiment, None if resume is True else str(resume), tracking_uri)
        experiment = client.get_experiment(previous.info.experiment_id).name
        sweep_dir = previous.data.tags[record.TAG_SWEEP]
        _check_same_space(space, previous)  # a finished one too: "already finished" would say it is this space's
        if tracking.sweep_state(previous) == record.SWEEP_COMPLETE:
            logger.info("the sweep %s of experiment %r (run %s) already finished; nothing to resume",
                        sweep_dir, experiment, previous.info.run_id)
            return {"experiment": experiment, "parent_run_id": previous.info.run_id, "tracking_uri": tracking_uri,
                    "sweep_dir": sweep_dir, "status": "already finished"}
        _check_tune_state(sweep_dir, previous.info.run_id)
        warm = _warm_start_again(client, space, previous, sweep_dir, limit)
        storage_root = sweep_dir.rsplit("/", 1)[0]
        storage = _storage_roots(storage_path or storage_root)[1]
        logger.info("resuming the sweep %s (MLflow run %s)", sweep_dir, previous.info.run_id)
    else:
        storage_root, storage = _storage_roots(storage_path)
        # Every sweep has a directory of its own: a new sweep never restores (or writes into) an earlier one's.
        sweep_dir = f"{storage_root}/{experiment}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"

    # The sweep's identity, before anything else starts: what `--resume` finds even if the driver dies right away.
    parent = tracking.open_parent_run(client, experiment, sweep_dir, space.summary(), bool(resume), limit)
    try:
        started_ray = _init_ray(cluster)
    except BaseException:  # Ray did not start (or was interrupted): the sweep's run must not stay RUNNING
        if resume:
            tracking.finish_parent_run(client, parent, status="FAILED", state=record.SWEEP_INTERRUPTED)
        else:  # nothing ran: no empty sweep for `--resume` to take for the last one
            tracking.discard_parent_run(client, parent)
        raise
    try:
        if warm is not None:
            _recorded(lambda: tracking.tag_warm_start(client, parent, warm.sweep_run_id, len(warm.outcomes),
                                                      warm.store), "tagging the sweep's warm start", tracking_uri, limit)
        # 2. The teacher.
        teacher_dir, dense_metrics = ensure_teacher(space, storage / "teachers", held_out_checked=not cluster)
        _recorded(lambda: tracking.log_baseline(client, experiment, parent, dense_metrics,
                                                {"model": space.base.get("model", "")}, teacher_dir),
                  "logging the dense baseline", tracking_uri, limit)

        # 3. The trials.
        def params_of(trial_params: dict[str, Any]) -> dict[str, Any]:
            cfg = trial_config(space, dict(trial_params), output_dir="<trial>", teacher=teacher_dir)
            return {**config_to_dict(cfg), **{f"{record.PARAM_SEARCHED}{k}": v for k, v in trial_params.items()}}

        callback = tracking.MlflowTrialCallback(tracking_uri, experiment, parent, params_of, outage_limit=limit)
        trainable = tune.with_parameters(trial_main, space=space, teacher=teacher_dir,
                                         cache_dir=str(storage / "cache"), held_out_checked=not cluster)
        trainable = tune.with_resources(trainable, _tune_resources(space.resources))
        # Tune prints each trial's last result as a table when it ends: of these metrics, not all fifty-odd a trial
        # reports (its reporter reads them from the trainable; the record in MLflow keeps every metric).
        trainable._progress_metrics = list(_shown_first(space) + _RESULT_SHOWN)
        tuner = _tuner(space, trainable, callback, sweep_dir, storage_root, bool(resume), warm)
        with quick_http_failures():
            _fit(tuner, sweep_dir)
        if callback.failure is not None:
            raise callback.failure
        statuses, search = list(callback.trial_statuses.values()), _search_stats(_distinct(tuner))
        over = search and search["over"]
        complete = sweep_complete(statuses, space.num_samples, over)
        if complete and len(statuses) < space.num_samples:
            logger.info("the search ended after %d of %d trials: %s", len(statuses), space.num_samples,
                        "every configuration of the space ran" if over == "exhausted"
                        else "the sampler offered only configurations that already ran")

        # 4. Frontier, registry, report: each step may be done again (a resume does them all again), so a tracking
        # store that is away or locked meanwhile is waited for as during the trials.
        def conclude() -> dict[str, Any]:
            return _conclude(client, experiment, parent, space, dense_metrics, search, tracking_uri,
                             Path(report_dir or Path("reports") / experiment).resolve(), latest_left=resume is True)

        summary = _recorded(conclude, "recording the sweep's frontier", tracking_uri, limit)
        if not complete:
            logger.warning("%s; `%s` runs what is left", _what_is_left(statuses),
                           record.resume_command(tracking_uri, parent, space_path, cluster))
        ending = {} if complete else {"status": "KILLED", "state": record.SWEEP_INTERRUPTED}
        _recorded(lambda: tracking.finish_parent_run(client, parent, **ending), "ending the sweep's MLflow run",
                  tracking_uri, limit)
    except TrackingUnavailable as err:
        raise TrackingUnavailable(f"{err}; the sweep stopped (start the server again, then "
                                  f"`{record.resume_command(tracking_uri, parent, space_path, cluster)}`)") from err
    except BaseException as err:
        # The sweep's run must not stay RUNNING: `--resume` continues it once the cause is mended.
        try:
            with quick_http_failures():  # a server that is away: one quick try, not MLflow's minutes of retries
                tracking.finish_parent_run(client, parent, status="KILLED" if isinstance(err, KeyboardInterrupt)
                                           else "FAILED", state=record.SWEEP_INTERRUPTED)
        except Exception as mlflow_err:  # noqa: BLE001 - the first error is the one to report
            logger.warning("could not end the sweep's MLflow run %s: %s", parent, mlflow_err)
        if isinstance(err, KeyboardInterrupt):  # a second Ctrl-C, or SIGTERM: no summary says how to go on
            logger.warning("the sweep was stopped; `%s` runs what is left",
                           record.resume_command(tracking_uri, parent, space_path, cluster))
        raise
    finally:
        if started_ray and not cluster:  # a Ray the caller started stays theirs
            ray.shutdown()
        if not cluster:
            _remove_trial_scratch(sweep_dir)  # a cluster's trials clear theirs as they end or run again
    summary.update({"experiment": experiment, "parent_run_id": parent, "tracking_uri": tracking_uri,
                    "sweep_dir": str(sweep_dir), "status": "finished" if complete else "interrupted",
                    "wall_seconds": round(time.time() - started, 1),
                    **({"warm_start": warm.summary()} if warm is not None else {}),
                    "ui": _ui_hint(tracking_uri)})
    _log_summary(summary, space.objectives)
    return summary


def _checked(space_path: str | Path, experiment: str | None, tracking_uri: str | None, address: str | None,
             storage_path: str | None, resume: bool | str = False, warm_start: str | None = None,
             warm_start_tracking_uri: str | None = None) -> tuple[SweepSpace, str | None, str, str]:
    """What a sweep checks before it writes anything: the space, the options that go together, the cluster's address
    (or, for a private local Ray, the space's paths, the trials' resources and every data file, read as the sweep
    reads it), the storage path and where the tracking store is. ``(space, cluster, experiment, tracking URI)``.
    """
    space = load_space(space_path)
    tune_config_kwargs(space, TRIAL_METRICS)  # every objective is reported by the trials
    if warm_start_tracking_uri and not warm_start:
        raise WarmStartError("--warm-start-tracking-uri names the store of the sweep --warm-start names; give both")
    if warm_start and resume:
        raise WarmStartError("--warm-start starts a new sweep; a resumed sweep's sampler keeps what it was told "
                             "when it started")
    if warm_start:
        check_applicable(space)
    if warm_start_tracking_uri:  # only read: a store with no record yet is refused, not made
        hint = "pass the earlier sweep's --tracking-uri as --warm-start-tracking-uri"
        if os.environ.get(_RAY_JOB_ENV):  # a job's working directory is the uploaded copy
            hint += ("; under `ray job submit` only uploaded files are there, and .gitignore leaves a checkout's "
                     "mlflow.db out: copy it under another name (docs/cluster.md)")
        tracking.check_readable_store(warm_start_tracking_uri, hint=hint)
    cluster = check_machine(space, address)
    if cluster:
        _check_ray_answers(cluster)
    else:
        check_local_data(space)
    _local_storage(storage_path)
    tracking_uri = record.tracking_uri(tracking_uri)
    _check_job_store(tracking_uri)
    if warm_start and not warm_start_tracking_uri:  # the earlier sweep is in this store: it must hold a record
        tracking.check_readable_store(tracking_uri, hint="pass the earlier sweep's store as --tracking-uri, or as "
                                                         "--warm-start-tracking-uri")
    tracking.check_writable_store(tracking_uri)
    return space, cluster, experiment or space.name, tracking_uri


def check_sweep(space_path: str | Path, experiment: str | None = None, tracking_uri: str | None = None,
                address: str | None = None, storage_path: str | None = None) -> dict[str, Any]:
    """``fineprune sweep --check``: the checks a new sweep makes before it writes anything (:func:`_checked`), and
    what it would then do, without doing any of it: nothing is written, no Ray is started or joined beyond asking
    the cluster's address whether it answers, and the tracking store is not opened.

    Returns:
        The plan: the space, experiment, tracking URI and Ray; the trials (how many, searched how, judged by what,
        how many at once on this machine); and the dense teacher (given, reused from an earlier sweep by its
        fingerprint, or to be fine-tuned first).

    Raises:
        SpaceError, StorageError, TrackingStoreError, RayUnavailable: as :func:`run_sweep` before anything starts.
    """
    space, cluster, experiment, tracking_uri = _checked(space_path, experiment, tracking_uri, address, storage_path)
    if space.teacher.path is not None:
        teacher: dict[str, Any] = {"given": space.teacher.path}
    else:  # where ensure_teacher looks for it
        fingerprint = teacher_fingerprint(space)
        run_dir = _storage_roots(storage_path, make=False)[1] / "teachers" / fingerprint
        teacher = {"fingerprint": fingerprint, "directory": str(run_dir / FINAL_DIR),
                   "reused": _cached_teacher(run_dir) is not None}
    # As Tune expands the space: num_samples of each point of its grid_search keys.
    trials = space.num_samples * math.prod(len(value["grid_search"]) for value in param_space(space).values()
                                           if isinstance(value, dict) and "grid_search" in value)
    return {"check": "passed", "space": str(space.path), "experiment": experiment, "tracking_uri": tracking_uri,
            "ray": cluster or "a private local Ray", "algorithm": space.algorithm, "trials": trials,
            "configurations": space.configurations,
            "searched": {key: {k: v for k, v in spec.items() if v is not None}
                         for key, spec in space.summary()["search"].items()},
            "objectives": [list(pair) for pair in space.objectives],
            "trials_at_once": None if cluster else min(trials, trials_at_once(space)), "teacher": teacher}


def _ui_hint(tracking_uri: str) -> str:
    """Where to see a sweep in MLflow's UI: a tracking server's own address, else the ``mlflow ui`` command that
    opens the store (``mlflow ui`` takes a database or directory, and refuses a server's ``http://`` URI)."""
    if urllib.parse.urlparse(tracking_uri).scheme in ("http", "https"):
        return tracking_uri
    return shlex.join(["mlflow", "ui", "--backend-store-uri", tracking_uri, "-h", "127.0.0.1"])


def _recorded(fn: Callable[[], Any], what: str, tracking_uri: str, limit: float) -> Any:
    """``fn()``, a write of the sweep's record outside the trials (the warm start, the baseline, the frontier, the
    end), waited for while the store is away or locked as the trials' writes are: for at most ``limit`` seconds."""
    with quick_http_failures():
        return call_with_retries(fn, tracking_uri, limit, what=what, transient=_tracking_outage)


def _tracking_outage(err: BaseException) -> bool:
    """Whether an error of the sweep's last steps is the tracking store away or locked (not a full disk, a bug)."""
    return isinstance(err, mlflow.exceptions.MlflowException) and is_transient(err)


def _conclude(client, experiment: str, parent: str, space: SweepSpace, dense_metrics: dict[str, Any],
              search: dict[str, Any] | None, tracking_uri: str, report_dir: Path,
              latest_left: bool = False) -> dict[str, Any]:
    """Tag the frontier, log it and its hypervolume, register its models and the champion, write the report: the
    sweep's summary.

    ``latest_left``: the sweep was resumed as the experiment's latest left (``--resume`` without a run id): a
    champion alias on a version of a later sweep that was deleted stays there, as ``fineprune register`` leaves it
    (see :func:`registry.register_sweep`); the trials' results are recorded all the same."""
    runs = tracking.trial_runs(client, experiment, parent, include_baseline=True)
    summary = frontier_summary(client, runs, space)
    tracking.log_json(client, parent, summary["frontier"], record.ARTIFACT_FRONTIER)
    tracking.log_json(client, parent, summary["frontier_speedup"], record.ARTIFACT_FRONTIER_SPEED)
    series = tracking.hypervolume_series(runs, space.objectives,
                                         frontier.reference_point(space.objectives, space.reference_point))
    tracking.log_hypervolume(client, parent, series)
    summary["hypervolume"] = series[-1]["hypervolume"]
    if search is not None:
        summary["search"] = search
        tracking.log_search(client, parent, search)
    with checked_once():  # the report checks the champion's files, which registering has just checked
        latency = version_timing.latency_settings(space.speedup, space.resources, source=str(space.path))
        registered = registry.register_sweep(client, experiment, parent, space.registry, dense_metrics=dense_metrics,
                                             latency=latency, latest_left=latest_left, keep_going=True)
        summary["frontier_versions"], summary["champion"] = registered["frontier"], registered["champion"]
        # Where the driver ran: under `ray job submit` that is the job's temporary copy of the working directory on
        # the head, so the summary names the files in full and their copy on the sweep's run as well.
        written = write_report(experiment, out_dir=report_dir, tracking_uri=tracking_uri, sweep_run_id=parent,
                               concluding=True)
    summary["report"] = {**{k: str(v) for k, v in written.items()},
                         "artifacts": f"runs:/{parent}/{record.ARTIFACT_REPORT_DIR}"}
    return summary


def _what_is_left(statuses: list[str]) -> str:
    """Why a sweep whose Tune run returned is not complete (see :func:`sweep_complete`), in words."""
    failed = sum(status == "ERROR" for status in statuses)
    unfinished = any(status not in ("TERMINATED", "ERROR") for status in statuses)
    parts = []
    if failed:
        parts.append(f"{failed} of {len(statuses)} trials failed (the {record.TAG_ERROR} tag of each run says why)")
    if unfinished or not failed:
        parts.append("the sweep stopped before all its trials ended")
    return "; ".join(parts)


# Space keys a resume may change: they decide how trials are scheduled and judged, not what a trial computes.
# (max_concurrent, max_failures and reuse_workers are not among them: a restored sweep keeps the search algorithm, its
# concurrency limit, its reuse of workers and each trial's retries from when it started, so a new value would be
# ignored.)
_RESUMABLE_CHANGES = ("name", "registry", "resources", "reference_point")
# Mappings of the space whose every entry is one the file gives (flattened params under these prefixes).
_GIVEN_ENTRIES = ("base.", "teacher.config.")
# A logged param as the space's YAML spells it.
_AS_WRITTEN = {"True": "true", "False": "false", "None": "null"}


def _check_same_space(space: SweepSpace, previous) -> None:
    """Refuse to resume a sweep with a space that differs from the one it started with (as its run's params hold
    it) in anything a trial's result depends on: the restored trials and the new ones would not be comparable, and
    the sweep's record would describe only the first.

    Raises:
        ResumeError: names the first differing key, its value then and now.
    """
    then = previous.data.params
    now = {key[:250]: value[:6000] for key, value in record.flat_params(space.summary()).items()}  # as logged

    def refuse(key: str, value_now: str, value_then: str) -> None:
        now_, then_ = (_AS_WRITTEN.get(value, value)[:200] for value in (value_now, value_then))
        raise ResumeError(f"--resume {previous.info.run_id}: {space.path}: {key} is {now_} but the sweep started "
                          f"with {then_} (resume with the space it started with, or start a new sweep)")

    for key, value in now.items():
        if key.split(".", 1)[0] not in _RESUMABLE_CHANGES and key in then and then[key] != value:
            refuse(key, value, then[key])
    # An entry that one side gives and the other does not is a change too. (Elsewhere a key absent from the sweep's
    # params is one its space schema did not have yet.)
    for prefix in _GIVEN_ENTRIES:
        for key in sorted({k for k in now if k.startswith(prefix)} ^ {k for k in then if k.startswith(prefix)}):
            refuse(key, now.get(key, "not given"), then.get(key, "it not given"))
    # A section that is null on one side and given on the other (a scheduler or a sampler added or removed) is one
    # param on that side and several, under its name, on the other. A restored sweep keeps the scheduler and
    # searcher it started with, so such a change would be ignored.
    for one, other, value_one, value_other in ((then, now, "given", "none"), (now, then, "not given", "one")):
        for key in sorted(k for k, v in one.items() if v == "None" and k not in other):
            if key.split(".", 1)[0] not in _RESUMABLE_CHANGES and any(k.startswith(f"{key}.") for k in other):
                refuse(key, value_one, value_other)
    searched_now, searched_then = ({key.split(".")[1] for key in params if key.startswith("search.")}
                                   for params in (now, then))
    for name in sorted(searched_now ^ searched_then):
        refuse(f"search.{name}", "searched" if name in searched_now else "not searched",
               "it searched" if name in searched_then else "it not searched")


# The files a restored Tune run reads, newest first within each pattern: its state, its search's, its callbacks'
# (the MLflow run each trial was logged in) and the Tuner.
_TUNE_STATE = ("experiment_state-*.json", "search_gen_state-*.json", "basic-variant-state-*.json",
               "searcher-state-*.pkl", "callback-states-*.pkl", "tuner.pkl")


def _check_tune_state(sweep_dir: str, run_id: str) -> None:
    """Refuse to resume a sweep whose Ray Tune state (local storage) is cut short, as a disk that filled while Tune
    wrote it leaves it: Tune would log the failure, go on without the state, and stop in a traceback from its search.

    Raises:
        ResumeError: names the file.
    """
    if "://" in sweep_dir or not Path(sweep_dir, "tuner.pkl").is_file():
        return  # state elsewhere (Tune reads it), or none saved yet: the sweep starts its Tune run again
    for pattern in _TUNE_STATE:
        newest = max(Path(sweep_dir).glob(pattern), default=None)
        problem = None if newest is None else _cut_short(newest)
        if problem:
            raise ResumeError(f"--resume {run_id}: {newest}: the sweep's Ray Tune state cannot be read ({problem}; "
                              "a disk that filled while it was written leaves it so): this sweep cannot go on, start "
                              "a new one")


def _cut_short(path: Path) -> str | None:
    """Why a JSON or pickle file Tune wrote cannot be whole, or None. What a file holds decides, not its name: Tune
    writes its searchers' state (``search_gen_state-*.json``, ``basic-variant-state-*.json``) as pickles."""
    try:
        data = path.read_bytes()
        if data.startswith(b"\x80") or path.suffix != ".json":  # a pickle (protocol 2 and later open with PROTO)
            if not data.endswith(b"."):  # every pickle ends with its STOP opcode
                return "it ends before its data does"
        else:
            json.loads(data)
    except (OSError, ValueError) as err:
        return " ".join(str(err).split())
    return None


def _sweep_to_resume(client, experiment: str, run_id: str | None, tracking_uri: str):
    try:
        previous = tracking.find_sweep(client, experiment, run_id)
    except ValueError as err:
        raise ResumeError(str(err)) from err
    if previous is None:
        raise ResumeError(f"--resume: experiment {experiment!r} in {tracking_uri} has no sweep to resume"
                          f"{record.experiment_hint(client, experiment) if run_id is None else ''}")
    return previous


def frontier_summary(client, runs: list, space: SweepSpace) -> dict[str, Any]:
    """Tag the Pareto-optimal runs and return the frontier tables.

    ``frontier`` is the frontier of the space's objectives (by default F1 against linear density), in
    :func:`workflows.frontier.frontier_order` (along its density objective, as the report lists it);
    ``frontier_speedup`` is the frontier of (f1, speedup), fastest first. ``trials`` counts the
    sweep's trials however they ended (finished, stopped early, failed, interrupted), as the report does; only the
    finished ones take part in the frontiers.
    """
    objectives = list(space.objectives)
    speed_objectives = list(record.SPEED_OBJECTIVES)
    finished = [r for r in runs
                if r.data.tags.get(record.TAG_STATUS, record.STATUS_FINISHED) == record.STATUS_FINISHED]
    points = [{"run_id": r.info.run_id, "name": r.data.tags.get(record.TAG_RUN_NAME, r.info.run_id),
               "kind": r.data.tags.get(record.TAG_KIND), **r.data.metrics} for r in finished]
    shown = ["name", "kind", *record.FINAL_METRICS]
    columns = [*shown, *(name for name, _ in objectives if name not in shown), "run_id"]
    table = frontier.frontier_table(points, objectives, columns)
    table_speed = frontier.frontier_table(points, speed_objectives, columns)
    table_speed.sort(key=lambda row: -(row.get(record.SPEEDUP) or 0))
    tracking.tag_frontiers(client, finished, {record.TAG_PARETO: {row["run_id"] for row in table},
                                              record.TAG_PARETO_SPEED: {row["run_id"] for row in table_speed}})
    trials = sum(r.data.tags.get(record.TAG_KIND) == record.KIND_TRIAL for r in runs)
    return {"frontier": table, "frontier_speedup": table_speed, "trials": trials}


# What a version serves (its onnx_variant) as the closing lines say it
_RUNTIME_NAMES = {"int8": "ONNX Runtime int8", "fp32": "ONNX Runtime fp32", "none": "PyTorch"}


def _served(champion: dict[str, Any]) -> str:
    """``"; serves ONNX Runtime fp32, F1 40.39 on its trial's questions"``: what the registered champion serves
    (the registration's ``onnx_variant``) and that model's F1 as the registry's check measured it; empty for a
    version made before the check."""
    runtime = _RUNTIME_NAMES.get(champion.get("onnx_variant"))
    if runtime is None:
        return ""
    f1 = champion.get("served_f1")
    return f"; serves {runtime}" + ("" if f1 is None else f", F1 {record.figure(record.F1, f1)} on its trial's "
                                                          "questions")


def _log_summary(summary: dict[str, Any],
                 objectives: list[tuple[str, str]] | tuple = record.DENSITY_OBJECTIVES) -> None:
    """The frontier of the space's ``objectives`` (each named with its direction and shown for every point, beside
    EM, F1, linear density and speedup), the champion (or, in one line, why none was registered) and where to
    look."""
    directions = {"max": "up", "min": "down"}
    logger.info("frontier (%s):", ", ".join(f"{name} {directions.get(mode, mode)}" for name, mode in objectives))
    shown = [record.F1, record.EXACT_MATCH, record.LINEAR_DENSITY, record.SPEEDUP]
    shown += [name for name, _ in objectives if name not in shown]
    for row in summary.get("frontier", []):
        values = "  ".join(f"{name} {record.figure(name, row.get(name))}" for name in shown)
        logger.info("  %-24s %s", row.get("name"), values)
    champion = summary.get("champion") or {}
    if champion.get("model_uri"):
        logger.info("champion: %s (version %s%s)", champion["model_uri"], champion.get("version"), _served(champion))
    elif champion:  # why, as the warning before said it: the alias left, a field of the space, the policy not met
        why = next((champion[key] for key in ("alias_left", "error", "reason") if champion.get(key)), "")
        why = why.removesuffix("; no champion registered")
        logger.info("champion: none registered%s", f": {why}" if why else "")
    logger.info("open the UI: %s", summary.get("ui"))
