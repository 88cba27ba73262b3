"""Model directories and training checkpoints: safetensors, JSON and tokenizer files; never pickles.

A checkpoint is a standard Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files). A masked
model's ``config.json`` carries a ``fineprune_masks`` entry (method, block shape, current threshold, phase) and its
``model.safetensors`` holds the mask scores beside the weights. A model a training run wrote (its checkpoint and
final model) records in ``config.json`` under ``fineprune_evaluation`` the windows and span search it was evaluated
with (:data:`pruning.config.EVALUATION_KEYS`), the precision of its evaluations (``precision``: ``fp32`` or
``bf16``) and, for a run trained on unanswerable questions, ``null_answers: true``; the entry is part of the model's
config, so packing and export carry it on, and :func:`read_evaluation`, :func:`read_precision` and
:func:`read_null_answers` read it back. A training checkpoint adds ``trainer_state.json``
and ``optimizer.safetensors`` (optimizer moments and the RNG states of the CPU and of any CUDA device in use), so
a run resumes at the same step with the same masks and dropout draws; ``trainer_state.json`` records the run config
and where the run stands in its training windows (``data_position``). :func:`load_model` opens any of them: a dense
HF QA model of a type in :mod:`pruning.structure` (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA), a DistilBERT
one (read as BERT, :mod:`pruning.distilbert`) or an ALBERT one (read as ELECTRA, :mod:`pruning.albert`), a masked
checkpoint or a packed directory;
:func:`pruning.tokenizer.load_tokenizer` their tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AlbertConfig, DistilBertConfig, PretrainedConfig, PreTrainedTokenizerBase

from . import albert, distilbert
from . import masks as mask_lib
from .atomic import save_tensors, staged_dir
from .config import EVALUATION_KEYS, parser_limit
from .errors import error_line, path_hint
from .packing import (PACKED_FLAG, WEIGHTS_INDEX_NAME, PackingError, add_remote_code, check_kinds, load_packed,
                      read_weights, weight_dtypes)
from .sparsity import sparsity_report
from .quiet import leaving_out, quiet_transformers
from .structure import ARCHITECTURES, DEFAULT_MODEL_TYPE, config_class, qa_model_class

__all__ = [
    "CheckpointError",
    "MASKS_KEY",
    "EVALUATION_KEY",
    "read_evaluation",
    "read_null_answers",
    "read_precision",
    "NULL_ANSWERS",
    "save_model",
    "load_model",
    "load_config",
    "TOKENIZER_FILES",
    "load_training_state",
    "optimizer_tensors",
    "restore_optimizer",
    "mask_settings",
    "restore_masks_",
    "read_json",
]

logger = logging.getLogger(__name__)

MASKS_KEY = "fineprune_masks"
AUTO_MAP = "auto_map"  # in config.json: the code files that build the model, for trust_remote_code=True
EVALUATION_KEY = "fineprune_evaluation"  # in config.json: the windows and span search of the run that wrote it
NULL_ANSWERS = "null_answers"  # in that record: true when the run trained on unanswerable questions
WEIGHTS = "model.safetensors"
EXPORT_MANIFEST = "fineprune_export.json"  # what marks an ONNX export (pruning.export), which holds no such weights
QA_HEAD = "qa_outputs.weight"  # the span head of BertForQuestionAnswering; a pre-trained encoder has none
_ENCODER_LAYER = re.compile(r"(^|\.)encoder\.layer\.\d+\.")  # a tensor of one of the encoder's layers
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"
# The files a directory's own tokenizer is read from (without any, transformers builds one from config.json alone).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
_PARAMS = "params"  # in the optimizer tensors: how many parameters the optimizer stepped
_CUDA_RNG = "rng.cuda."  # in the optimizer tensors: the generator state of each CUDA device, by index


class CheckpointError(ValueError):
    """A model directory or checkpoint is missing or unreadable; the message names the file."""


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    except (RecursionError, ValueError) as err:
        if (limit := parser_limit(err)) is None:
            raise
        raise CheckpointError(f"{path}: not readable JSON ({limit})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: corrupted or unreadable safetensors file ({err})") from None


@contextlib.contextmanager
def _weights_errors() -> Iterator[None]:
    """The one-line errors of the weights reader packing shares (a missing, corrupted or mismatched weights file,
    integers for floats) as the :class:`CheckpointError` that :func:`load_model` raises."""
    try:
        yield
    except PackingError as err:
        raise CheckpointError(str(err)) from None


def mask_settings(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`load_model` needs to rebuild the masks of ``model`` exactly (None for an unmasked model).

    In the filled phase the layers hold fixed masks; ``fill_from`` records the mode and threshold that gave that
    structure at the end of pruning, so it can be found again from the (frozen) scores.
    """
    layers = [m for _, m in mask_lib.masked_modules(model)]
    if not layers:
        return None
    # The first attention layer is a query projection: its block is the configured one (the output projection
    # holds the transposed block).
    attention = next((m for m in layers if m.role == "attention"), layers[0])
    fill_from = getattr(model, "fineprune_fill_from", None)
    return {
        "attention_block": list(attention.block),
        "mode": attention.mode,
        "threshold": attention.current_threshold(),
        "fill_from": None if fill_from is None else {"mode": fill_from[0], "threshold": fill_from[1]},
    }


