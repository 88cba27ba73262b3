"""The model a registered version serves: MLflow's pyfunc over a packed QA model, logged as code.

:func:`workflows.logged_model.log_qa_model` logs a version as MLflow's "model from code": its ``python_model`` is the
file of :data:`MODEL_CODE`, whose three statements set this module's :class:`PackedQAModel`, and the version
carries the code they import: the ``pruning`` package, and of ``workflows`` this module and :mod:`workflows.record`
(see :data:`SHIPPED_MODULES`). A process that loads the version (``mlflow models serve``, another machine) runs
that code with mlflow and pandas, and needs neither Ray nor the rest of ``workflows``. Nothing is pickled: loading
a version runs no code but what the version carries and the packages it names. So this module imports nothing else
of ``workflows``, and ``pruning`` beyond its config only in the functions that run once a version loads (the
registry, which imports it, stays light).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
from typing import Any, Mapping

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType

from pruning.config import EVALUATION_KEYS, RunConfig
from workflows.record import ARTIFACT_MODEL_DIR, ARTIFACT_ONNX_DIR, TAG_ONNX

__all__ = ["PackedQAModel", "RequestError", "SIGNATURE", "NULL_SIGNATURE", "model_signature",
           "SERVE_DEFAULTS", "SERVE_PARAMS", "MAX_RECORDS", "ONNX_VARIANTS", "SHIPPED_MODULES", "MODEL_CODE",
           "MODEL_FILE", "count_setting", "served_variant", "serving_precision", "torch_served", "check_precision",
           "NULL_THRESHOLD", "null_threshold_setting", "request_null_threshold"]

# The modules of ``workflows`` a logged version carries (as the package ``workflows`` holding only these).
SHIPPED_MODULES = ("record", "served_model")
# The file a version is logged as (its ``python_model``, run when the version loads).
MODEL_CODE = """\
import mlflow

from workflows.served_model import PackedQAModel

