"""A trial's packed model logged on its run as the served pyfunc model that registered versions are made of.

The served model (:class:`workflows.served_model.PackedQAModel`) carries the packed weights, the tokenizer and this
project's QA post-processing, logged as code with the ``pruning`` package beside it (:func:`log_qa_model`: loading
it unpickles nothing); its ``predict`` takes a DataFrame with ``question`` and ``context`` columns and returns
``answer`` and ``score``. Its ``model_config`` holds the windows and span search the trial was scored with and the
precision its metrics were measured in (:func:`settings_of`).

Beside the PyTorch weights it carries the model exported for ONNX Runtime (:func:`export_for_serving`; artifact
``onnx_dir``: the fused fp32 graph and its dynamic int8 quantization, see :mod:`pruning.export`) and serves through
it (``model_config``'s ``onnx_variant``: int8, or fp32 where int8 loses more than the registry spec's
``max_int8_f1_drop`` F1 against fp32 on the trial's questions, see :mod:`workflows.int8_check`; ``none`` for
PyTorch). A model that cannot be exported is logged all the same and served by PyTorch, the reason in its ``onnx``
tag (``fp32,int8`` when exported); the policy's ``onnx: false`` skips the export (tagged :data:`ONNX_SKIPPED`).

Precision: a ``bf16`` (or ``auto``) model served by PyTorch runs under bf16 autocast only where the serving CPU has
bf16 matrix instructions, and in fp32 elsewhere (see :func:`workflows.served_model.serving_precision`); an ``fp32``
model runs in fp32. ONNX Runtime runs the exported graph in its own precision (the ``onnx_variant``) whatever the
recorded one.

A trial's served model is logged on its run once: :func:`logged_qa_model` finds the one an earlier registration
logged there when it serves as one logged now would.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from pruning import atomic
from pruning.config import EVALUATION_KEYS, RunConfig
from pruning.errors import error_line, raise_interrupt_behind, typed_error_line
from pruning.quiet import leaving_out, starting_with
from workflows import record
from workflows.int8_check import wanted_variant
from workflows.record import (ARTIFACT_MODEL_DIR, ARTIFACT_ONNX_DIR, ARTIFACT_PACKED_MODEL, ARTIFACT_QA_MODEL,
                              TAG_FINEPRUNE_VERSION, TAG_ONNX, TAG_PRECISION, fineprune_version)
from workflows.served_model import (MAX_RECORDS, MODEL_CODE, MODEL_FILE, NULL_THRESHOLD, ONNX_VARIANTS,
                                    SERVE_DEFAULTS, SERVE_PARAMS, SHIPPED_MODULES, count_setting,
                                    model_signature, served_variant)
from workflows.version_files import lost_files

__all__ = ["PIP_REQUIREMENTS", "ONNX_SKIPPED", "serve_settings", "measured_precision", "export_for_serving",
           "log_qa_model", "fluent_store", "logged_qa_model", "UnreadableTrial", "settings_of", "packed_model_of"]

logger = logging.getLogger(__name__)

PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "safetensors>=0.4", "numpy>=1.26", "pandas>=2.0",
                    "tqdm>=4.66", "onnx==1.23.2", "onnxruntime==1.32.0"]
ONNX_SKIPPED = "skipped"  # the onnx tag of a version registered without its export (onnx: false)


def serve_settings(params: dict[str, str], evaluation: Mapping[str, int] | None = None) -> dict[str, int]:
    """The served model's settings (``model_config``) from a trial run's params, defaults for those it lacks.

    ``evaluation``: what the trial's packed model records of the windows and span search its run evaluated with
    (:func:`pruning.checkpoint.read_evaluation`); each key it holds wins over the param. The params are the run
    config as given, whose windows the trainer may have cut to the model's or the teacher's position embeddings:
    the record holds the windows the trial was scored with.
    """
    settings = {key: int(params[param]) if param in params else SERVE_DEFAULTS[key]
                for key, param in SERVE_PARAMS.items()}
    settings.update({key: int(value) for key, value in (evaluation or {}).items() if key in EVALUATION_KEYS})
    return settings


def measured_precision(run) -> str:
    """The precision a trial run's final metrics were measured in.

    The trial's own record (tag ``fineprune.precision``: ``fp32`` or ``bf16``, what ``auto`` became on its device)
    when it has one; else its ``precision`` param (runs logged before the tag existed; ``auto`` stays ``auto``:
    which one it became is not known); else ``fp32``, the run config's default.
    """
    recorded = run.data.tags.get(TAG_PRECISION)
    if recorded in ("fp32", "bf16"):
        return recorded
    return run.data.params.get("precision", RunConfig.__dataclass_fields__["precision"].default)


def export_for_serving(model_dir: str | Path, out_dir: str | Path, what: str | None = None) -> tuple[Path | None, str]:
    """``model_dir`` exported for ONNX Runtime (fp32 and int8) into ``out_dir``, checked on 4 dev questions.

    The export is an optimisation of a model that serves without it: a model that cannot be exported is still
    registered, and serves through PyTorch. That is never silent: the reason is logged as a warning and returned
    for the version's ``onnx`` tag.

    Args:
        model_dir: a packed (or dense) QA model directory.
        out_dir: where the export goes (created).
        what: how the warning names the model (default: ``model_dir``).

    Returns:
        ``(out_dir, "fp32,int8")``, or ``(None, "failed: <one line>")``.
    """
    # The export needs torch and ONNX Runtime; this module, and the registry, stay light without them.
    from pruning.export import export_checkpoint

    try:
        report = export_checkpoint(model_dir, out_dir, quantize="int8", questions=4)
    except Exception as err:  # ExportError, CheckpointError, ORT's own errors: any of them leaves PyTorch serving
        raise_interrupt_behind(err)
        reason = typed_error_line(err)
        logger.warning("%s: cannot be exported for ONNX Runtime, registered to serve through PyTorch (%s)",
                       what or model_dir, reason)
        return None, f"failed: {reason}"[:500]
    return Path(out_dir), ",".join(report["files"])


# MLflow's warning that it could not copy a logged model's ``model_config`` into the run's params: the trial run's
# params are its run config, whose ``batch_size`` (the training batch) differs from the served one, and the served
# settings are kept in the model itself.
_PARAM_MIRROR = "Failed to log model config as params"


def log_qa_model(model_dir: str | Path, settings: dict[str, Any], onnx_dir: str | Path | None = None,
                 tags: dict[str, str] | None = None, variant: str = ONNX_VARIANTS[0]):
    """Log a QA model directory as the pyfunc ``qa_model`` of the active run
    (:class:`workflows.served_model.PackedQAModel`).

    The model is logged as code (:data:`workflows.served_model.MODEL_CODE`), with the code it runs beside it
    (:func:`_shipped_code`): loading it unpickles nothing.

    Args:
        model_dir: a dense, masked or packed QA model directory with its tokenizer.
        settings: the served model's ``model_config`` (see :func:`serve_settings`, plus ``precision``);
            ``onnx_variant`` is added.
        onnx_dir: the model exported for ONNX Runtime (see :func:`export_for_serving`), served when given.
        tags: tags of the logged model, besides ``fineprune.version``: the release whose code it ships.
        variant: the ONNX variant served (``int8`` or ``fp32``) when ``onnx_dir`` is given.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri``, ``model_id``).
    """
    from pruning.checkpoint import read_null_answers  # lazy: this module stays light without torch

    artifacts = {ARTIFACT_MODEL_DIR: str(model_dir)}
    if onnx_dir is not None:
        artifacts[ARTIFACT_ONNX_DIR] = str(onnx_dir)
    # A model answering "no answer" takes the threshold it wins by as a setting of its own (0: as it was trained).
    null = {NULL_THRESHOLD: 0.0} if read_null_answers(model_dir) else {}
    with _shipped_code() as (model_file, code_paths), \
            leaving_out("mlflow.models.model", starting_with(_PARAM_MIRROR)):
        return mlflow.pyfunc.log_model(
            name=ARTIFACT_QA_MODEL,
            python_model=model_file,
            artifacts=artifacts,
            code_paths=code_paths,
            pip_requirements=PIP_REQUIREMENTS,
            signature=model_signature(bool(null)),
            # Logged so that it can be overridden at load (MLflow only overrides logged keys), e.g. with
            # MLFLOW_PYFUNC_INFERENCE_CONFIG='{"onnx_variant": "fp32"}' for `mlflow models serve`.
            model_config={"max_records": MAX_RECORDS, **settings,
                          "onnx_variant": variant if onnx_dir is not None else "none", **null},
            input_example=pd.DataFrame({"question": ["Who wrote it?"], "context": ["It was written by Ann."]}),
            tags={**(tags or {}), TAG_FINEPRUNE_VERSION: fineprune_version()},
        )


@contextlib.contextmanager
def _shipped_code() -> Iterator[tuple[str, list[str]]]:
    """``(model_file, code_paths)`` for as long as MLflow copies them: the file a QA model is logged as
    (:data:`MODEL_CODE`), and the code it runs: the ``pruning`` package, and a ``workflows`` package holding only the
    modules the served model imports (:data:`SHIPPED_MODULES`). A process that loads the model (a server MLflow builds
    from the pip requirements, another machine) has them as code, without the rest of this package, which needs Ray
    and the sweep's other dependencies."""
    here = Path(__file__).resolve().parent
    with atomic.scratch_dir("code") as staging:
        package = Path(staging, "code", here.name)
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("", encoding="utf-8")
        for module in SHIPPED_MODULES:
            shutil.copyfile(here / f"{module}.py", package / f"{module}.py")
        model_file = Path(staging, MODEL_FILE)
        model_file.write_text(MODEL_CODE, encoding="utf-8")
        yield str(model_file), [str(here.parent / "pruning"), str(package)]


