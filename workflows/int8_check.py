"""Which ONNX model a new registered version serves: int8 only where it keeps the F1 of fp32.

Dynamic int8 quantization costs some models far more accuracy than others. When a version is made (see
:mod:`workflows.registry`), its exported fp32 and int8 files are both scored on the questions its trial was scored
on (:func:`onnx_scores`, at most :data:`INT8_CHECK_QUESTIONS` of them), and the version serves int8 when it loses at
most the registry spec's ``max_int8_f1_drop`` F1 points against fp32 (:func:`int8_serves`), else fp32
(:func:`checked_variant`). The scores and the reason are the version's tags (:data:`CHECK_TAGS`), read back by
:func:`checked_f1` and :func:`served_figures` for ``fineprune select``, a registration's result and the report.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from pathlib import Path
from typing import Any, Mapping

from pruning.config import RunConfig
from pruning.errors import raise_interrupt_behind, typed_error_line
from workflows.record import (EXACT_MATCH, F1, ONNX_SCORE_TAGS, TAG_INT8_CHECK, TAG_ONNX_VARIANT, metric_tag,
                              tag_float)

__all__ = ["INT8_CHECK_QUESTIONS", "CHECK_TAGS", "int8_serves", "OnnxScores", "onnx_scores", "checked_variant",
           "wanted_variant", "checked_f1", "variant_run", "served_figures"]

logger = logging.getLogger(__name__)

INT8_CHECK_QUESTIONS = 500  # at most this many of its trial's questions score a new version's two ONNX models


# The tags a new version's int8 check writes (on the logged model, and on each version made of it)
CHECK_TAGS = (TAG_ONNX_VARIANT, TAG_INT8_CHECK, *ONNX_SCORE_TAGS.values())


def int8_serves(fp32_f1: float, int8_f1: float, max_drop: float) -> bool:
    """Whether a version serves its int8 model: it loses at most ``max_drop`` F1 points against the fp32 one."""
    return fp32_f1 - int8_f1 <= max_drop


@dataclasses.dataclass(frozen=True)
class OnnxScores:
    """An exported model's fp32 and int8 files scored on the same questions (:func:`onnx_scores`)."""

    scores: dict[str, dict[str, float]]  # variant -> {"exact_match", "f1"} in percent
    questions: int
    drop_standard_error: float  # of the F1 drop (fp32 minus int8), paired question by question; nan for 1 question


def onnx_scores(onnx_dir: str | Path, data: str | Path, limit: int | None,
                settings: Mapping[str, Any]) -> OnnxScores:
    """The EM/F1 of an exported model's fp32 and int8 files on the first ``limit`` questions of ``data``, with the
    windows and span search of a served model's ``settings`` (:func:`workflows.logged_model.serve_settings`), and the
    standard error of int8's F1 drop, paired question by question.

    Raises:
        ResourceError, SquadError, ExportError: the data or the export cannot be read.
    """
    from pruning import squad
    from pruning.checkpoint import read_null_answers
    from pruning.export import load_exported
    from pruning.resources import resolve_data
    from pruning.structure import max_positions
    from pruning.tokenizer import load_tokenizer

    path = resolve_data(str(data))
    examples = squad.load_squad(path, limit=limit, spans=False)
    tokenizer = load_tokenizer(onnx_dir)
    null_answers = read_null_answers(onnx_dir)  # the export keeps its model's record
    scores, per_question = {}, {}
    for variant in ("fp32", "int8"):
        model = load_exported(onnx_dir, variant)
        # The windows the served model cuts its settings to (workflows.served_model.PackedQAModel)
        seq, stride = squad.fit_windows(settings["max_seq_length"], settings["doc_stride"],
                                        max_positions(model.config))
        with squad.questions_of(path):
            metrics, predictions = squad.evaluate_model(
                model, tokenizer, examples, max_seq_length=seq, doc_stride=stride, batch_size=settings["batch_size"],
                max_answer_length=settings["max_answer_length"], n_best=settings["n_best"], progress=False,
                max_query_length=settings["max_query_length"], null_answers=null_answers)
        scores[variant] = {F1: float(metrics[F1]), EXACT_MATCH: float(metrics[EXACT_MATCH])}
        per_question[variant] = squad.question_f1(examples, predictions)
    drops = [a - b for a, b in zip(per_question["fp32"], per_question["int8"])]
    error = statistics.stdev(drops) / math.sqrt(len(drops)) if len(drops) > 1 else math.nan
    return OnnxScores(scores, len(examples), error)