def save_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path,
               extra_files: dict[str, Any] | None = None, tensors: dict[str, dict[str, torch.Tensor]] | None = None,
               masks: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and its mask scores) as an HF directory, atomically: a crash never leaves half a checkpoint.

    A packed model (a training run continued from a packed directory) gets ``packed_modeling.py`` and config.json's
    ``auto_map`` as :func:`pruning.packing.save_packed` writes them, so that its checkpoint and final model open with
    ``AutoModelForQuestionAnswering.from_pretrained(dir, trust_remote_code=True)`` as the directory it started from.

    Args:
        model: a dense, masked or packed QA model.
        tokenizer: saved beside the weights when given.
        out_dir: target directory; replaced as a whole once the new one is complete.
        extra_files: JSON files to add (name -> object).
        tensors: extra safetensors files to add (name -> tensors).
        masks: mask settings to record; default: read off the model.
        evaluation: the windows, span search and precision the model is evaluated with (see
            :func:`read_evaluation` and :func:`read_precision`), recorded in config.json; default: what the
            model's config already records, if anything.
    """
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        config = model.config.to_dict()
        settings = masks if masks is not None else mask_settings(model)
        config.pop(MASKS_KEY, None)
        config.pop(AUTO_MAP, None)  # its code files are not written here; a packed model's are added below
        config.pop("_name_or_path", None)  # where it was read from here, as from_pretrained's own saves leave out
        if settings is not None:
            config[MASKS_KEY] = settings
        if evaluation is not None:
            config[EVALUATION_KEY] = dict(evaluation)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        if config.get(PACKED_FLAG):  # a packed directory opens without fineprune only with its modeling file
            add_remote_code(tmp, model.config.model_type)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_tensors(state, tmp / WEIGHTS, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, value in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(value, indent=2), encoding="utf-8")
        for name, value in (tensors or {}).items():
            save_tensors({k: v.detach().contiguous().cpu() for k, v in value.items()}, tmp / name)
    return out_dir


def _evaluation_record(model_dir: str | Path) -> tuple[Path, Any]:
    """``model_dir``'s config.json and its ``fineprune_evaluation`` entry as stored (None when it has none)."""
    config_file = Path(model_dir) / "config.json"
    return config_file, read_json(config_file).get(EVALUATION_KEY)


def read_evaluation(model_dir: str | Path) -> dict[str, int]:
    """The evaluation windows and span search ``model_dir`` records (``fineprune_evaluation`` in its config.json):
    those of the training run that wrote the model, kept by packing and export. Empty for a directory without the
    record (written by another tool, or before models recorded it).

    Raises:
        CheckpointError: config.json is missing or unreadable, or the record is not an object of whole numbers
            >= 1 (naming the file and the key).
    """
    config_file, record = _evaluation_record(model_dir)
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise CheckpointError(f"{config_file}: {EVALUATION_KEY}: expected an object, got {record!r}")
    settings = {}
    for key in EVALUATION_KEYS:
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{config_file}: {EVALUATION_KEY}.{key}: must be a whole number >= 1, "
                                  f"got {value!r}")
        settings[key] = value
    return settings


