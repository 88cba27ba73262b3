"""Fingerprints that tell when a sweep can reuse what an earlier one made: its dense teacher (with the teacher's
metrics), and the dense baseline's scores.

A fingerprint is a stable 16-hex-digit hash of what determines the result: the contents of the input files (not
only their paths) and the config values that can change it. The sweep keeps each teacher under its fingerprint and
each baseline score under the fingerprint of what it was scored with (:func:`workflows.sweep.ensure_teacher`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

from pruning.config import SHIPPED_MODEL, RunConfig, config_to_dict
from pruning.contents import content_digest
from pruning.resources import ResourceError, resolve_data, resolve_model, resolve_tokenizer
from workflows.space import EVALUATION, TEACHER_IGNORES, SweepSpace, baseline_config, teacher_config

__all__ = ["teacher_fingerprint", "scoring_fingerprint"]

logger = logging.getLogger(__name__)

# Keys that cannot change the weights of a dense teacher run.
_NOT_IN_FINGERPRINT = frozenset({"output_dir", "device", "log_every", "save_every", "eval_every", "eval_batch_size",
                                 "max_windows", "teacher", "method", "cache_dir"}) | TEACHER_IGNORES
_FINGERPRINT_VERSION = "teacher-v2"


def teacher_fingerprint(space: SweepSpace) -> str:
    """A stable 16-hex-digit hash of what determines the teacher and its scores, to reuse a teacher (and its dense
    metrics) from an earlier sweep.

    For a trained teacher it covers the contents of the model, tokenizer and data files and every value of
    :func:`~workflows.space.teacher_config` that can change the teacher's weights or its evaluation (not the output
    directory, device, feature cache, logging/checkpoint cadence, nor mask and distillation keys, which a dense run
    ignores). For ``teacher.path`` it covers that directory's contents, the evaluation data's and the evaluation
    settings of :func:`~workflows.space.baseline_config`. A file edited in place or a directory replaced by another
    is a new teacher. An input that is not on this machine (a cluster's workers may hold paths the driver does not)
    counts by its path.
    """
    if space.teacher.path is not None:
        cfg = baseline_config(space, "-")
        values = config_to_dict(cfg)
        payload: dict[str, Any] = {k: values[k] for k in EVALUATION}
        inputs = {"teacher": (space.teacher.path, resolve_model), "eval_data": (cfg.eval_data, resolve_data)}
    else:
        cfg = teacher_config(space, "-")
        values = config_to_dict(cfg)
        payload = {k: v for k, v in sorted(values.items()) if k not in _NOT_IN_FINGERPRINT}
        tokenizer = cfg.tokenizer or (SHIPPED_MODEL if cfg.model_config is not None else None)
        inputs = {"model": (None if cfg.model_config is not None else cfg.model, resolve_model),
                  "tokenizer": (tokenizer, resolve_tokenizer),
                  "train_data": (cfg.train_data, resolve_data), "eval_data": (cfg.eval_data, resolve_data)}
    payload["contents"] = {key: _input_digest(name, resolve) for key, (name, resolve) in inputs.items()
                           if name is not None}
    text = json.dumps([_FINGERPRINT_VERSION, payload], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def scoring_fingerprint(cfg: RunConfig) -> str:
    """A stable 16-hex-digit hash of what a model is scored with under ``cfg``: its
    :data:`~workflows.space.EVALUATION` settings and the contents of its evaluation data (the path, for data that is
    not on this machine)."""
    values = config_to_dict(cfg)
    payload = {key: values[key] for key in EVALUATION}
    payload["contents"] = _input_digest(cfg.eval_data, resolve_data)
    text = json.dumps(["scores-v1", payload], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _input_digest(name: str, resolve: Callable[[str], Path]) -> str:
    """The contents of a model directory or data file, or its absolute path when it is not on this machine."""
    try:
        path = resolve(name)
    except ResourceError:
        return f"path:{Path(name).resolve()}"
    try:
        return content_digest(path)
    except OSError as err:  # unreadable here: the run that reads it says why
        logger.warning("%s: cannot read it to tell whether it changed (%s); it counts by its path", path, err)
        return f"path:{path.resolve()}"