mlflow.models.set_model(PackedQAModel())
"""
MODEL_FILE = "qa_model.py"

logger = logging.getLogger(__name__)

ONNX_VARIANTS = ("int8", "fp32", "none")  # what the served model runs: ORT int8 (default), ORT fp32, or PyTorch
# Served-model setting -> the run config key it is read from (a trial's params are its run config): the windows and
# span search the trial was evaluated with, and the serving limits.
SERVE_PARAMS = {**{key: key for key in EVALUATION_KEYS}, "max_windows": "max_windows", "batch_size": "eval_batch_size"}
# For runs that lack a key (logged before it existed): the run config's defaults.
SERVE_DEFAULTS = {key: RunConfig.__dataclass_fields__[param].default for key, param in SERVE_PARAMS.items()}
# The most records one request may hold (the inference config's ``max_records``): every window of a request is
# built before the first batch runs, so an unbounded request could take the server's memory.
MAX_RECORDS = 256
# The setting of a model trained on unanswerable questions: "no answer" wins where it scores more than this many
# logits above the best span (see pruning.squad.postprocess_predictions).
NULL_THRESHOLD = "null_threshold"


def check_precision(recorded: str) -> None:
    """Refuse a version's ``precision`` setting that is not ``fp32``, ``bf16`` or ``auto``.

    Raises:
        PrecisionError: in one line naming the setting.
    """
    # Imported here: the registry, which imports this module, stays light without torch.
    from pruning.precision import PRECISIONS, PrecisionError

    if recorded not in PRECISIONS:
        raise PrecisionError(f"model_config precision: unknown value {recorded!r} (allowed: {', '.join(PRECISIONS)})")


def serving_precision(recorded: str, cpu_check=None) -> str:
    """What the served PyTorch model computes in on this CPU, for the precision its version recorded.

    ``fp32``: fp32. ``bf16`` or ``auto``: bf16 where this CPU has bf16 matrix instructions, fp32 elsewhere (for
    ``bf16`` with a warning: the answers may differ slightly from the measured ones).

    Args:
        recorded: the version's ``precision`` (``fp32``, ``bf16`` or ``auto``).
        cpu_check: the CPU capability probe (default :func:`pruning.precision.cpu_supports_bf16`).

    Raises:
        PrecisionError: ``recorded`` is none of the three.
    """
    # Imported here: the registry, which imports this module, stays light without torch.
    from pruning.precision import resolve_precision

    check_precision(recorded)
    if recorded == "fp32":
        return "fp32"
    chosen = resolve_precision("auto", "cpu", cpu_check)
    if recorded == "bf16" and chosen != "bf16":
        logger.warning("the model was measured in bf16, but this CPU has no bf16 matrix instructions (avx512_bf16 or "
                       "AMX): serving it in fp32")
    return chosen


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


def _records(frame: pd.DataFrame) -> pd.DataFrame:
    """The request as one row per record.

    MLflow hands the column form of a request (``{"inputs": {"question": [...], "context": [...]}}``) over as one
    row whose fields are the lists: such a row is spread into its records. Any other row is a record as it is.
    """
    fields = [name for name in ("question", "context") if name in frame.columns]
    if len(frame) != 1 or not fields:
        return frame
    values = [frame[name].iloc[0] for name in fields]
    if not all(isinstance(value, (list, tuple, np.ndarray)) for value in values):
        return frame
    lengths = [len(value) for value in values]
    if len(set(lengths)) > 1:
        raise RequestError(f"the question and context columns hold {lengths[0]} and {lengths[1]} values: give one "
                           "of each per record")
    return pd.DataFrame({name: list(value) for name, value in zip(fields, values)})


def count_setting(settings: Mapping[str, Any], key: str, default: int) -> int:
    """The served model's setting ``key``: a whole number >= 1 (an integer, or its string), ``default`` if unset.

    Raises:
        ValueError: the setting is anything else, in one line naming it.
    """
    value = settings.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        number = None if isinstance(value, bool) else int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"model_config {key}: must be a whole number >= 1, got {value!r}")
    return number


def _threshold(value: Any) -> float | None:
    """``value`` as a finite number of logits (a number or its string), None if it is not one."""
    try:
        number = None if isinstance(value, bool) else float(str(value).strip())
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def null_threshold_setting(settings: Mapping[str, Any]) -> float:
    """The served model's ``null_threshold``: a finite number (or its string), 0 if unset. Only a version whose model
    answers "no answer" logs the key (:func:`workflows.logged_model.log_qa_model`), and MLflow passes no key a
    version did not log, so a model answering every question with a span never gets one.

    Raises:
        ValueError: in one line naming the setting.
    """
    value = settings.get(NULL_THRESHOLD, 0.0)
    number = _threshold(value)
    if number is None:
        raise ValueError(f"model_config {NULL_THRESHOLD}: must be a finite number of logits, got {value!r}")
    return number


def request_null_threshold(params: Mapping[str, Any] | None, default: float) -> float:
    """The ``null_threshold`` one request asks for (its ``params``), ``default`` (the served model's) if none.

    MLflow passes a param only to a version whose signature declares it (:data:`NULL_SIGNATURE`, that of a model
    answering "no answer"), typed there as a number: unset, it arrives as None.

    Raises:
        RequestError: a threshold that is not a finite number, in one line naming the param.
    """
    value = (params or {}).get(NULL_THRESHOLD)
    if value is None:
        return default
    number = _threshold(value) if isinstance(value, (int, float)) else None
    if number is None:
        raise RequestError(f"params {NULL_THRESHOLD}: must be a finite number of logits, got {value!r}")
    return number


def torch_served(model, settings: Mapping[str, Any]):
    """``(model, precision)``: a version's packed PyTorch model as its pyfunc serves it, in the precision
    :func:`serving_precision` chooses for the version's ``precision`` setting (bf16: a
    :class:`pruning.precision.Bf16Inference` over it)."""
    from pruning.precision import Bf16Inference  # lazy: see PackedQAModel.load_context

    chosen = serving_precision(str(settings.get("precision", "fp32")))
    return (Bf16Inference(model) if chosen == "bf16" else model), chosen


def served_variant(settings: Mapping[str, Any], has_onnx: bool) -> str:
    """What a version's pyfunc serves: its model config's ``onnx_variant`` (see :data:`ONNX_VARIANTS`).

    Versions logged before the setting existed have no key: they run what they carry (ORT int8 when exported).

    Raises:
        ValueError: the variant is unknown, or names an ONNX model the version does not carry.
    """
    variant = settings.get("onnx_variant") or (ONNX_VARIANTS[0] if has_onnx else "none")
    if variant not in ONNX_VARIANTS:
        raise ValueError(f"model_config onnx_variant: {variant!r} is not one of {', '.join(ONNX_VARIANTS)}")
    if variant != "none" and not has_onnx:
        raise ValueError(f"model_config onnx_variant: {variant!r}, but this version carries no ONNX models "
                         f"(see its {TAG_ONNX!r} tag); use 'none'")
    return variant


class PackedQAModel(mlflow.pyfunc.PythonModel):
    """Extractive QA over a packed model: DataFrame(question, context) -> DataFrame(answer, score), on its index
    (and ``null_margin`` for a model answering "no answer": how many logits "no answer" scored above the best span).

    Every record is checked before any model work (see :func:`pruning.inference.check_records`): a question or
    context that is missing, not a string, empty, or a context needing more than ``max_windows`` windows is an HTTP
    400 naming the record's index and the field. The windows of all records of a request run together,
    ``batch_size`` at a time. Settings (``model_config`` of the logged model, see :func:`serve_settings`: the
    windows and span search its packed model records of the trial's evaluation, the rest from the trial's run
    config): ``max_seq_length``, ``doc_stride``, ``max_query_length``, ``max_windows``, ``batch_size``,
    ``max_answer_length``, ``n_best``;
    ``max_records``, the most records one request may hold (default :data:`MAX_RECORDS`; more is an HTTP 400);
    ``onnx_variant`` (``int8``, ``fp32`` or ``none``), which of the exported models ONNX Runtime runs (default:
    int8 when the version carries them; ``none``: the PyTorch model); and ``precision``, the one the version was
    measured in, which the PyTorch model runs in where this CPU supports it (see :func:`serving_precision`); for a
    model trained on unanswerable questions (SQuAD v2.0), which answers "no answer" (an empty ``answer``),
    ``null_threshold``, how many logits "no answer" must score above the best span (default 0), which a request
    may set for itself (``params``, see :func:`request_null_threshold`).
    The counts must be whole numbers >= 1 and the windows leave room for a question: anything else is a one-line
    ValueError when the model loads.

    After loading, ``runtime`` is ``onnxruntime`` or ``torch`` and ``precision`` what the model computes in:
    ``int8`` or ``fp32`` through ONNX Runtime, ``bf16`` or ``fp32`` through PyTorch.
    """

    def load_context(self, context) -> None:
        # Imported here: the registry, which imports this module, stays light without torch.
        from pruning.checkpoint import load_model, read_null_answers
        from pruning.export import load_exported
        from pruning.inference import torch_runner
        from pruning.squad import fit_windows, longest_question
        from pruning.structure import max_positions
        from pruning.tokenizer import load_tokenizer

        model_dir = context.artifacts[ARTIFACT_MODEL_DIR]
        settings = dict(getattr(context, "model_config", None) or {})
        onnx_dir = context.artifacts.get(ARTIFACT_ONNX_DIR)
        variant = served_variant(settings, onnx_dir is not None)
        recorded = str(settings.get("precision", "fp32"))
        # Checked whatever runs the model: ONNX Runtime does not use it, but a setting mistyped in the inference
        # config is refused when the model loads, not only once the version serves through PyTorch.
        check_precision(recorded)
        if variant != "none":
            self.model = load_exported(onnx_dir, variant=variant)
            self.runtime, self.precision = "onnxruntime", variant
            run = torch_runner(self.model)
            logger.info("serving through ONNX Runtime (%s; measured in %s with PyTorch)", variant, recorded)
        else:
            # bf16: autocast is a thread's state, entered by the model in the scoring thread that runs the batch.
            self.model, self.precision = torch_served(load_model(model_dir), settings)
            self.runtime = "torch"
            run = torch_runner(self.model)
            logger.info("serving through PyTorch in %s (measured in %s)", self.precision, recorded)
        self.tokenizer = load_tokenizer(model_dir)
        # A model trained on unanswerable questions answers "no answer" (the empty text) where that wins.
        self.null_answers = read_null_answers(model_dir)
        self.null_threshold = null_threshold_setting(settings)
        # Every setting is checked here: one set wrong (in the inference config) stops the model from loading,
        # rather than failing every request as if the request were at fault.
        given = {key: count_setting(settings, key, default)
                 for key, default in {**SERVE_DEFAULTS, "max_records": MAX_RECORDS}.items()}
        # The windows the model was trained and evaluated with, never longer than its position embeddings.
        self.max_seq_length, self.doc_stride = fit_windows(given["max_seq_length"], given["doc_stride"],
                                                           max_positions(self.model.config))
        if longest_question(self.tokenizer, self.max_seq_length, self.doc_stride) < 1:
            raise ValueError(f"model_config max_seq_length {given['max_seq_length']}, doc_stride "
                             f"{given['doc_stride']}: windows of {self.max_seq_length} tokens overlapping by "
                             f"{self.doc_stride} leave no room for a question")
        self.max_query_length, self.max_windows, self.batch_size, self.max_records = (
            given[key] for key in ("max_query_length", "max_windows", "batch_size", "max_records"))
        # The span search the run evaluated with.
        self.max_answer_length, self.n_best = given["max_answer_length"], given["n_best"]
        self.run_windows = run
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

    # MLflow reads these annotations (it warns of a predict without them) to infer the model's schema.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from pruning.inference import RecordError, answer_records  # lazy: see load_context

        frame = _records(model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input))
        # MLflow's schema check drops the columns it does not know: records whose fields are all misnamed arrive as
        # no records at all.
        if len(frame) == 0:
            raise RequestError("no records with a question or a context field: send at least one "
                               "{question, context} record")
        if len(frame) > self.max_records:
            raise RequestError(f"{len(frame)} records in one request: at most {self.max_records} (inference config "
                               "max_records); send them in several requests")
        missing = {"question", "context"} - set(frame.columns)
        if missing:
            raise RequestError(f"every record needs a question and a context (missing: {', '.join(sorted(missing))})")
        fields = {name: _column(frame, name) for name in ("question", "context")}
        threshold = request_null_threshold(params, self.null_threshold)
        try:
            answers = answer_records(self.run_windows, self._tokenizer(), fields["question"], fields["context"],
                                     max_seq_length=self.max_seq_length, doc_stride=self.doc_stride,
                                     max_windows=self.max_windows, batch_size=self.batch_size,
                                     max_answer_length=self.max_answer_length, n_best=self.n_best,
                                     max_query_length=self.max_query_length, null_answers=self.null_answers,
                                     null_threshold=threshold)
        except RecordError as err:
            if (err.index is not None and fields[err.field][err.index] is None
                    and frame[err.field].iloc[err.index] is not None):
                # NaN: pandas' mark of a record without the field (MLflow's parsers and a DataFrame made of records
                # fill it in so), which a null next to texts becomes as well; a null left as None is one for sure.
                raise RequestError(f"record {err.index}: {err.field} is missing (the record has no {err.field}, "
                                   "or it is null)") from None
            raise RequestError(str(err)) from None
        # Indexed as the records are: a DataFrame's answers assigned back to it (``frame["answer"] =
        # predict(frame)["answer"]``) align on its index, which need not run 0, 1, ... (a sample or a filter of one).
        columns = {"answer": [a.text for a in answers], "score": [float(a.score) for a in answers]}
        if self.null_answers:  # how far "no answer" scored above the best span: what a threshold is tuned on
            # Every record has a span to measure it against: a context without a token the model reads is refused.
            columns["null_margin"] = [float(a.null_margin) for a in answers]
        return pd.DataFrame(columns, index=frame.index)


# The input columns are optional to MLflow's schema check, whose refusal of a missing column is a multi-line message:
# :meth:`PackedQAModel.predict` refuses it in one line naming the column instead. Their type is "any": MLflow casts
# every value of an `inputs` request to the column's type first (5 and null would arrive as the strings "5" and
# "None"), so the values must reach predict as sent, where every field is checked to be a string.
SIGNATURE = ModelSignature(inputs=Schema([ColSpec(AnyType(), "question", required=False),
                                          ColSpec(AnyType(), "context", required=False)]),
                           outputs=Schema([ColSpec("string", "answer"), ColSpec("double", "score")]))
# A model answering "no answer" also answers each record's ``null_margin``, and takes a request's own threshold
# (``"params": {"null_threshold": 1.5}``); its default None means "the served model's" (``model_config``), which a
# default number would override on every request.
NULL_SIGNATURE = ModelSignature(inputs=SIGNATURE.inputs,
                                outputs=Schema([*SIGNATURE.outputs.inputs, ColSpec("double", "null_margin")]),
                                params=ParamSchema([ParamSpec(NULL_THRESHOLD, "double", None)]))


def model_signature(null_answers: bool) -> ModelSignature:
    """The signature a version is logged with: :data:`NULL_SIGNATURE` for a model answering "no answer"."""
    return NULL_SIGNATURE if null_answers else SIGNATURE

