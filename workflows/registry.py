"""Choosing the champion of a sweep and registering its packed model as an MLflow pyfunc.

Selection policies (pure, see :func:`select_champion`):
  * ``best_f1_under_density``: highest F1 among trials with ``linear_density <= max_density``;
  * ``min_density_within_f1_drop``: lowest linear density among trials within ``max_f1_drop`` F1 of dense;
  * ``fastest_within_f1_drop``: highest measured speedup among trials within ``max_f1_drop`` F1 of dense.

The registered model carries the packed weights, the tokenizer and this project's QA post-processing; its
``predict`` takes a DataFrame with ``question`` and ``context`` columns and returns ``answer`` and ``score``.
The version gets the alias ``champion`` and tags with EM, F1, densities, speedup and the sweep's run id.
Registering the same trial twice adds no version.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import threading
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from pruning.config import RunConfig

__all__ = ["POLICIES", "select_champion", "register_champion", "register_from_experiment", "PackedQAModel",
           "ALIAS", "PIP_REQUIREMENTS", "RequestError", "SERVE_DEFAULTS", "serve_settings",
           "log_qa_model"]

logger = logging.getLogger(__name__)

ALIAS = "champion"
POLICIES = ("best_f1_under_density", "min_density_within_f1_drop", "fastest_within_f1_drop")
TAG_TRIAL_RUN = "fineprune.trial_run_id"
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "safetensors>=0.4", "numpy>=1.26", "pandas>=2.0",
                    "tqdm>=4.66"]
# Served-model setting -> the run config key it is read from (a trial's params are its run config).
_SERVE_PARAMS = {"max_seq_length": "max_seq_length", "doc_stride": "doc_stride", "max_windows": "max_windows",
                 "batch_size": "eval_batch_size"}
# For runs that lack a key (logged before it existed): the run config's defaults.
SERVE_DEFAULTS = {key: RunConfig.__dataclass_fields__[param].default for key, param in _SERVE_PARAMS.items()}


def serve_settings(params: dict[str, str]) -> dict[str, int]:
    """The served model's settings (``model_config``) from a trial run's params, defaults for those it lacks."""
    return {key: int(params[param]) if param in params else SERVE_DEFAULTS[key]
            for key, param in _SERVE_PARAMS.items()}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def select_champion(points: list[dict[str, Any]], policy: str, dense_f1: float | None = None,
                    max_density: float | None = None, max_f1_drop: float | None = None) -> dict[str, Any] | None:
    """The point a policy chooses, or None when no point qualifies.

    Args:
        points: trial results with ``f1``, ``linear_density`` and (for ``fastest_...``) ``speedup``.
        policy: one of :data:`POLICIES`.
        dense_f1: F1 of the dense baseline (needed by the F1-drop policies).
        max_density: density cap of ``best_f1_under_density``.
        max_f1_drop: allowed F1 drop of the other two policies.
    """
    if policy not in POLICIES:
        raise ValueError(f"registry.policy: unknown policy {policy!r} (allowed: {', '.join(POLICIES)})")
    valid = [p for p in points if _finite(p.get("f1")) and _finite(p.get("linear_density"))]
    if policy == "best_f1_under_density":
        cap = 1.0 if max_density is None else max_density
        pool = [p for p in valid if p["linear_density"] <= cap + 1e-9]
        return max(pool, key=lambda p: (p["f1"], -p["linear_density"]), default=None)
    if dense_f1 is None or max_f1_drop is None:
        raise ValueError(f"registry.policy: {policy} needs the dense F1 and max_f1_drop")
    pool = [p for p in valid if p["f1"] >= dense_f1 - max_f1_drop]
    if policy == "min_density_within_f1_drop":
        return min(pool, key=lambda p: (p["linear_density"], -p["f1"]), default=None)
    pool = [p for p in pool if _finite(p.get("speedup"))]
    return max(pool, key=lambda p: (p["speedup"], p["f1"]), default=None)


class RequestError(MlflowException):
    """A bad request to the served model: HTTP 400 whose JSON body carries only the one-line message.

    The scoring server rewrites the message of any MlflowException raised by ``predict`` into "Failed to predict
    data '<the whole input>'. Error: ..." (several lines, echoing the input); the body is built here from the message
    given, so the client gets just the line that names the record and the field.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.reason = message

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.reason})


