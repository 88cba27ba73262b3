"""What a resumed run must share with the run that wrote its checkpoint, and where in its windows it goes on.

``train(cfg, resume_from=...)`` (:mod:`pruning.trainer`) refuses a checkpoint written under a config that differs in
what gives its masks and optimizer state their meaning (:func:`check_resume_config`, before anything is written),
or whose windows a teacher would cut otherwise (:func:`check_resumed_windows`), and goes on at the window the
checkpoint's ``trainer_state.json`` records (:func:`resume_position`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers.utils import CONFIG_NAME

from .batches import DataPosition, position_after
from .checkpoint import MASKS_KEY, STATE, CheckpointError, read_evaluation, read_json
from .config import (CHECKPOINT_DIR, FINAL_DIR, MAX_SEED, ConfigError, Method, RunConfig, config_to_dict,
                     default_block)
from .contents import content_digest
from .errors import path_hint
from .resources import resolve_data, resolve_model, same_model

__all__ = ["RESUME_KEYS", "RESUME_METHOD_KEYS", "DATA_DIGEST", "MODEL_DIGEST", "DATA_POSITION", "check_resume_config",
           "check_resumed_masks", "check_resumed_windows", "resume_position"]

logger = logging.getLogger(__name__)


# What a resumed run must share with the run that wrote its checkpoint: the model and the training windows, what
# gives the masks their meaning and places the steps on the pruning schedule, and which parameters train (the
# optimizer state is theirs). Anything else (output_dir, evaluation, logging, checkpoints, the device, precision,
# learning rates, distillation) may change on resume, but for a teacher that would cut the windows otherwise
# (checked once it is loaded, by check_resumed_windows).
RESUME_KEYS = ("model", "model_config", "tokenizer", "train_data", "train_limit", "max_seq_length", "doc_stride",
               "max_query_length", "method", "freeze_embeddings")
_SCHEDULE_KEYS = ("epochs", "max_steps", "batch_size", "grad_accum", "fill_steps", "initial_warmup", "final_warmup",
                  "attention_block")
RESUME_METHOD_KEYS = {
    Method.DENSE: (),
    Method.TOPK: _SCHEDULE_KEYS + ("target_density", "topk_scope"),
    # the L1 weights ramp with the threshold and set the density the run reaches, as target_density does for topk
    Method.SIGMOID_THRESHOLD: _SCHEDULE_KEYS + ("initial_threshold", "final_threshold", "lambda_attention",
                                                "lambda_ffn"),
    Method.FISHER: ("fill_steps", "attention_block", "target_density", "target_flops", "fisher_stages",
                    "fisher_layer_floor", "mask_rearrange", "fill_packed"),
}


DATA_DIGEST = "train_data_digest"  # in trainer_state.json: the sha256 of the training file's contents
MODEL_DIGEST = "model_digest"  # in trainer_state.json: the sha256 of the model directory's files
DATA_POSITION = "data_position"  # in trainer_state.json: the DataPosition of the next window to train


def resume_position(state: dict[str, Any], checkpoint_dir: Path, cfg: RunConfig,
                     features: dict[str, torch.Tensor]) -> DataPosition:
    """Where in its training windows the run of ``state`` (a checkpoint's trainer_state.json) stopped.

    A checkpoint written before checkpoints recorded it stopped after ``step * grad_accum`` micro-batches in the
    order of the seed, batch size and group_by_length of the config it records (a key it lacks had its default; a
    checkpoint without a config is placed by this run's).

    Raises:
        CheckpointError: a record that is not a position in these windows, naming the file and the field.
    """
    path = checkpoint_dir / STATE
    record = state.get(DATA_POSITION)
    if record is None:
        stored = state.get("config")
        defaults = config_to_dict(RunConfig())
        if not isinstance(stored, dict):
            stored, defaults = {}, config_to_dict(cfg)
        settings = {key: stored.get(key, defaults[key])
                    for key in ("seed", "batch_size", "grad_accum", "group_by_length")}
        _check_position_fields(path, "config", settings)
        return position_after(features, settings["seed"], settings["batch_size"], settings["group_by_length"],
                               int(state["step"]) * settings["grad_accum"])
    keys = [f.name for f in dataclasses.fields(DataPosition)]
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: {DATA_POSITION} must be an object, got {json.dumps(record)}")
    _check_position_fields(path, DATA_POSITION, {key: record.get(key) for key in keys})
    num = int(features["input_ids"].shape[0])
    if record["window"] >= num:
        raise CheckpointError(f"{path}: {DATA_POSITION}.window {record['window']} is past the {num} training windows "
                              "of an epoch")
    return DataPosition(**{key: record[key] for key in keys})


_LEAST = {"epoch": 0, "window": 0, "seed": 0, "batch_size": 1, "grad_accum": 1}
# A run's seed is a config's (at most MAX_SEED); the epoch's order is seeded with seed * 1000003 + epoch, which
# torch takes only below 2**64.
_MOST = {"seed": MAX_SEED, "epoch": 2**31 - 1}


def _check_position_fields(path: Path, name: str, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if key == "group_by_length":
            fits, wanted = isinstance(value, bool), "true or false"
        else:
            least, most = _LEAST[key], _MOST.get(key)
            fits = (isinstance(value, int) and not isinstance(value, bool) and value >= least
                    and (most is None or value <= most))
            wanted = f"an integer of at least {least}" if most is None else f"an integer from {least} to {most}"
        if not fits:
            raise CheckpointError(f"{path}: {name}.{key} must be {wanted}, got {json.dumps(value)}")


def _block_setting(value: Any, method: Method | None) -> Any:
    """A recorded ``attention_block`` as the run of ``method`` prunes with it: null is the method's own block."""
    if value is not None or method is None:
        return value
    block = default_block(method)
    return list(block) if isinstance(block, tuple) else block


def _same_setting(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if not (isinstance(old, str) and isinstance(new, str)):
        return False
    if key == "model":  # "minilm" and its path, a relative and an absolute path: one model
        return same_model(old, new)
    try:  # the same file under two names
        if key == "train_data":
            return resolve_data(old).resolve() == resolve_data(new).resolve()
        if key == "tokenizer":
            return Path(old).resolve() == Path(new).resolve()
    except (OSError, ValueError):
        return False
    return False


def _moved(key: str, old: Any, new: Any, digest: Any) -> bool | None:
    """Whether the model or training file a checkpoint records at ``old``, no longer there, is the one at ``new``
    (its contents have the recorded sha256 ``digest``): True, False, or None where the checkpoint records no digest
    to tell by (written before checkpoints did). False where ``old`` is still there: that is another input."""
    resolve = resolve_model if key == "model" else resolve_data
    try:
        resolve(old)
        return False
    except (OSError, ValueError):
        pass
    if not isinstance(digest, str):
        return None
    try:
        return content_digest(resolve(new)) == digest
    except (OSError, ValueError):
        return False


def check_resume_config(cfg: RunConfig, checkpoint_dir: str | Path) -> None:
    """Refuse to resume ``checkpoint_dir`` under ``cfg`` when a setting of :data:`RESUME_KEYS` (or of the method's
    :data:`RESUME_METHOD_KEYS`) differs from the config its ``trainer_state.json`` records, and a dense run without
    ``max_steps`` under another ``batch_size`` or ``grad_accum`` (its step count would stand for other epochs). A
    model or training file no longer at its recorded path is the same setting at a new one whose contents have the
    recorded digest (:data:`MODEL_DIGEST`, :data:`DATA_DIGEST`).

    Raises:
        CheckpointError: the state file is missing or unreadable.
        ConfigError: naming the checkpoint and every differing key with both values (or the batch key).
    """
    path = Path(checkpoint_dir) / STATE
    if Path(checkpoint_dir).is_file():  # a file of the checkpoint, say its trainer_state.json
        raise CheckpointError(f"{checkpoint_dir}: is a file; a training checkpoint directory is expected")
    if not Path(checkpoint_dir).is_dir():
        raise CheckpointError(f"{checkpoint_dir}: checkpoint directory not found{path_hint(Path(checkpoint_dir))}")
    if not path.exists():
        raise CheckpointError(_not_a_checkpoint(Path(checkpoint_dir)))
    state = read_json(path)
    stored = state.get("config")
    if not isinstance(stored, dict):
        logger.warning("%s: records no run config; resuming without checking that it matches", path)
        return
    defaults = config_to_dict(RunConfig())  # a key a checkpoint lacks had its default when it was written
    given = config_to_dict(cfg)
    methods = {cfg.method}
    try:
        stored_method = Method(stored.get("method", defaults["method"]))
        methods.add(stored_method)
    except ValueError:
        stored_method = None
    keys = list(RESUME_KEYS) + [k for m in Method if m in methods for k in RESUME_METHOD_KEYS[m]]
    differing = []
    digests = {"model": state.get(MODEL_DIGEST), "train_data": state.get(DATA_DIGEST)}
    for key in dict.fromkeys(keys):
        old, new = stored.get(key, defaults[key]), given[key]
        if key == "attention_block":  # null: the method's own block, the same run as one that names it
            old, new = _block_setting(old, stored_method), _block_setting(new, cfg.method)
        moved = (_moved(key, old, new, digests[key]) if key in digests and isinstance(old, str)
                 and isinstance(new, str) and not _same_setting(key, old, new) else False)
        if moved:  # a run directory, its model and data moved elsewhere (another disk, a renamed parent)
            logger.info("%s: %s %s is no longer there; %s here holds the same contents", checkpoint_dir, key,
                        json.dumps(old), json.dumps(new))
        elif not _same_setting(key, old, new):
            gone = (" (gone from there, and the checkpoint records no digest of it to recognise it by elsewhere)"
                    if moved is None else "")
            differing.append(f"{key} {json.dumps(old)} there{gone}, {json.dumps(new)} here")
        elif key == "train_data" and _data_changed(given[key], state.get(DATA_DIGEST)):
            differing.append(f"train_data {json.dumps(given[key])}: its contents differ from those the checkpoint "
                             "was trained on")
    if differing:
        raise ConfigError(f"{Path(checkpoint_dir)}: written under a different run config ({'; '.join(differing)}); "
                          f"resume with the config it was written with")
    if cfg.method is Method.DENSE and cfg.max_steps is None:  # its steps: its epochs in batches of its settings
        for key in ("batch_size", "grad_accum"):
            old = stored.get(key, defaults[key])
            if old != given[key]:
                raise ConfigError(f"{Path(checkpoint_dir)}: {key} {json.dumps(old)} there, {json.dumps(given[key])} "
                                  "here: a run without max_steps counts its epochs in steps of its batches, so it "
                                  "would train another number of epochs; resume with the same batches, or set "
                                  "max_steps")


# The masks a run of each method trains (in its filled phase, the masks it fixed came from): a global topk keeps
# the blocks above one cut-off of all the scores, a fisher cut its structure's.
_MASK_SOURCES = {Method.TOPK: ("topk", "cutoff"), Method.SIGMOID_THRESHOLD: ("sigmoid_threshold",),
                 Method.FISHER: ("cutoff",)}


def check_resumed_masks(cfg: RunConfig, checkpoint_dir: str | Path) -> None:
    """Refuse a checkpoint whose ``config.json`` records masks that are not those ``cfg``'s method trains (or masks
    in a dense run, or none in a pruning run): a config.json edited or copied from another run would otherwise load
    as other masks, resume and train another model without a word.

    Raises:
        CheckpointError: naming the checkpoint's config.json and the key.
    """
    path = Path(checkpoint_dir) / CONFIG_NAME
    if not path.is_file():
        return  # said by the model's load, which names the file
    settings = read_json(path).get(MASKS_KEY)
    if not cfg.masked:
        if settings is not None:
            raise CheckpointError(f"{path}: {MASKS_KEY}: a masked model, but method dense trains none (the file was "
                                  "edited or comes from another run)")
        return
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: no {MASKS_KEY}: a dense model, but method {cfg.method.value} trains masks "
                              "(the file was edited or comes from another run)")
    mode = settings.get("mode")
    fill_from = settings.get("fill_from")
    source = fill_from.get("mode") if mode == "fixed" and isinstance(fill_from, dict) else mode
    if source not in _MASK_SOURCES[cfg.method]:
        key = "fill_from.mode" if mode == "fixed" else "mode"
        trains = " or ".join(json.dumps(m) for m in _MASK_SOURCES[cfg.method])
        raise CheckpointError(f"{path}: {MASKS_KEY}.{key}: {json.dumps(source)}, but method {cfg.method.value} "
                              f"trains {trains} masks (the file was edited or comes from another run)")


def _data_changed(train_data: str, digest: Any) -> bool:
    """Whether the file ``train_data`` names no longer holds the contents of sha256 ``digest`` (False where the
    checkpoint records none, written before checkpoints did, or where the file cannot be read: the run's load of it
    says so)."""
    if not isinstance(digest, str):
        return False
    try:
        return content_digest(resolve_data(train_data)) != digest
    except OSError:
        return False


def _not_a_checkpoint(directory: Path) -> str:
    """Why ``directory`` (which has no trainer_state.json) cannot be resumed, naming the checkpoint meant when the
    directory is a run's output_dir or its final model."""
    message = f"{directory}: not a training checkpoint (no {STATE})"
    if (directory / CHECKPOINT_DIR / STATE).is_file():  # the run's output_dir
        return f"{message}; resume from the run's checkpoint {directory / CHECKPOINT_DIR}"
    if directory.name == FINAL_DIR and (directory.parent / CHECKPOINT_DIR / STATE).is_file():
        return f"{message}, a final model; resume from its run's checkpoint {directory.parent / CHECKPOINT_DIR}"
    return message


def check_resumed_windows(cfg: RunConfig, checkpoint_dir: Path, state: dict[str, Any]) -> None:
    """Refuse a resume whose windows, as cut to the model and the teacher (``cfg`` from
    :func:`~pruning.trainer.fit_to_model`), are not those the checkpoint's run trained on: its config keeps
    ``max_seq_length`` and ``doc_stride``, but a teacher with other position embeddings than the run's would cut them
    otherwise.

    Raises:
        ConfigError: naming the checkpoint, the teacher there and here, and both windows.
    """
    recorded = read_evaluation(checkpoint_dir)  # empty for a checkpoint written before models recorded it
    there = (recorded.get("max_seq_length", cfg.max_seq_length), recorded.get("doc_stride", cfg.doc_stride))
    here = (cfg.max_seq_length, cfg.doc_stride)
    if there == here:
        return
    stored = state.get("config") if isinstance(state.get("config"), dict) else {}
    raise ConfigError(f"{checkpoint_dir}: teacher {json.dumps(stored.get('teacher'))} there, "
                      f"{json.dumps(cfg.teacher)} here: the run trained on windows of {there[0]} tokens (doc_stride "
                      f"{there[1]}), which the position embeddings here make {here[0]} (doc_stride {here[1]}); "
                      "resume with a teacher that keeps the windows")