def read_null_answers(model_dir: str | Path) -> bool:
    """Whether the run that wrote ``model_dir`` trained it on unanswerable questions (SQuAD v2.0), so that it answers
    "no answer" (the empty text) where that scores higher than every span (``fineprune_evaluation.null_answers`` in
    its config.json; False for a directory without it).

    Raises:
        CheckpointError: config.json is missing or unreadable, or the value is not true or false.
    """
    config_file, record = _evaluation_record(model_dir)
    value = record.get(NULL_ANSWERS, False) if isinstance(record, dict) else False
    if not isinstance(value, bool):
        raise CheckpointError(f"{config_file}: {EVALUATION_KEY}.{NULL_ANSWERS}: must be true or false, got {value!r}")
    return value


def read_precision(model_dir: str | Path) -> str | None:
    """The precision the run that wrote ``model_dir`` evaluated it in (``fineprune_evaluation.precision`` in its
    config.json: ``fp32`` or ``bf16``, what ``auto`` became), or None for a directory without it.

    Raises:
        CheckpointError: config.json is missing or unreadable, or the value is neither (naming the file and key).
    """
    config_file, record = _evaluation_record(model_dir)
    value = record.get("precision") if isinstance(record, dict) else None
    if value is not None and value not in ("fp32", "bf16"):
        raise CheckpointError(f"{config_file}: {EVALUATION_KEY}.precision: must be fp32 or bf16, got {value!r}")
    return value


def _config(model_dir: Path) -> tuple[dict[str, Any], PretrainedConfig]:
    config_file = model_dir / "config.json"
    raw = read_json(config_file)
    model_type = raw.get("model_type", DEFAULT_MODEL_TYPE)
    supported = (*ARCHITECTURES, *_READ_AS)
    if not isinstance(model_type, str) or model_type not in supported:
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not supported "
                              f"({', '.join(sorted(supported))})")
    # auto_map names code files of this directory (a hub model's own classes): the model is built here with the
    # stock class of its model_type, and a directory written from it carries none of them.
    clean = {k: v for k, v in raw.items() if k not in (MASKS_KEY, AUTO_MAP)}
    try:
        if model_type in _READ_AS:  # read as the model of another type that computes the same
            reader = _READ_AS[model_type]
            return raw, reader.config(reader.config_type.from_dict(clean),
                                      {k: v for k, v in clean.items() if k.startswith("fineprune_")})
        return raw, config_class(model_type).from_dict(clean)
    except Exception as err:  # TypeError, ValueError, or the strict field checks of recent transformers
        message = " ".join(str(err).split())
        raise CheckpointError(f"{config_file}: invalid {model_type} config ({message})") from None


def load_config(model_dir: str | Path) -> PretrainedConfig:
    """The transformers config of a model directory, as :func:`load_model` builds the model from it.

    Raises:
        CheckpointError: ``config.json`` is missing, not JSON, of an unsupported model type, or invalid.
    """
    return _config(Path(model_dir))[1]