def _column(frame: pd.DataFrame, name: str) -> list[Any]:
    """A column's values with pandas' missing values (NaN, None, NA) as None."""
    return [None if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA else value
            for value in frame[name].tolist()]


class PackedQAModel(mlflow.pyfunc.PythonModel):
    """Extractive QA over a packed model: DataFrame(question, context) -> DataFrame(answer, score).

    Every record is checked before any model work (see :func:`pruning.inference.check_records`): a question or
    context that is missing, not a string, empty, or a context needing more than ``max_windows`` windows is an HTTP
    400 naming the record's index and the field. The windows of all records of a request run together,
    ``batch_size`` at a time. Settings (``model_config`` of the logged model, from the trial's run config):
    ``max_seq_length``, ``doc_stride``, ``max_windows``, ``batch_size``.
    """

    def load_context(self, context) -> None:
        # Imported here: the served model finds the pruning package through its code paths only once it is loaded.
        from pruning.checkpoint import load_model, load_tokenizer
        from pruning.inference import torch_runner

        model_dir = context.artifacts["model_dir"]
        self.model = load_model(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        # The windows the model was trained and evaluated with, never longer than its position embeddings.
        settings = dict(getattr(context, "model_config", None) or {})
        limit = int(self.model.config.max_position_embeddings)
        self.max_seq_length = min(int(settings.get("max_seq_length", SERVE_DEFAULTS["max_seq_length"])), limit)
        self.doc_stride = min(int(settings.get("doc_stride", SERVE_DEFAULTS["doc_stride"])), self.max_seq_length // 2)
        self.max_windows = int(settings.get("max_windows", SERVE_DEFAULTS["max_windows"]))
        self.batch_size = int(settings.get("batch_size", SERVE_DEFAULTS["batch_size"]))
        self.run_windows = torch_runner(self.model)
        self._threads = threading.local()

    def _tokenizer(self):
        """The calling thread's copy of the tokenizer.

        The scoring server answers requests in several threads, and a fast tokenizer keeps its truncation and
        padding settings as state that every call changes: shared, one request's windows come out cut to another's
        settings.
        """
        tokenizer = getattr(self._threads, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._threads.tokenizer = copy.deepcopy(self.tokenizer)
        return tokenizer

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from pruning.inference import RecordError, answer_records  # lazy: see load_context

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = {"question", "context"} - set(frame.columns)
        if missing:
            raise RequestError(f"input needs the columns question and context (missing: {', '.join(sorted(missing))})")
        try:
            answers = answer_records(self.run_windows, self._tokenizer(), _column(frame, "question"),
                                     _column(frame, "context"), max_seq_length=self.max_seq_length,
                                     doc_stride=self.doc_stride, max_windows=self.max_windows,
                                     batch_size=self.batch_size)
        except RecordError as err:
            raise RequestError(str(err)) from None
        return pd.DataFrame({"answer": [a.text for a in answers], "score": [float(a.score) for a in answers]})


SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "question"), ColSpec("string", "context")]),
                           outputs=Schema([ColSpec("string", "answer"), ColSpec("double", "score")]))


def _spec_value(spec: Any, key: str, default: Any = None) -> Any:
    if isinstance(spec, dict):
        return spec.get(key, default)
    return getattr(spec, key, default)