@contextlib.contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``start_run``, ``log_model``) at the client's store for a while."""
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def _served_by(settings: Mapping[str, Any], has_onnx: bool) -> dict[str, Any] | None:
    """What a served model's ``model_config`` makes it serve, as :class:`workflows.served_model.PackedQAModel` reads
    it (defaults for the keys it lacks), or None when it would not load."""
    try:
        counts = {key: count_setting(settings, key, default)
                  for key, default in {**SERVE_DEFAULTS, "max_records": MAX_RECORDS}.items()}
        variant = served_variant(settings, has_onnx)
    except ValueError:
        return None
    return {**counts, "onnx_variant": variant, "precision": str(settings.get("precision", "fp32"))}


def logged_qa_model(client, run, onnx: bool, settings: Mapping[str, Any], max_int8_f1_drop: float | None):
    """The served model an earlier registration logged on the trial ``run`` (whole, logged as code, and exported
    for ONNX Runtime as ``onnx`` asks: tried, or ``skipped``) that serves as one logged now with ``settings`` (its
    ``model_config`` but ``onnx_variant``) would, or None. Its ONNX variant is the one its own int8 check's scores
    give with ``max_int8_f1_drop`` (:func:`~workflows.int8_check.wanted_variant`); a model exported but never
    checked is not reused while the check is asked for. A model logged before models were logged as code, with its
    served class pickled, is never reused."""
    from mlflow.models import Model

    try:
        models = client.search_logged_models([run.info.experiment_id],
                                             filter_string=f"source_run_id = '{run.info.run_id}' "
                                                           f"AND name = '{ARTIFACT_QA_MODEL}'")
    except MlflowException:
        return None
    stale, pickled, unchecked = [], [], []
    for model in sorted(models, key=lambda m: m.creation_timestamp or 0):
        tag = model.tags.get(TAG_ONNX)
        if model.status != LoggedModelStatus.READY or tag is None or (tag == ONNX_SKIPPED) == onnx:
            continue
        try:
            with fluent_store(client.tracking_uri):  # which resolves the model's files
                flavor = Model.load(model.model_uri).flavors.get("python_function", {})
        except (MlflowException, OSError):  # its files are gone: not a model to serve
            continue
        if not flavor.get("model_code_path"):
            pickled.append(model.model_id)
            continue
        lost = lost_files(model.artifact_location, client.tracking_uri)
        if lost is not None:
            logger.info("trial run %s: the model logged on it before (%s) cannot be served (%s): logging a new one",
                        run.info.run_id, model.model_id, lost)
            continue
        has_onnx = ARTIFACT_ONNX_DIR in (flavor.get("artifacts") or {})
        variant = wanted_variant(model.tags, max_int8_f1_drop) if has_onnx else "none"
        if variant is None:
            unchecked.append(model.model_id)
            continue
        served = _served_by(flavor.get("config") or {}, has_onnx)
        wanted = _served_by({"max_records": MAX_RECORDS, **settings, "onnx_variant": variant}, has_onnx)
        if served is not None and served == wanted:
            return model
        stale.append((model.model_id, {key: (value, (served or {}).get(key)) for key, value in (wanted or {}).items()
                                       if (served or {}).get(key) != value}))
    if unchecked:
        logger.info("trial run %s: the model logged on it before (%s) serves int8 without the check of its accuracy "
                    "against fp32: logging a new one, checked", run.info.run_id, ", ".join(unchecked))
    if pickled:
        logger.info("trial run %s: the model logged on it before (%s) holds its served class pickled, which loading "
                    "it unpickles: logging a new one, as code", run.info.run_id, ", ".join(pickled))
    if stale:
        changes = ("; ".join(f"{model_id}: " + ", ".join(f"{key} {was} -> {now}" for key, (now, was) in changed.items())
                             for model_id, changed in stale))
        logger.info("trial run %s: the model logged on it before serves other settings than registering it now "
                    "would (%s): logging a new one", run.info.run_id, changes)
    return None