def checked_variant(onnx_dir: Path, run, settings: Mapping[str, Any], max_drop: float | None,
                     what: str) -> tuple[str, dict[str, str]]:
    """The ONNX variant a new version of the trial ``run`` serves, and the tags that say why (:data:`CHECK_TAGS`).

    Int8 is dynamic quantization, which costs some models far more accuracy than others: both files are scored on
    (at most :data:`INT8_CHECK_QUESTIONS` of) the questions the trial was scored on, and int8 serves when it loses
    at most ``max_drop`` F1 points, else fp32. ``max_drop`` None: int8, unchecked. Questions that cannot be read
    here (the trial's data file is on another machine) leave int8 serving, with a warning and the reason in the
    ``int8_check`` tag.
    """
    if max_drop is None:
        return "int8", {TAG_ONNX_VARIANT: "int8",
                        TAG_INT8_CHECK: "serves ONNX Runtime int8, unchecked (max_int8_f1_drop: null)"}
    params = run.data.params
    data = params.get("eval_data", RunConfig.__dataclass_fields__["eval_data"].default)
    try:
        limit = min(int(params["eval_limit"]), INT8_CHECK_QUESTIONS)
    except (KeyError, ValueError):  # "None": the trial scored every question
        limit = INT8_CHECK_QUESTIONS
    try:
        measured = onnx_scores(onnx_dir, data, limit, settings)
    except Exception as err:  # the data or ORT: either leaves int8 serving, unchecked, as before the check existed
        raise_interrupt_behind(err)
        reason = typed_error_line(err)
        logger.warning("%s: serves its int8 model unchecked: the trial's questions cannot be scored here (%s)",
                       what, reason)
        return "int8", {TAG_ONNX_VARIANT: "int8",
                        TAG_INT8_CHECK: f"serves ONNX Runtime int8, unchecked: the trial's questions could not be "
                                        f"scored ({reason})"[:500]}
    scores = measured.scores
    fp32, int8 = scores["fp32"][F1], scores["int8"][F1]
    variant = "int8" if int8_serves(fp32, int8, max_drop) else "fp32"
    line = (f"serves ONNX Runtime {variant}: int8 F1 {int8:.2f} against fp32 {fp32:.2f} on the first "
            f"{measured.questions} questions the trial was scored on, {'within' if variant == 'int8' else 'more than'} "
            f"{max_drop:g} F1 below (max_int8_f1_drop; the drop's standard error, question by question: "
            f"{measured.drop_standard_error:.2f})")
    (logger.warning if variant == "fp32" else logger.info)("%s: %s", what, line)
    tags = {TAG_ONNX_VARIANT: variant, TAG_INT8_CHECK: line}
    tags.update({tag: metric_tag(scores[name][metric]) for (name, metric), tag in ONNX_SCORE_TAGS.items()})
    return variant, tags


def wanted_variant(tags: Mapping[str, str], max_drop: float | None) -> str | None:
    """The ONNX variant a new version would serve with ``max_drop``, from a logged model's check ``tags``; None when
    they hold no scores to decide by (the model was logged unchecked)."""
    if max_drop is None:
        return "int8"
    fp32, int8 = checked_f1(tags, "fp32"), checked_f1(tags, "int8")
    if fp32 is None or int8 is None:
        return None
    return "int8" if int8_serves(fp32, int8, max_drop) else "fp32"


def checked_f1(tags: Mapping[str, str], variant: str | None) -> float | None:
    """The F1 a version's int8 check measured for its ONNX ``variant`` (int8 or fp32) on its trial's questions; None
    for another variant (``none``: PyTorch) or a version made before the check."""
    key = ONNX_SCORE_TAGS.get((variant, F1))
    return None if key is None else tag_float(tags, key)


def variant_run(served_by: str) -> str:
    """The ONNX variant a ``served_by`` label names (``onnxruntime-int8``: int8), ``none`` for PyTorch (``torch``,
    ``torch-bf16``)."""
    runs_as, _, variant = served_by.partition("-")
    return variant if runs_as == "onnxruntime" else "none"


def served_figures(tags: Mapping[str, str]) -> dict[str, Any]:
    """What a version serves (``onnx_variant``: int8, fp32 or none) and the F1 its check measured for that model
    (``served_f1``); None for both for a version made before the check."""
    variant = tags.get(TAG_ONNX_VARIANT)
    return {"onnx_variant": variant, "served_f1": checked_f1(tags, variant)}