def register_champion(client, experiment: str, parent_run_id: str, spec: Any,
                      dense_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Select the champion among the sweep's finished trials and register its packed model (idempotent)."""
    from workflows import tracking

    runs = tracking.trial_runs(client, experiment, parent_run_id)
    points = [{"run_id": r.info.run_id, **r.data.metrics} for r in runs
              if r.data.tags.get(tracking.TAG_STATUS) == "finished"
              and r.data.tags.get("fineprune.packed_artifact")]
    dense_f1 = (dense_metrics or {}).get("f1")
    if dense_f1 is None:
        baseline = tracking.trial_runs(client, experiment, parent_run_id, include_baseline=True)
        dense_f1 = next((r.data.metrics.get("f1") for r in baseline
                         if r.data.tags.get(tracking.TAG_KIND) == "baseline"), None)
    policy = _spec_value(spec, "policy", "best_f1_under_density")
    chosen = select_champion(points, policy, dense_f1=dense_f1, max_density=_spec_value(spec, "max_density"),
                             max_f1_drop=_spec_value(spec, "max_f1_drop"))
    name = _spec_value(spec, "name")
    if chosen is None:
        logger.warning("no trial satisfies the registry policy %s; nothing registered", policy)
        return {"registered": False, "policy": policy, "name": name}
    return register_run(client, chosen["run_id"], name, parent_run_id, policy)


def log_qa_model(model_dir: str | Path, settings: dict[str, int]):
    """Log a QA model directory as the :class:`PackedQAModel` pyfunc ``qa_model`` of the active run.

    Args:
        model_dir: a dense, masked or packed QA model directory with its tokenizer.
        settings: the served model's ``model_config`` (see :func:`serve_settings`).

    Returns:
        MLflow's ``ModelInfo`` (``model_uri``, ``model_id``).
    """
    package_dir = Path(__file__).resolve().parents[1] / "pruning"
    return mlflow.pyfunc.log_model(
        name="qa_model",
        python_model=PackedQAModel(),
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(package_dir)],
        pip_requirements=PIP_REQUIREMENTS,
        signature=SIGNATURE,
        model_config=settings,
        input_example=pd.DataFrame({"question": ["Who wrote it?"], "context": ["It was written by Ann."]}),
    )


def register_run(client, run_id: str, name: str, parent_run_id: str, policy: str) -> dict[str, Any]:
    """Register a trial run's packed model under ``name`` with alias ``champion``; reuse an existing version."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Packed fine-pruned QA models chosen by fineprune sweeps")
    existing = [v for v in client.search_model_versions(f"name = '{name}'")
                if v.tags.get(TAG_TRIAL_RUN) == run_id]
    run = client.get_run(run_id)
    if existing:
        version = existing[0]
        logger.info("trial run %s is already version %s of %s", run_id, version.version, name)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, "packed_model", tmp)
            with mlflow.start_run(run_id=run_id):
                info = log_qa_model(local, serve_settings(run.data.params))
        version = client.create_model_version(name, source=info.model_uri, run_id=run_id,
                                              tags={TAG_TRIAL_RUN: run_id}, model_id=info.model_id)
    metrics = run.data.metrics
    tags = {"sweep_run_id": parent_run_id, "policy": policy, TAG_TRIAL_RUN: run_id}
    for key in ("exact_match", "f1", "linear_density", "total_density", "heads_removed", "speedup"):
        if key in metrics:
            tags[key] = f"{metrics[key]:.6g}"
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, ALIAS, version.version)
    uri = f"models:/{name}@{ALIAS}"
    logger.info("registered %s (version %s, trial run %s)", uri, version.version, run_id)
    return {"registered": True, "name": name, "version": str(version.version), "model_uri": uri,
            "run_id": run_id, "policy": policy, **{k: metrics.get(k) for k in ("f1", "exact_match",
                                                                                  "linear_density", "speedup")}}


def register_from_experiment(experiment: str, tracking_uri: str | None = None, space: str | None = None) -> dict[str, Any]:
    """``fineprune register``: the latest sweep of ``experiment``, its policy (or ``space``'s), its champion."""
    from workflows import tracking

    client = tracking.client_for(tracking_uri or tracking.DEFAULT_TRACKING_URI)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"experiment {experiment!r} not found in {tracking_uri or tracking.DEFAULT_TRACKING_URI}")
    parents = client.search_runs([found.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise ValueError(f"experiment {experiment!r} has no sweep run")
    parent = parents[0]
    if space is not None:
        from workflows.space import load_space

        spec = load_space(space).registry
    else:
        params = parent.data.params
        spec = {key.split(".", 1)[1]: _parse(value) for key, value in params.items() if key.startswith("registry.")}
        if "name" not in spec:
            raise ValueError(f"sweep run {parent.info.run_id} records no registry name; pass --space")
    return register_champion(client, experiment, parent.info.run_id, spec)


def _parse(value: str) -> Any:
    if value in ("None", "null"):
        return None
    try:
        return float(value)
    except ValueError:
        return value