def load_model(model_dir: str | Path, qa_head: bool = False, *, fine_tune: bool = False) -> nn.Module:
    """Open a dense, masked or packed QA model directory, in eval mode on the CPU, in float32.

    Weights stored in half precision (a config.json with ``dtype: bfloat16``, say) are widened: parameters, mask
    scores and optimizer state are float32, whatever the run's ``precision`` autocasts.

    A dense directory without a QA head (a pre-trained encoder) gets a freshly initialised ``qa_outputs``, unless
    ``qa_head`` asks for a model that answers questions as it is (a teacher, a model to evaluate, pack or export):
    then it is an error. The fresh head is said in a warning (the model answers at random until it is trained), or,
    with ``fine_tune`` (the start of a fine-tune, which trains it), in an info line.

    Raises:
        CheckpointError: the directory, its config or its weights are missing or corrupted, or (with ``qa_head``)
            the weights hold no QA head.
    """
    model_dir = Path(model_dir)
    if model_dir.is_file():  # its config.json or weights file, say: as resolve_model says it
        raise CheckpointError(f"{model_dir}: is a file; a model directory is expected")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory not found{path_hint(model_dir)}")
    weights_there = any((model_dir / name).is_file() for name in (WEIGHTS, WEIGHTS_INDEX_NAME))
    if (model_dir / EXPORT_MANIFEST).is_file() and not weights_there:
        raise CheckpointError(f"{model_dir}: is an ONNX export ({EXPORT_MANIFEST}), which eval, ask and serving run; "
                              "give the PyTorch model directory it was exported from")
    raw, config = _config(model_dir)
    if raw.get(PACKED_FLAG):
        return load_packed(model_dir).float()
    settings = raw.get(MASKS_KEY)
    if settings is None and raw.get("model_type") in _READ_AS:
        return _load_read_as(model_dir, raw, config, qa_head)
    if settings is None:
        with _weights_errors():  # a clear error for a missing or corrupted file before transformers reads it
            weights, stored = weight_dtypes(model_dir)
        if qa_head and not any(name.endswith(QA_HEAD) for name in stored):
            raise CheckpointError(_no_qa_head(model_dir, weights))
        try:
            # Mismatched shapes come back in the loading info (checked below) rather than as an error that points
            # at a table in the log; so does all that transformers' table of the loading (its "LOAD REPORT") would
            # say, and the expected differences (a fresh QA head, a pooler dropped) need no table of a dozen lines.
            with quiet_transformers(), leaving_out("transformers.modeling_utils", lambda m: "LOAD REPORT" in m):
                model, info = qa_model_class(config.model_type).from_pretrained(
                    str(model_dir), local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True,
                    dtype=torch.float32, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{model_dir}: cannot load model ({error_line(err)})") from None
        except Exception as err:  # the modules check their config values (an activation's name, say) as they build
            raise CheckpointError(_cannot_build(model_dir, config, err)) from None
        _check_loading_info(weights, info)
        if info.get("missing_keys") and fine_tune:  # only the QA head may be missing: a pre-trained encoder
            logger.info("%s: a pre-trained encoder without a question-answering head; qa_outputs starts from random "
                        "weights", model_dir)
        elif info.get("missing_keys"):
            logger.warning("%s: a pre-trained encoder without a question-answering head; qa_outputs starts from "
                           "random weights, and the model answers at random until it is fine-tuned (qa_head=True "
                           "refuses such a directory)", model_dir)
        with _weights_errors():  # from_pretrained converts integers to the float dtype it loads in, without a word
            check_kinds(weights, stored, model.state_dict())
        if hasattr(model.config, AUTO_MAP):  # read by from_pretrained itself: forgotten as _config forgets it
            delattr(model.config, AUTO_MAP)
        return model.eval()
    try:
        model = qa_model_class(config.model_type)(config)
    except Exception as err:  # as above: heads that do not divide the hidden size, an unknown activation
        raise CheckpointError(_cannot_build(model_dir, config, err)) from None
    restore_masks_(model, settings, source=str(model_dir / "config.json"))
    with _weights_errors():
        weights, state = read_weights(model_dir)
    _check_state(weights, state, model.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        names = (missing or unexpected)[:3]
        raise CheckpointError(f"{weights}: weights do not match the config "
                              f"({'missing' if missing else 'unexpected'}: {', '.join(names)})")
    if settings.get("mode") == "fixed":
        _refix(model, settings)
    return model.eval()


def _check_state(weights: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Refuse weights of other shapes than the model's (another model's, or a config edited) and integers for its
    floating-point tensors, in one line naming the weights file."""
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{weights}: weights do not match the config ({name} has shape "
                                  f"{tuple(tensor.shape)}, the config gives {tuple(expected[name].shape)})")
    with _weights_errors():
        check_kinds(weights, {name: tensor.dtype for name, tensor in state.items()}, expected)


def _no_qa_head(model_dir: Path, weights: Path) -> str:
    """The one line of a directory without a QA head where a model that answers questions is needed."""
    return (f"{model_dir}: not a question-answering model ({weights.name} has no {QA_HEAD}: a pre-trained encoder, "
            "whose answers would come from a random head); fine-tune it with `fineprune train` first")


@dataclasses.dataclass(frozen=True)
class _ReadAs:
    """A ``model_type`` read as the model of another that computes the same function."""

    name: str  # as a message names such a model ("a DistilBERT model")
    config_type: type  # its transformers config class
    config: Callable[[Any, Mapping[str, Any]], PretrainedConfig]  # (its config, entries kept) -> the other's config
    state: Callable[[Mapping[str, torch.Tensor], Any], tuple[dict[str, torch.Tensor], list[str]]]  # its weights ->
    # (the other's, the names of the tensors not known)


_READ_AS = {
    distilbert.MODEL_TYPE: _ReadAs("a DistilBERT model", DistilBertConfig, distilbert.bert_config,
                                   lambda state, config: distilbert.bert_state(state, config.dim)),
    albert.MODEL_TYPE: _ReadAs("an ALBERT model", AlbertConfig, albert.electra_config, albert.electra_state),
}


def _load_read_as(model_dir: Path, raw: Mapping[str, Any], config: PretrainedConfig, qa_head: bool) -> nn.Module:
    """A dense DistilBERT or ALBERT directory as the BERT or ELECTRA QA model of ``config`` that computes the same
    (see :mod:`pruning.distilbert`, :mod:`pruning.albert`), float32, in eval mode; without a QA head, a fresh one
    (or, with ``qa_head``, an error as for any model).

    Raises:
        CheckpointError: the weights are missing or corrupted, or are not those of a model of the config's type.
    """
    reader = _READ_AS[raw["model_type"]]
    with _weights_errors():
        weights, stored = read_weights(model_dir)
    state, unknown = reader.state(stored, reader.config_type.from_dict(
        {k: v for k, v in raw.items() if k not in (MASKS_KEY, AUTO_MAP)}))
    if unknown:
        raise CheckpointError(f"{weights}: not the weights of {reader.name} (unexpected: {unknown[0]}"
                              + _more(len(unknown)) + ")")
    if qa_head and QA_HEAD not in state:
        raise CheckpointError(_no_qa_head(model_dir, weights))
    try:
        with quiet_transformers():
            model = qa_model_class(config.model_type)(config)
    except Exception as err:  # the modules check their config values (an activation's name, say) as they build
        raise CheckpointError(_cannot_build(model_dir, config, err)) from None
    _check_state(weights, state, model.state_dict())
    missing, _ = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = sorted(k for k in missing if not k.startswith("qa_outputs."))
    if missing:
        raise CheckpointError(f"{weights}: weights do not match the config (missing: {missing[0]}"
                              + _more(len(missing)) + ")")
    if QA_HEAD not in state:
        logger.info("%s: a pre-trained encoder without a question-answering head; qa_outputs starts from random "
                    "weights", model_dir)
    return model.eval()


def _cannot_build(model_dir: Path, config: PretrainedConfig, err: Exception) -> str:
    """The one line of a ``config.json`` that transformers reads but builds no model from."""
    name = qa_model_class(config.model_type).__name__
    message = " ".join(str(err).split()) or type(err).__name__
    return f"{model_dir / 'config.json'}: {name} cannot be built from it ({type(err).__name__}: {message})"


def _check_loading_info(weights: Path, info: dict[str, Any]) -> None:
    """Refuse a dense model whose weights are not the ones its config describes (another model's weights, or a
    config.json edited or copied from another model): transformers would give the missing or mismatched tensors
    random values, and the model random answers.

    Missing: only the QA head may be (a pre-trained encoder gets a fresh one). Unexpected: a pre-trained checkpoint's
    pooler and pre-training heads are dropped as transformers drops them, but not encoder layers beyond the config's.
    """
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda entry: entry[0])
    if mismatched:
        name, stored, wanted = mismatched[0][:3]
        raise CheckpointError(f"{weights}: weights do not match the config ({name} has shape {tuple(stored)}, the "
                              f"config gives {tuple(wanted)}" + _more(len(mismatched)) + ")")
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith("qa_outputs."))
    if missing:
        raise CheckpointError(f"{weights}: weights do not match the config (missing: {missing[0]}"
                              + _more(len(missing)) + ")")
    extra = sorted(k for k in info.get("unexpected_keys") or [] if _ENCODER_LAYER.search(k))
    if extra:
        raise CheckpointError(f"{weights}: weights do not match the config (unexpected: {extra[0]}"
                              + _more(len(extra)) + ")")


def _more(count: int) -> str:
    return f" and {count - 1} more" if count > 1 else ""


def restore_masks_(model: nn.Module, settings: dict[str, Any], source: str = "config.json") -> None:
    """Wrap ``model``'s linears with masks as recorded in a checkpoint's config (``source``), in place.

    Raises:
        CheckpointError: naming ``source`` and the entry of ``fineprune_masks`` that is not what a checkpoint writes.
    """
    where = f"{source}: {MASKS_KEY}"
    if not isinstance(settings, dict):
        raise CheckpointError(f"{where}: expected an object, got {settings!r}")
    block = settings.get("attention_block", (32, 32))
    if not (isinstance(block, list | tuple) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"{where}.attention_block: invalid value {block!r}")
    mode = settings.get("mode")
    fill_from = settings.get("fill_from")
    if mode not in mask_lib.MODES or (mode == "fixed" and not isinstance(fill_from, dict)):
        raise CheckpointError(f"{where}.mode: invalid value {mode!r}")
    first = fill_from if mode == "fixed" else settings
    if first.get("mode") not in mask_lib.MODES or first.get("mode") == "fixed":
        raise CheckpointError(f"{where}.fill_from.mode: invalid value {first.get('mode')!r}")
    key = "fill_from.threshold" if mode == "fixed" else "threshold"
    try:
        threshold = float(first["threshold"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{where}.{key}: invalid value {first.get('threshold')!r}") from None
    # NaN or infinity masked every weight off without a word (or stopped topk in a traceback); a topk threshold is
    # the density kept.
    if not math.isfinite(threshold) or (first["mode"] == "topk" and not 0 < threshold <= 1):
        expected = "a density in (0, 1]" if first["mode"] == "topk" else "a finite number"
        raise CheckpointError(f"{where}.{key}: invalid value {first.get('threshold')!r}, expected {expected}")
    try:
        mask_lib.apply_masks_(model, "topk" if mode == "topk" else "sigmoid_threshold", tuple(block))
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None
    for _, module in mask_lib.masked_modules(model):
        if first["mode"] == "cutoff":
            module.set_cutoff(threshold)
        else:
            module.mode = first["mode"]
            module.threshold = threshold


def _refix(model: nn.Module, settings: dict[str, Any]) -> None:
    # The filled phase froze the structure the scores gave at the end of pruning; scores do not change afterwards,
    # so the same structure is found again from them.
    report = sparsity_report(model)
    mask_lib.fix_masks_(model, [s.heads_kept for s in report.layers], [s.ffn_kept for s in report.layers])
    fill = settings["fill_from"]
    model.fineprune_fill_from = (fill["mode"], float(fill["threshold"]))


def load_training_state(checkpoint_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(trainer_state.json, optimizer/RNG tensors) of a training checkpoint.

    Raises:
        CheckpointError: a file is missing or unreadable, or the state's ``step`` (an integer >= 0) or ``history``
            (a list of mappings) is not what a training checkpoint writes.
    """
    checkpoint_dir = Path(checkpoint_dir)
    state = read_json(checkpoint_dir / STATE)
    step = state.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise CheckpointError(f"{checkpoint_dir / STATE}: step must be an integer >= 0, got {step!r}")
    for key, kind in (("history", list), ("pruning", dict), ("counters", dict)):
        if not isinstance(state.get(key, kind()), kind):
            raise CheckpointError(f"{checkpoint_dir / STATE}: {key} must be a {'list' if kind is list else 'mapping'}")
    # Each entry is an evaluation's metrics: what the run's final record and a resume at its end read.
    for index, entry in enumerate(state.get("history", [])):
        if not isinstance(entry, dict):
            raise CheckpointError(f"{checkpoint_dir / STATE}: history[{index}] must be a mapping of an evaluation's "
                                  f"metrics, got {type(entry).__name__}")
    tensors = _load_weights(checkpoint_dir / OPTIMIZER)
    return state, tensors


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flatten AdamW's per-parameter state into named tensors (parameters numbered in group order)."""
    out: dict[str, torch.Tensor] = {}
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensor = value if torch.is_tensor(value) else torch.tensor(value)
                out[f"state.{index}.{key}"] = tensor.detach().reshape(tensor.shape).cpu()
            index += 1
    out[_PARAMS] = torch.tensor(index, dtype=torch.int64)
    out["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_initialized():  # dropout on a GPU draws from that device's generator, not the CPU's
        for device, rng in enumerate(torch.cuda.get_rng_state_all()):
            out[f"{_CUDA_RNG}{device}"] = rng
    return out


def _placed(key: str, value: torch.Tensor, param: torch.Tensor, fused: bool) -> torch.Tensor:
    """One entry of a parameter's AdamW state, where the optimizer steps it."""
    if key != "step":
        # In the parameter's dtype too: moments a half-precision model kept step its float32 reload.
        return value.to(param.device, param.dtype)
    # The loop over parameters keeps its step count on the CPU; the fused kernel wants it beside the parameter,
    # in float32.
    return value.to(param.device, torch.float32) if fused else value


def _check_optimizer_tensors(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse, before anything is restored, tensors that are not what :func:`optimizer_tensors` writes (an edited
    or damaged file), which would otherwise fail deep inside torch or AdamW's first step."""
    def kind(value: torch.Tensor) -> str:
        return f"{str(value.dtype).removeprefix('torch.')} of shape {tuple(value.shape)}"

    size = torch.get_rng_state().numel()
    for key, value in tensors.items():
        if key == "rng.torch" or key.startswith(_CUDA_RNG):
            if value.dtype != torch.uint8 or value.ndim != 1 or (key == "rng.torch" and value.numel() != size):
                shape = f"({size},)" if key == "rng.torch" else "(n,)"
                raise CheckpointError(f"{source}: {key} must be a random generator state (uint8 of shape {shape}), "
                                      f"got {kind(value)}")
        elif key == _PARAMS:
            if value.numel() != 1 or value.is_floating_point() or value.is_complex():
                raise CheckpointError(f"{source}: {key} must be one whole number, got {kind(value)}")
        elif key.startswith("state."):
            parts = key.split(".")
            if len(parts) != 3 or not parts[1].isdigit():
                raise CheckpointError(f"{source}: {key}: not a name the optimizer state is written under "
                                      "(state.INDEX.NAME)")
            if parts[2] == "step" and value.numel() != 1:
                raise CheckpointError(f"{source}: {key} must be one number (the parameter's step count), got shape "
                                      f"{tuple(value.shape)}")


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      source: str = "checkpoint") -> None:
    """Put the state of :func:`optimizer_tensors` (read back from ``source``) into ``optimizer``, and the RNG states.

    Raises:
        CheckpointError: the state was written for another list of trained parameters (another number of them, or
            a moment whose shape is not its parameter's), which would give each parameter another's moments.
    """
    _check_optimizer_tensors(tensors, source)
    fused = bool(optimizer.defaults.get("fused"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    indices = {int(k.split(".")[1]) for k in tensors if k.startswith("state.")}
    count = int(tensors[_PARAMS]) if _PARAMS in tensors else max(indices, default=-1) + 1
    if count > len(params) or (_PARAMS in tensors and count != len(params)):
        raise CheckpointError(f"{source}: optimizer state for {count} trained parameters, but this run trains "
                              f"{len(params)} (the run config decides which parameters train)")
    staged: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    for index, p in enumerate(params):
        prefix = f"state.{index}."
        entries = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        for key, value in entries.items():
            if key != "step" and tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"{source}: optimizer state {prefix}{key} has shape {tuple(value.shape)}, but "
                                      f"trained parameter {index} has shape {tuple(p.shape)}")
        if entries:
            staged[p] = {k: _placed(k, v, p, fused) for k, v in entries.items()}
    optimizer.state.update(staged)
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    _restore_cuda_rng(tensors, params[0].device if params else torch.device("cpu"), source)


def _restore_cuda_rng(tensors: dict[str, torch.Tensor], device: torch.device, source: str) -> None:
    """Put back the CUDA generator states of :func:`optimizer_tensors` on the devices this machine has, and say in
    one line when the run, training on ``device``, cannot continue the dropout draws of the run that wrote them (a
    GPU run resumed on the CPU or on a machine without that GPU, a CPU run resumed on a GPU)."""
    saved = sorted(int(k[len(_CUDA_RNG):]) for k in tensors
                   if k.startswith(_CUDA_RNG) and k[len(_CUDA_RNG):].isdigit())
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in saved:
        if index < present:
            torch.cuda.set_rng_state(tensors[f"{_CUDA_RNG}{index}"], index)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if index not in saved:
            written = f"on a machine with {len(saved)} GPU(s)" if saved else "by a run on the CPU"
            logger.warning("%s: holds no generator state of cuda:%d (written %s): dropout after the resume draws "
                           "other numbers than the uninterrupted run would", source, index, written)
    elif saved:
        logger.warning("%s: written by a run on a GPU, resumed on the %s: dropout after the resume draws other "
                       "numbers than the uninterrupted run would", source, device.type.upper())