class UnreadableTrial(record.RecordError):
    """A trial's packed model is missing from its run or cannot be read: it cannot become a version."""


def settings_of(client, run) -> dict[str, Any]:
    """The ``model_config`` (but ``onnx_variant``) a served model logged now for the trial ``run`` gets: the windows
    and span search its packed model records (:func:`serve_settings`) and the precision its metrics were measured
    in (:func:`measured_precision`).

    Raises:
        UnreadableTrial: the packed model's config.json cannot be read, or its record is not valid.
    """
    # torch and the library are needed only for a new version; this module, and the registry, stay light without them.
    from pruning.checkpoint import CheckpointError, read_evaluation

    run_id = run.info.run_id
    with atomic.scratch_dir("download") as tmp:
        try:
            config_file = Path(client.download_artifacts(run_id, f"{ARTIFACT_PACKED_MODEL}/config.json", tmp))
        except (MlflowException, OSError) as err:
            raise UnreadableTrial(f"trial run {run_id}: its {ARTIFACT_PACKED_MODEL!r} artifact cannot be read "
                                  f"({error_line(err)}); not registered") from None
        try:
            evaluation = read_evaluation(config_file.parent)
        except CheckpointError as err:
            where = error_line(err).replace(str(config_file.parent), f"runs:/{run_id}/{ARTIFACT_PACKED_MODEL}")
            raise UnreadableTrial(f"trial run {run_id}: {where}; not registered") from None
    # The windows and span search the trial was scored with: those its packed model records, which are cut to the
    # position embeddings of the model and of its teacher, not the params as given.
    return {**serve_settings(run.data.params, evaluation), "precision": measured_precision(run)}


