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

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

__all__ = ["POLICIES", "select_champion", "register_champion", "register_from_experiment", "PackedQAModel",
           "ALIAS", "PIP_REQUIREMENTS"]

logger = logging.getLogger(__name__)

ALIAS = "champion"
POLICIES = ("best_f1_under_density", "min_density_within_f1_drop", "fastest_within_f1_drop")
TAG_TRIAL_RUN = "fineprune.trial_run_id"
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "safetensors>=0.4", "numpy>=1.26", "pandas>=2.0",
                    "tqdm>=4.66"]


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


class PackedQAModel(mlflow.pyfunc.PythonModel):
    """Extractive QA over a packed model: DataFrame(question, context) -> DataFrame(answer, score)."""

    def load_context(self, context) -> None:
        from pruning.checkpoint import load_model, load_tokenizer

        model_dir = context.artifacts["model_dir"]
        self.model = load_model(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        # The windows the model was trained and evaluated with, never longer than its position embeddings.
        settings = dict(getattr(context, "model_config", None) or {})
        limit = int(self.model.config.max_position_embeddings)
        self.max_seq_length = min(int(settings.get("max_seq_length", 384)), limit)
        self.doc_stride = min(int(settings.get("doc_stride", 128)), self.max_seq_length // 2)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from pruning.inference import answer_batch

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = {"question", "context"} - set(frame.columns)
        if missing:
            raise ValueError(f"input needs the columns question and context (missing: {', '.join(sorted(missing))})")
        answers = answer_batch(self.model, self.tokenizer, frame["question"].astype(str).tolist(),
                               frame["context"].astype(str).tolist(), max_seq_length=self.max_seq_length,
                               doc_stride=self.doc_stride)
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


def register_run(client, run_id: str, name: str, parent_run_id: str, policy: str) -> dict[str, Any]:
    """Register a trial run's packed model under ``name`` with alias ``champion``; reuse an existing version."""
    from mlflow.exceptions import MlflowException

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
            package_dir = Path(__file__).resolve().parents[1] / "pruning"
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="qa_model",
                    python_model=PackedQAModel(),
                    artifacts={"model_dir": local},
                    code_paths=[str(package_dir)],
                    pip_requirements=PIP_REQUIREMENTS,
                    signature=SIGNATURE,
                    model_config={key: int(run.data.params[key]) for key in ("max_seq_length", "doc_stride")
                                  if key in run.data.params},
                    input_example=pd.DataFrame({"question": ["Who wrote it?"], "context": ["It was written by Ann."]}),
                )
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
