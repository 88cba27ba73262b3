"""The one schema of what a sweep writes to MLflow, and the readers that give it back as plain Python and DataFrames.

A sweep's record is:
  * a **parent run** (tag ``fineprune.kind=sweep``) holding the space as flat params (``registry.name``,
    ``speedup.seq_len``, ``search.<key>.type``, ...), the frontier tables as JSON artifacts, the hypervolume
    history as metrics and the report under ``report/``;
  * one nested **trial run** per Tune trial (``fineprune.kind=trial``): its run config and searched values
    (``searched.<key>``) as params, its metrics, its end (``fineprune.status``), the frontier tags (``pareto``,
    ``pareto_speedup``) and its packed model as the ``packed_model`` artifact;
  * one nested **baseline run** for the dense teacher (``fineprune.kind=baseline``);
  * the **registered versions** made from frontier trials, tagged with the sweep and trial run ids.

``workflows.tracking`` writes the record; ``workflows.registry`` and ``workflows.report`` only read it, through the
names and readers here. Every tag, param, metric and artifact name the project writes is defined once, in this
module.

Every registered version carries a copy of this module as code, for :mod:`workflows.served_model`, which reads its
artifact names: at its top it imports the standard library only (mlflow and pandas inside the readers), so that a
process that loads a version needs nothing more than the version's own requirements.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from pruning.errors import name_hint

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = [
    # where the record lives
    "DEFAULT_TRACKING_URI", "tracking_uri", "sqlite_database", "sqlite_uri", "file_uri_path", "RecordError",
    # tags of runs
    "TAG_KIND", "KIND_SWEEP", "KIND_TRIAL", "KIND_BASELINE", "TAG_PARENT", "TAG_RUN_NAME", "TAG_SWEEP",
    "TAG_SWEEP_STATE", "SWEEP_RUNNING", "SWEEP_INTERRUPTED", "SWEEP_COMPLETE", "TAG_SEARCH_OVER", "TAG_TRIAL",
    "TAG_STATUS",
    "STATUS_FINISHED", "STATUS_STOPPED_EARLY", "STATUS_FAILED", "STATUS_INTERRUPTED", "STATUS_ORPHANED", "STATUSES",
    "TAG_PARETO", "TAG_PARETO_SPEED", "FRONTIER_TAGS", "TAG_NODE", "TAG_PID", "TAG_PRECISION", "TAG_RETRIES",
    "TAG_TOOK_OVER",
    "TAG_CONFIGURATION", "TAG_WARM_START", "TAG_WARM_START_TRIALS", "TAG_WARM_START_STORE",
    "TAG_PACKED_ARTIFACT", "TAG_MODEL_DIR", "TAG_ERROR_FILE", "TAG_ERROR", "TAG_EARLIER_ENDS", "TAG_FINEPRUNE_VERSION",
    "fineprune_version",
    # tags of registered versions, the alias
    "TAG_TRIAL_RUN", "TAG_SWEEP_RUN", "TAG_POLICY", "TAG_POLICY_THRESHOLD", "FORMER_POLICY_TAGS",
    "TAG_CHAMPION_UNTIL", "last_champion",
    "TAG_VERSION_PRECISION", "TAG_ONNX", "TAG_ONNX_VARIANT", "TAG_INT8_CHECK", "ONNX_SCORE_TAGS",
    "DEFAULT_MAX_INT8_F1_DROP", "ALIAS", "MODELS_SCHEME", "metric_tag", "tag_float",
    # params
    "PARAM_SEARCHED", "PARAM_REGISTRY", "PARAM_SPEEDUP", "PARAM_RESOURCES", "PARAM_SEARCH", "PARAM_OBJECTIVES",
    "flat_params", "params_under", "search_types", "sweep_objectives",
    # metrics
    "EXACT_MATCH", "F1", "LINEAR_DENSITY", "TOTAL_DENSITY", "HEADS_REMOVED", "SPEEDUP", "MAX_LOGIT_DIFF",
    "TIMING_SPREAD", "PARAMS_BEFORE", "PARAMS_AFTER", "STEP", "LOSS", "HYPERVOLUME", "HYPERVOLUME_COMPUTE",
    "TRIAL_COMPUTE",
    "SEARCH_REPEATS", "SEARCH_STEERED",
    "PAUSED_S", "FINAL_METRICS", "NULL_METRICS", "EVAL_METRICS", "METRIC_MODES", "METRIC_BEST",
    "DENSITY_OBJECTIVES", "SPEED_OBJECTIVES",
    # artifacts
    "ARTIFACT_PACKED_MODEL", "ARTIFACT_FRONTIER", "ARTIFACT_FRONTIER_SPEED",
    "ARTIFACT_REPORT_DIR", "ARTIFACT_REPORT_HTML", "ARTIFACT_REPORT_MARKDOWN", "ARTIFACT_QA_MODEL",
    "ARTIFACT_MODEL_DIR", "ARTIFACT_ONNX_DIR",
    # the registry spec, the readers
    "RegistrySpec", "POLICY_THRESHOLDS", "policy_text", "latest_sweep", "latest_sweep_left", "deleted_run",
    "deleted_experiment", "experiment_hint", "registered_model_hint", "restore_command", "fineprune_command",
    "resume_command", "register_frontier_command",
    "DELETED", "REMOVED", "run_deleted", "deleted_source", "trials", "metric_history", "COLUMNS",
]

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"

# ---- tags of runs ---------------------------------------------------------------------------------------------
TAG_KIND = "fineprune.kind"
KIND_SWEEP, KIND_TRIAL, KIND_BASELINE = "sweep", "trial", "baseline"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: trial and baseline runs nest under the sweep's run
TAG_RUN_NAME = "mlflow.runName"
TAG_SWEEP = "fineprune.sweep"  # the sweep's storage path: identifies a sweep across resumes
TAG_SWEEP_STATE = "fineprune.sweep_state"  # on the parent run: whether `--resume` has work to do
SWEEP_RUNNING, SWEEP_INTERRUPTED, SWEEP_COMPLETE = "running", "interrupted", "complete"
TAG_SEARCH_OVER = "fineprune.search_over"  # on the parent run: why the search ended early (exhausted, converged)
TAG_WARM_START = "fineprune.warm_start"  # on the parent run: the earlier sweep run whose trials the sampler was told
TAG_WARM_START_TRIALS = "fineprune.warm_start_trials"  # and how many of them
TAG_WARM_START_STORE = "fineprune.warm_start_tracking_uri"  # and the store it is in, when not the sweep's own
TAG_TRIAL = "fineprune.trial_id"
TAG_STATUS = "fineprune.status"  # how a trial ended
STATUS_FINISHED, STATUS_STOPPED_EARLY, STATUS_FAILED = "finished", "stopped_early", "failed"
STATUS_INTERRUPTED, STATUS_ORPHANED = "interrupted", "orphaned"  # a resume continues it / nothing took it over
STATUSES = (STATUS_FINISHED, STATUS_STOPPED_EARLY, STATUS_FAILED)  # how a trial of a complete sweep ends
TAG_PARETO = "pareto"  # "true" on the finished runs on the frontier of the space's objectives, else "false"
TAG_PARETO_SPEED = "pareto_speedup"  # the same for the frontier of F1 against measured speedup
FRONTIER_TAGS = (TAG_PARETO, TAG_PARETO_SPEED)
TAG_NODE = "fineprune.node_id"
TAG_PID = "fineprune.pid"  # the trial's worker process (the last one, after retries)
TAG_PRECISION = "fineprune.precision"  # the precision the final metrics were measured in (fp32 or bf16)
TAG_RETRIES = "fineprune.retries"  # how often the trial's worker died and the trial went on from its checkpoint
TAG_TOOK_OVER = "fineprune.took_over_trial_id"  # the lost trial whose run this trial continued
TAG_CONFIGURATION = "fineprune.configuration"  # a trial run's searched values (JSON), set as the run is created
TAG_PACKED_ARTIFACT = "fineprune.packed_artifact"  # set once the packed model is logged: its artifact path
TAG_MODEL_DIR = "fineprune.model_dir"  # the baseline's model directory
TAG_ERROR_FILE = "fineprune.error_file"  # a failed trial's error file (traceback), in the sweep's storage
TAG_ERROR = "fineprune.error"  # one line: why the trial failed (its exception, or e.g. its packed model upload)
# A trial run that ended, then ran again (a resume runs failed trials again): each earlier end, as JSON
# [[end_ms, compute_s, status], ...], compute_s counting the run's compute up to that end. Each is a step of the
# hypervolume series, as it was when the sweep logged it.
TAG_EARLIER_ENDS = "fineprune.earlier_ends"
# The fineprune release that made a run (sweep, trial or baseline); on a served model logged for a version, and the
# versions made of it, the release whose code it ships (the one that logged it).
TAG_FINEPRUNE_VERSION = "fineprune.version"

# ---- tags of registered model versions ------------------------------------------------------------------------
TAG_TRIAL_RUN = "fineprune.trial_run_id"
TAG_SWEEP_RUN = "sweep_run_id"
TAG_POLICY = "policy"  # the champion policy that made the version champion
TAG_POLICY_THRESHOLD = "policy_threshold"  # and its threshold as text, e.g. "max_density 0.5"
# The two above, as a version the champion alias has left keeps them: only the champion says a policy chose it.
FORMER_POLICY_TAGS = {TAG_POLICY: "former_champion_policy", TAG_POLICY_THRESHOLD: "former_champion_policy_threshold"}
# When (milliseconds since the epoch) the champion alias left a version: of two versions of one sweep that were
# champion in turn, the later one is its champion (a later version number need not be).
TAG_CHAMPION_UNTIL = "former_champion_until"
TAG_VERSION_PRECISION = "precision"  # the precision the version's EM/F1 were measured in
TAG_ONNX = "onnx"  # the ONNX Runtime variants the version carries ("fp32,int8"), or why it carries none
TAG_ONNX_VARIANT = "onnx_variant"  # what the version serves: ONNX Runtime int8 or fp32, or none (PyTorch)
# Which ONNX variant serves, and why: one line, e.g. "serves ONNX Runtime fp32: int8 F1 37.76 against fp32 40.39 on
# the first 150 questions the trial was scored on, more than 1 F1 below (max_int8_f1_drop; the drop's standard
# error, question by question: 1.75)"
TAG_INT8_CHECK = "int8_check"
# (variant, metric) -> the tag of that variant's score on the questions of the int8 check
ONNX_SCORE_TAGS = {(variant, metric): f"onnx_{variant}_{metric}" for variant in ("fp32", "int8")
                   for metric in ("f1", "exact_match")}
# The F1 points the int8 model may lose against the fp32 one and still be the one served (registry section)
DEFAULT_MAX_INT8_F1_DROP = 1.0
ALIAS = "champion"
RUNTIMES = ("served", "torch")  # what `fineprune select` times: each version as it serves, or its packed PyTorch model

# ---- params ---------------------------------------------------------------------------------------------------
PARAM_SEARCHED = "searched."  # trial runs: a searched value as the searcher sampled it
PARAM_REGISTRY = "registry."  # parent run: the registry spec (see RegistrySpec)
PARAM_SPEEDUP = "speedup."  # parent run: how speedups are timed
PARAM_RESOURCES = "resources."  # parent run: one trial's resources
PARAM_SEARCH = "search."  # parent run: search.<key>.type, .low, .high, .values ...
PARAM_OBJECTIVES = "objectives"  # parent run: the space's objectives as JSON, [[metric, max|min], ...]

# ---- metrics --------------------------------------------------------------------------------------------------
EXACT_MATCH = "exact_match"
F1 = "f1"
LINEAR_DENSITY = "linear_density"
TOTAL_DENSITY = "total_density"
HEADS_REMOVED = "heads_removed"
SPEEDUP = "speedup"
MAX_LOGIT_DIFF = "max_logit_diff"
TIMING_SPREAD = "timing_spread"  # how far a trial's timed passes disagree (pruning.packing.PackReport)
PARAMS_BEFORE = "params_before"  # parameters of the model before packing (pruning.packing.PACK_METRICS)
PARAMS_AFTER = "params_after"  # parameters of the packed model (pruning.packing.PACK_METRICS)
STEP = "step"
LOSS = "loss"
HYPERVOLUME = "hypervolume"  # on the parent run, step = trials completed
HYPERVOLUME_COMPUTE = "hypervolume_by_compute_s"  # the same values, step = trial seconds spent so far (whole ones)
TRIAL_COMPUTE = "trial_compute_s"  # on the parent run, step = trials completed: the trial seconds spent so far
SEARCH_REPEATS = "search_repeats"  # on the parent run: suggestions of configurations that already ran
SEARCH_STEERED = "search_steered"  # on the parent run: untried configurations run in their place
PAUSED_S = "paused_s"  # trial runs: seconds the run stood ended between sweep sessions (a resume reopened it)
# What every finished trial (and the baseline) reports: the metrics a registered version is tagged with.
FINAL_METRICS = (EXACT_MATCH, F1, LINEAR_DENSITY, TOTAL_DENSITY, HEADS_REMOVED, SPEEDUP)
# What a trial scored on questions that hold unanswerable ones (SQuAD v2.0) reports as well, and its version is tagged
# with: F1 over each kind and, for a model answering "no answer", the F1 of the best threshold for those questions
# and that threshold (see pruning.squad_metric.evaluate_answers).
NULL_METRICS = ("has_answer_f1", "no_answer_f1", "best_f1", "best_f1_threshold")
# The decimals a metric is shown with in logs and in the report's tables: scores 2, fractions 3, counts none.
DECIMALS = {EXACT_MATCH: 2, F1: 2, LINEAR_DENSITY: 3, TOTAL_DENSITY: 3, HEADS_REMOVED: 0, SPEEDUP: 2, STEP: 0}
# Scalars the trainer reports at every evaluation: the only metrics a scheduler can act on.
EVAL_METRICS = (EXACT_MATCH, F1, LINEAR_DENSITY, TOTAL_DENSITY, HEADS_REMOVED, LOSS, "loss_ce", "loss_distil")
# Which way each metric a trial reports is better: an objective or a scheduler metric must be optimised this way.
METRIC_MODES: dict[str, str] = {EXACT_MATCH: "max", F1: "max", HEADS_REMOVED: "max", SPEEDUP: "max",
                                LINEAR_DENSITY: "min", TOTAL_DENSITY: "min", LOSS: "min", "loss_ce": "min",
                                "loss_distil": "min", MAX_LOGIT_DIFF: "min", PARAMS_BEFORE: "min",
                                PARAMS_AFTER: "min", TIMING_SPREAD: "min"}
# The best value a metric can take, where it has one (scores in points, densities and losses at zero).
METRIC_BEST: dict[str, float] = {EXACT_MATCH: 100.0, F1: 100.0, LINEAR_DENSITY: 0.0, TOTAL_DENSITY: 0.0, LOSS: 0.0,
                                 "loss_ce": 0.0, "loss_distil": 0.0, MAX_LOGIT_DIFF: 0.0, PARAMS_AFTER: 0.0}
DENSITY_OBJECTIVES: tuple[tuple[str, str], ...] = ((F1, "max"), (LINEAR_DENSITY, "min"))  # the default objectives
SPEED_OBJECTIVES: tuple[tuple[str, str], ...] = ((F1, "max"), (SPEEDUP, "max"))  # the second frontier

# ---- artifacts ------------------------------------------------------------------------------------------------
ARTIFACT_PACKED_MODEL = "packed_model"  # trial runs: the packed model directory
ARTIFACT_FRONTIER = "frontier.json"  # parent run: the frontier table of the space's objectives
ARTIFACT_FRONTIER_SPEED = "frontier_speedup.json"
ARTIFACT_REPORT_DIR = "report"
ARTIFACT_REPORT_HTML = "report.html"
ARTIFACT_REPORT_MARKDOWN = "report.md"
ARTIFACT_QA_MODEL = "qa_model"  # registered versions: the pyfunc model logged on the trial's run
ARTIFACT_MODEL_DIR = "model_dir"  # the pyfunc model's own artifact: the packed model directory
ARTIFACT_ONNX_DIR = "onnx_dir"  # the pyfunc model's own artifact: the model exported for ONNX Runtime
# A registered version as MLflow names it, and as eval and ask take it: models:/NAME/VERSION or models:/NAME@ALIAS.
MODELS_SCHEME = "models:/"

# The columns of :func:`trials` before the metric and ``searched.*`` columns.
COLUMNS = ("run_id", "name", "kind", "status", "run_status", TAG_PARETO, TAG_PARETO_SPEED, "packed", "start_time",
           "end_time", "error", "error_file", "fineprune_version")
_SEARCH_PAGE = 1000


@functools.cache
def fineprune_version() -> str:
    """The release of fineprune that runs: its package metadata (``unknown`` for code that was never installed),
    and where the code is a git checkout (``make setup`` installs one in place), its commit as a local version
    label, since one release spans many commits there: ``0.1.0+g1a2b3c4d5e6f``, with ``.dirty`` where tracked
    files differ from that commit."""
    try:
        release = importlib.metadata.version("fineprune")
    except importlib.metadata.PackageNotFoundError:
        release = "unknown"
    commit = _checkout_commit(Path(__file__).resolve().parents[1])
    return release if commit is None else f"{release}+g{commit}"


def _checkout_commit(root: Path) -> str | None:
    """The short commit of the git checkout ``root`` (``.dirty`` after it where tracked files were changed), or
    None where ``root`` is none, or git cannot say (not installed, a repository it refuses to read)."""
    if not (root / ".git").exists():  # an installed package: site-packages holds no repository of its own
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (".dirty" if changed else "")


class RecordError(ValueError):
    """What was asked for is not in the record (no such experiment, no sweep, a sweep without a registry spec)."""


def tracking_uri(given: str | None = None) -> str:
    """The tracking URI to use: ``given``, else ``$MLFLOW_TRACKING_URI``, else :data:`DEFAULT_TRACKING_URI`."""
    return given or os.environ.get(TRACKING_URI_ENV) or DEFAULT_TRACKING_URI


def sqlite_database(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, the one SQLAlchemy (and so MLflow) opens: percent-escapes
    decoded (``sqlite:///my%20runs/mlflow.db`` is ``my runs/mlflow.db``), options after ``?`` left out. None for a
    store of another kind."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(urllib.parse.unquote(uri[len("sqlite:///"):].split("?", 1)[0]))


def sqlite_uri(database: str | Path) -> str:
    """The ``sqlite:///`` URI of the database file ``database``, which :func:`sqlite_database` reads back: only ``%``
    and ``?`` are escaped, which SQLAlchemy would read as an escape and as options. Spaces and other letters stay as
    they are: MLflow makes the database's directory from the URI as written, and would make ``my%20runs`` beside
    ``my runs``."""
    return "sqlite:///" + str(database).replace("%", "%25").replace("?", "%3F")


def portable_uri(uri: str) -> str:
    """``uri`` as it reads from any directory: a ``sqlite:///`` store whose database path is relative (the default
    ``sqlite:///mlflow.db``) with that path made absolute, from the working directory, its options kept; any other
    URI as it is. What a report or a suggested command hands on: run from another directory, the relative one would
    make an empty database there and find nothing in it."""
    database = sqlite_database(uri)
    if database is None or database.is_absolute():
        return uri
    _, sep, options = uri.partition("?")
    return sqlite_uri(os.path.abspath(database)) + sep + options


def file_uri_path(uri: str) -> str | None:
    """The local path a ``file:`` URI names (``file:///a%20b``, ``file://localhost/a%20b`` and ``file:/a%20b`` are
    all ``/a b``), percent-escapes decoded as Ray and MLflow read them; None for anything else (a plain path, an
    ``s3://`` URI).

    Raises:
        ValueError: the URI names another host, which no path of this machine reaches.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme.lower() != "file":
        return None
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{uri}: a file URI of the host {parsed.netloc!r}, not of this machine (write file:///PATH)")
    return urllib.request.url2pathname(parsed.path)


# --------------------------------------------------------------------------------------------------------------
# Params: nested values as flat ``a.b.c`` names with string values
# --------------------------------------------------------------------------------------------------------------


def flat_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as MLflow params: ``{"registry": {"name": "x"}}`` -> ``{"registry.name": "x"}``.

    Lists and tuples are written as JSON, everything else with ``str`` (None becomes ``"None"``).
    """
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def params_under(params: Mapping[str, str], prefix: str) -> dict[str, str]:
    """The params whose names start with ``prefix`` (e.g. :data:`PARAM_SPEEDUP`), keyed by the rest of the name."""
    return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}


def search_types(params: Mapping[str, str]) -> dict[str, str]:
    """The searched keys of a sweep's parent run, in the space's order, with their types (``uniform``, ...)."""
    return {name[:-len(".type")]: value for name, value in params_under(params, PARAM_SEARCH).items()
            if name.endswith(".type")}


def sweep_objectives(params: Mapping[str, str]) -> list[tuple[str, str]]:
    """The objectives a sweep's parent run recorded (the ones its ``pareto`` tags follow); the default objectives
    when it recorded none."""
    try:
        value = json.loads(params[PARAM_OBJECTIVES])
        objectives = [(str(name), str(mode)) for name, mode in value]
    except (KeyError, ValueError, TypeError):
        return list(DENSITY_OBJECTIVES)
    return objectives or list(DENSITY_OBJECTIVES)


def _optional_float(value: str | None) -> float | None:
    if value is None or value in ("", "None", "null"):
        return None
    return float(value)


# The threshold each champion policy reads.
POLICY_THRESHOLDS = {"best_f1_under_density": "max_density", "min_density_within_f1_drop": "max_f1_drop",
                     "fastest_within_f1_drop": "max_f1_drop", "best_f1_under_latency": "max_latency_ms"}


def policy_text(policy: str, threshold: str | None) -> str:
    """A champion policy as the report shows it: ``"best_f1_under_density (max_density 0.5)"``."""
    return f"{policy} ({threshold})" if threshold else policy


@dataclass(frozen=True)
class RegistrySpec:
    """Which trial becomes the registered champion: a policy and its one threshold.

    Written on the sweep's parent run as ``registry.<field>`` params (:meth:`to_params`) and read back with
    :meth:`from_params`; the two round-trip.
    """

    name: str
    policy: str = "best_f1_under_density"
    max_density: float | None = None  # best_f1_under_density: linear_density <= this
    max_f1_drop: float | None = None  # *_within_f1_drop: F1 points below the dense teacher's F1
    max_latency_ms: float | None = None  # best_f1_under_latency: measured latency of the registered version
    onnx: bool = True  # export each new version for ONNX Runtime; False: new versions serve through PyTorch
    # A new version serves ONNX Runtime int8 when it loses at most this many F1 points against fp32 on its trial's
    # questions, else fp32; None: int8, unchecked
    max_int8_f1_drop: float | None = DEFAULT_MAX_INT8_F1_DROP

    def threshold(self) -> str:
        """The policy's threshold as text, ``"max_density 0.5"`` (empty when the policy has none given)."""
        key = POLICY_THRESHOLDS.get(self.policy)
        value = getattr(self, key) if key else None
        return "" if value is None else f"{key} {value:g}"

    def describe(self) -> str:
        """The policy with its threshold, ``"best_f1_under_density (max_density 0.5)"``."""
        return policy_text(self.policy, self.threshold())

    def to_params(self) -> dict[str, str]:
        """The spec as the parent run's params (the same names and values as the flattened space)."""
        return flat_params({PARAM_REGISTRY[:-1]: asdict(self)})

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> RegistrySpec:
        """The spec a sweep's parent run recorded.

        Raises:
            RecordError: the params hold no ``registry.name``, a policy this release does not know, a threshold
                that is not a number, or an ``onnx`` that is not true or false.
        """
        values = params_under(params, PARAM_REGISTRY)
        if "name" not in values:
            raise RecordError("the sweep's run records no registry name (param registry.name)")
        kwargs: dict[str, Any] = {"name": values["name"]}
        for item in fields(cls):
            if item.name == "name" or item.name not in values:
                continue
            if item.name == "policy":
                if values["policy"] not in POLICY_THRESHOLDS:  # a record another release of fineprune wrote
                    raise RecordError(f"param registry.policy: unknown policy {values['policy']!r} (allowed: "
                                      f"{', '.join(POLICY_THRESHOLDS)})")
                kwargs["policy"] = values["policy"]
                continue
            if item.name == "onnx":
                flag = values["onnx"].strip().lower()
                if flag not in ("true", "false"):
                    raise RecordError(f"param registry.onnx: not true or false: {values['onnx']!r}")
                kwargs["onnx"] = flag == "true"
                continue
            try:
                kwargs[item.name] = _optional_float(values[item.name])
            except ValueError:
                raise RecordError(f"param registry.{item.name}: not a number: {values[item.name]!r}") from None
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------------


def latest_sweep(client: MlflowClient, experiment: str, run_id: str | None = None) -> Run:
    """A sweep's parent run: ``run_id`` (checked to be a sweep of ``experiment``), else the experiment's latest.

    A sweep run deleted by hand (the MLflow UI) is one the user has set aside: the latest is the latest left, and
    a warning names it and the later ones deleted.

    Raises:
        RecordError: the experiment does not exist (or was deleted), has no sweep, or ``run_id`` is not one of its
            sweeps (or was deleted); the message is one line naming the experiment and the tracking URI.
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise RecordError(f"experiment {experiment!r} not found in {client.tracking_uri}"
                          f"{experiment_hint(client, experiment)}")
    if found.lifecycle_stage == "deleted":
        raise RecordError(deleted_experiment(experiment, found.experiment_id, client.tracking_uri))
    if run_id is not None:
        # Lazy: the space schema imports this module's names, and loading a space stays free of MLflow's import.
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":  # no such run: never made, or gone with `mlflow gc`
                raise RecordError(f"run {run_id} is not in {client.tracking_uri} (removed for good, by `mlflow gc`, "
                                  f"or never made): pass a sweep run of experiment {experiment!r}") from None
            run = None
        if run is None or run.info.experiment_id != found.experiment_id or \
                run.data.tags.get(TAG_KIND) != KIND_SWEEP:
            raise RecordError(f"run {run_id} is not a sweep of experiment {experiment!r} in {client.tracking_uri}")
        if run.info.lifecycle_stage == "deleted":
            raise RecordError(deleted_run(run_id, f"a sweep of experiment {experiment!r}", client.tracking_uri))
        return run
    run, deleted = latest_sweep_left(client, found.experiment_id, experiment)
    if run is not None:
        return run
    if deleted:
        raise RecordError(f"experiment {experiment!r} in {client.tracking_uri} has no sweep run left: "
                          + deleted_run(deleted[0], "its latest sweep", client.tracking_uri))
    raise RecordError(f"experiment {experiment!r} in {client.tracking_uri} has no sweep run")


def latest_sweep_left(client: MlflowClient, experiment_id: str, experiment: str,
                      flag: str = "--sweep-run") -> tuple[Run | None, list[str]]:
    """The latest sweep run of the experiment that was not deleted by hand (None when there is none), and the
    sweep runs deleted since it started, latest first. Passing over deleted ones logs a warning naming both and
    ``flag``, the option that names another sweep."""
    from mlflow.entities import ViewType  # lazy, as in latest_sweep

    deleted: list[str] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{KIND_SWEEP}'",
                                  run_view_type=ViewType.ALL, order_by=["attributes.start_time DESC"],
                                  max_results=_SEARCH_PAGE, page_token=token)
        for run in page:
            if run.info.lifecycle_stage != "deleted":
                if deleted:
                    logger.warning("experiment %r: using sweep run %s, the latest left: the later %s deleted "
                                   "(restore one with `%s`, or pass %s)", experiment, run.info.run_id,
                                   _deleted_sweeps(deleted), restore_command(client.tracking_uri, "RUN_ID"), flag)
                return run, deleted
            deleted.append(run.info.run_id)
        token = page.token
        if not token:
            return None, deleted


def _deleted_sweeps(run_ids: list[str]) -> str:
    """``sweep run X was`` / ``sweep runs X, Y were``: the sweeps deleted by hand, latest first."""
    return f"sweep run {run_ids[0]} was" if len(run_ids) == 1 else f"sweep runs {', '.join(run_ids)} were"


def restore_command(tracking_uri: str, run_id: str | None = None, experiment_id: str | None = None) -> str:
    """The ``mlflow ... restore`` command line that brings the deleted run ``run_id`` (or experiment) back in the store
    at ``tracking_uri``. MLflow's command line reads its store from ``MLFLOW_TRACKING_URI`` only, so the line sets
    it: without it, the command restores in its default store and says so, while the run stays deleted here."""
    what = f"runs restore --run-id {run_id}" if run_id else f"experiments restore --experiment-id {experiment_id}"
    return f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} mlflow {what}"


def figure(name: str, value: Any) -> str:
    """The value of metric ``name`` as a log line shows it, with the metric's :data:`DECIMALS` (another metric: 3
    below 1, else 2); '-' when it is missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    decimals = DECIMALS.get(name, 3 if abs(value) < 1 else 2)
    return f"{value:.{decimals}f}"


def metric_tag(value: float) -> str:
    """A metric as a version's tag: the run's value itself (``repr``, which reads back as the same float), a whole
    number without its ``.0``. Rounded, ``fineprune select`` would report and rank by other figures than the
    trial's."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def tag_float(tags: Mapping[str, str], key: str) -> float | None:
    """The number a version's tag ``key`` holds (:func:`metric_tag`), or None when it is missing, not a number or
    not finite (a tag removed or edited by hand)."""
    try:
        value = float(tags[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def last_champion(versions: Sequence[Any]) -> Any | None:
    """Of registered versions, the one most lately champion: one that a policy chose and the alias has not left
    (its ``policy`` tag), else the one the alias left last (:data:`TAG_CHAMPION_UNTIL`; a version that left before
    versions recorded when counts as earliest), the later version on a tie; None when no version was champion."""
    def tags(version: Any) -> Mapping[str, str]:
        return version.tags or {}

    chosen = [v for v in versions if tags(v).get(TAG_POLICY) or tags(v).get(FORMER_POLICY_TAGS[TAG_POLICY])]
    if not chosen:
        return None
    return max(chosen, key=lambda v: (bool(tags(v).get(TAG_POLICY)), tag_float(tags(v), TAG_CHAMPION_UNTIL) or 0.0,
                                      int(v.version)))


def fineprune_command(command: str, tracking_uri: str, *args: str) -> str:
    """The ``fineprune COMMAND ARGS --tracking-uri URI`` line a message tells a user to run, quoted for a shell.

    It names the store the message comes from: without ``--tracking-uri`` the command would read
    ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` instead, and not find (or change) the sweep it is about."""
    return shlex.join(["fineprune", command, *(str(a) for a in args), "--tracking-uri", tracking_uri])


SPACE_PLACEHOLDER = "SPACE: the search space file the sweep ran"  # what `resume_command`'s default SPACE stands for


def resume_command(tracking_uri: str, run_id: str, space: str | Path = "SPACE", address: str | None = None) -> str:
    """The ``fineprune sweep --space SPACE --resume RUN_ID --tracking-uri URI`` line that goes on with the sweep
    ``run_id``: in its tracking store, and on the Ray cluster ``address`` it ran on (without ``--address``, a private
    local Ray). A sweep does not record its space file; where it is not known the line names it ``SPACE``, and the
    message says so with `SPACE_PLACEHOLDER`."""
    joins = ("--address", address) if address else ()
    return fineprune_command("sweep", tracking_uri, "--space", space, "--resume", run_id, *joins)


def register_frontier_command(client: MlflowClient, sweep: str | None) -> str:
    """The ``fineprune register --frontier`` command that registers the frontier of the sweep run ``sweep`` again,
    in the store of ``client``: its experiment is required, and the sweep named, as it may not be the latest."""
    from mlflow.exceptions import MlflowException

    if not sweep:  # a version no sweep registered: which experiment is the user's to say
        return fineprune_command("register", client.tracking_uri, "--experiment", "EXPERIMENT", "--frontier")
    try:
        experiment = client.get_experiment(client.get_run(sweep).info.experiment_id).name
    except MlflowException:  # the sweep removed for good
        experiment = "EXPERIMENT"
    return fineprune_command("register", client.tracking_uri, "--experiment", experiment, "--sweep-run", sweep,
                             "--frontier")


def deleted_run(run_id: str, what: str, tracking_uri: str) -> str:
    """The one line that says the run ``run_id`` (``what`` it is) was deleted, and how to have it back."""
    return f"run {run_id} ({what}) was deleted; restore it (`{restore_command(tracking_uri, run_id)}`) to use it again"


def deleted_experiment(name: str, experiment_id: str, tracking_uri: str) -> str:
    """The one line that says the experiment ``name`` was deleted, and the ways on: MLflow keeps a deleted
    experiment's name (and its runs) until it is removed for good."""
    gc = shlex.join(["mlflow", "gc", "--backend-store-uri", tracking_uri, "--tracking-uri", tracking_uri,
                     "--experiment-ids", str(experiment_id)])
    return (f"experiment {name!r} in {tracking_uri} was deleted (id {experiment_id}): restore it "
            f"(`{restore_command(tracking_uri, experiment_id=experiment_id)}`, which brings its runs back), remove it "
            f"for good (`{gc}`), or pass another --experiment")


def experiment_hint(client: MlflowClient, experiment: str) -> str:
    """``"; did you mean 'x'?"`` with the store's experiment closest to a misspelt ``experiment``, else ``""``."""
    return _closest(experiment, lambda: [found.name for found in client.search_experiments()])


def registered_model_hint(client: MlflowClient, name: str) -> str:
    """``"; did you mean 'x'?"`` with the registered model closest to a misspelt ``name``, else ``""``."""
    return _closest(name, lambda: [model.name for model in client.search_registered_models(max_results=1000)])


def _closest(name: str, names: Callable[[], list[str]]) -> str:
    """The hint for ``name`` among ``names()``; ``""`` where none is close or the store cannot list them."""
    try:
        return name_hint(name, names())
    except Exception:  # noqa: BLE001 - a hint, never the error
        return ""


DELETED, REMOVED = "deleted", "removed"  # a run deleted (in the UI: restorable), or removed for good (`mlflow gc`)


def run_deleted(client: MlflowClient, run_id: str | None) -> str | None:
    """Whether the run ``run_id`` was deleted: :data:`DELETED` (in the UI, so that `mlflow runs restore` brings it
    back), :data:`REMOVED` (removed for good since, by `mlflow gc`: the store no longer has it), else None."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return DELETED if client.get_run(run_id).info.lifecycle_stage == "deleted" else None
    except MlflowException as err:
        return REMOVED if err.error_code == "RESOURCE_DOES_NOT_EXIST" else None


def deleted_source(client: MlflowClient, tags: Mapping[str, str], trial_run_id: str | None,
                   lifecycle: dict[str, str | None]) -> str | None:
    """Why a version is not to be chosen when its trial run, or the sweep run it was registered from, was deleted
    (in the MLflow UI: set aside, as `fineprune register` passes a deleted sweep over; or removed for good), else
    None. ``lifecycle`` caches what :func:`run_deleted` says of each run read."""
    def deleted(run_id: str | None) -> str | None:
        if run_id and run_id not in lifecycle:
            lifecycle[run_id] = run_deleted(client, run_id)
        return lifecycle[run_id] if run_id else None

    sweep = tags.get(TAG_SWEEP_RUN)
    for run_id, what in ((trial_run_id, "trial"), (sweep, "sweep")):
        state = deleted(run_id)
        if state == REMOVED:
            return f"its {what} run {run_id} was removed for good (`mlflow gc`) and cannot be restored"
        if state == DELETED:
            return (f"its {what} run {run_id} was deleted (restore it, "
                    f"`{restore_command(client.tracking_uri, run_id)}`, to have the version chosen again)")
    return None


def _child_runs(client: MlflowClient, sweep: Run) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([sweep.info.experiment_id],
                                  filter_string=f"tags.`{TAG_PARENT}` = '{sweep.info.run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=_SEARCH_PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _status(run: Run) -> str:
    status = run.data.tags.get(TAG_STATUS)
    if status:
        return status
    # A run the sweep did not end (its driver died): what MLflow says.
    return {"FINISHED": STATUS_FINISHED, "FAILED": STATUS_FAILED,
            "KILLED": STATUS_STOPPED_EARLY}.get(run.info.status, run.info.status.lower())


def trials(client: MlflowClient, sweep: Run | str, include_baseline: bool = True) -> pd.DataFrame:
    """A sweep's trial runs (and its dense baseline) as a table, one row per run.

    Columns: :data:`COLUMNS` (``status`` is the ``fineprune.status`` tag, or what MLflow says of a run the sweep
    did not end; ``pareto`` and ``pareto_speedup`` are the frontier tags as booleans; ``packed``: the packed model
    is logged; ``error`` and ``error_file``: why a failed trial failed and where its traceback is, None when the
    run has no such tag; ``fineprune_version``: the fineprune release that made the run, missing for a run made before
    runs recorded it), then one column per metric any run logged (NaN where a run lacks it), then
    ``searched.<key>`` per searched value (strings as logged; missing, ``pd.isna``, where a run lacks it). Rows: the
    baseline first, then the trials in the order they started.

    Args:
        client: a client of the tracking store.
        sweep: the sweep's parent run, or its id.
        include_baseline: keep the dense baseline's row.
    """
    import pandas as pd  # lazy: as MLflow in latest_sweep, pandas stays out of loading a space

    if isinstance(sweep, str):
        sweep = client.get_run(sweep)
    kinds = {KIND_TRIAL, KIND_BASELINE} if include_baseline else {KIND_TRIAL}
    runs = [r for r in _child_runs(client, sweep) if r.data.tags.get(TAG_KIND) in kinds]
    runs.sort(key=lambda r: (r.data.tags.get(TAG_KIND) != KIND_BASELINE, r.info.start_time or 0, r.info.run_id))
    metrics = sorted({key for run in runs for key in run.data.metrics})
    searched = list(dict.fromkeys(name for run in runs for name in run.data.params if name.startswith(PARAM_SEARCHED)))
    rows = []
    for run in runs:
        tags = run.data.tags
        row: dict[str, Any] = {
            "run_id": run.info.run_id, "name": tags.get(TAG_RUN_NAME, run.info.run_id), "kind": tags[TAG_KIND],
            "status": _status(run), "run_status": run.info.status, TAG_PARETO: tags.get(TAG_PARETO) == "true",
            TAG_PARETO_SPEED: tags.get(TAG_PARETO_SPEED) == "true", "packed": bool(tags.get(TAG_PACKED_ARTIFACT)),
            "start_time": run.info.start_time, "end_time": run.info.end_time, "error": tags.get(TAG_ERROR),
            "error_file": tags.get(TAG_ERROR_FILE), "fineprune_version": tags.get(TAG_FINEPRUNE_VERSION)}
        row.update({key: _as_logged(run.data.metrics.get(key, math.nan)) for key in metrics})
        row.update({name: run.data.params.get(name) for name in searched})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*COLUMNS, *metrics, *searched])
    return frame.astype({TAG_PARETO: bool, TAG_PARETO_SPEED: bool, "packed": bool, **dict.fromkeys(metrics, float)})


def _as_logged(value: float) -> float:
    """A metric as it was logged: MLflow's SQL store keeps an infinite value as the largest float, which a table
    would show as a 309-digit number and a plot's axis stretch to."""
    return math.copysign(math.inf, value) if abs(value) == sys.float_info.max else value


def metric_history(client: MlflowClient, run_id: str, metric: str) -> list[tuple[float, float]]:
    """A metric's ``(step, value)`` history, one value per step (the latest logged), by step."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, metric):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(float(step), value) for step, (_, value) in sorted(latest.items())]