def packed_model_of(client, run_id: str, dst: str) -> str:
    """The trial's ``packed_model`` artifact downloaded into ``dst``, its model and tokenizer checked to load (a
    version is never made of a model that cannot be served).

    Raises:
        UnreadableTrial: the run holds no such artifact (or the artifact store cannot give it), or the model or its
            tokenizer cannot be read; the file is named in the run (``runs:/RUN_ID/packed_model/...``).
    """
    # torch and the library are needed only for a new version; this module, and the registry, stay light without them.
    from pruning.checkpoint import CheckpointError, load_model
    from pruning.packing import PackingError
    from pruning.tokenizer import load_tokenizer

    try:
        local = client.download_artifacts(run_id, ARTIFACT_PACKED_MODEL, dst)
    except (MlflowException, OSError) as err:
        raise UnreadableTrial(f"trial run {run_id}: its {ARTIFACT_PACKED_MODEL!r} artifact cannot be read "
                              f"({error_line(err)}); not registered") from None
    try:
        load_model(local)
        load_tokenizer(local)
    except (CheckpointError, PackingError) as err:
        where = error_line(err).replace(str(local), f"runs:/{run_id}/{ARTIFACT_PACKED_MODEL}")
        raise UnreadableTrial(f"trial run {run_id}: {where}; not registered") from None
    return local
