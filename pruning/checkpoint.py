"""Model directories and training checkpoints: safetensors, JSON and tokenizer files; never pickles.

A checkpoint is a standard Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files). A masked
model's ``config.json`` carries a ``fineprune_masks`` entry (method, block shape, current threshold, phase) and its
``model.safetensors`` holds the mask scores beside the weights. A model a training run wrote (its checkpoint and
final model) records in ``config.json`` under ``fineprune_evaluation`` the windows and span search it was evaluated
with (:data:`pruning.config.EVALUATION_KEYS`) and the precision of its evaluations (``precision``: ``fp32`` or
``bf16``); the entry is part of the model's config, so packing and export carry it on, and
:func:`read_evaluation` and :func:`read_precision` read it back. A training checkpoint adds ``trainer_state.json``
and ``optimizer.safetensors`` (optimizer moments and the RNG states of the CPU and of any CUDA device in use), so
a run resumes at the same step with the same masks and dropout draws; ``trainer_state.json`` records the run config
and where the run stands in its training windows (``data_position``). :func:`load_model` opens any of them: a dense
HF QA model of a type in :mod:`pruning.structure` (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA), a masked
checkpoint or a packed directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from . import masks as mask_lib
from .atomic import save_tensors, staged_dir
from .config import EVALUATION_KEYS, parser_limit
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
    "read_precision",
    "save_model",
    "load_model",
    "load_config",
    "load_tokenizer",
    "tokenizer_misfit",
    "check_tokenizer_fits",
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


# tokenizer.json's BertNormalizer fields, by the tokenizer_config.json keys a BERT-family tokenizer is built from.
_NORMALIZER_KEYS = {"do_lower_case": ("lowercase", True), "strip_accents": ("strip_accents", None),
                    "tokenize_chinese_chars": ("handle_chinese_chars", True)}


# tokenizer_config.json keys transformers hands to the normalizer as they are: anything but a boolean (or null, for
# strip_accents) fails there with a traceback.
_BOOLEAN_SETTINGS = {"do_lower_case": False, "tokenize_chinese_chars": False, "strip_accents": True}


def _tokenizer_file(path: Path) -> dict[str, Any] | None:
    """The JSON object of the tokenizer file ``path``, None when there is no such file.

    Raises:
        CheckpointError: the file is not a JSON object, or (``tokenizer_config.json``) holds a casing or accent
            setting that is not a boolean, naming the file and the key.
    """
    if not path.is_file():
        return None
    value = read_json(path)
    if path.name == "tokenizer_config.json":
        for key, nullable in _BOOLEAN_SETTINGS.items():
            if key in value and not (isinstance(value[key], bool) or (nullable and value[key] is None)):
                raise CheckpointError(f"{path}: {key} must be true or false, got {value[key]!r}")
    return value


def _normalizer_settings(given: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """The casing, accent and Chinese-character settings of the BERT normalizer ``tokenizer.json`` records
    (``recorded``), those ``tokenizer_config.json`` (``given``) does not give.

    transformers builds a BERT-family tokenizer's normalizer from ``tokenizer_config.json``'s settings, and from its
    class's defaults (lower case, accents stripped) where that file does not give them, not from ``tokenizer.json``'s
    own normalizer: a cased ``tokenizer.json`` saved on its own would be read as an uncased one.
    """
    normalizer = recorded.get("normalizer")
    if not isinstance(normalizer, dict) or normalizer.get("type") != "BertNormalizer":
        return {}
    return {key: normalizer.get(field, default) for key, (field, default) in _NORMALIZER_KEYS.items()
            if key not in given}


def _unknown_token_setting(named: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
    """The unknown token of the WordPiece model ``tokenizer.json`` records, where no other tokenizer file names one
    (``named``: the ``unk_token`` of each, None where it gives none).

    transformers builds a BERT-family tokenizer's WordPiece model with the unknown token those files name, and
    "[UNK]" where none does, not with ``tokenizer.json``'s own: a vocabulary whose unknown token is "<unk>" saved
    on its own would fail at its first unknown word.
    """
    model = recorded.get("model")
    if any(value is not None for value in named.values()) or not isinstance(model, dict):
        return {}
    unknown = model.get("unk_token")
    return {"unk_token": unknown} if model.get("type") == "WordPiece" and isinstance(unknown, str) else {}


def _check_unknown_token(model_dir: Path, tokenizer: PreTrainedTokenizerBase, named: dict[str, Any],
                         recorded: dict[str, Any]) -> None:
    """Refuse a WordPiece tokenizer whose unknown token is not in its vocabulary (named by ``tokenizer_config.json``
    or ``special_tokens_map.json``, or transformers' "[UNK]" where no file names one), naming the file that gave
    it: every word outside the vocabulary would stop a run with the tokenizers library's traceback.

    Raises:
        CheckpointError: as above.
    """
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if type(model).__name__ != "WordPiece" or model.token_to_id(model.unk_token) is not None:
        return
    vocabulary = "tokenizer.json" if recorded else "vocab.txt"
    recorded_model = recorded.get("model")
    own = recorded_model.get("unk_token") if isinstance(recorded_model, dict) else None
    hint = f" (its own is {own!r})" if isinstance(own, str) and model.token_to_id(own) is not None else ""
    for name, value in named.items():
        value = value.get("content") if isinstance(value, dict) else value
        if value == model.unk_token:
            raise CheckpointError(f"{model_dir / name}: unk_token {value!r} is not in the vocabulary of "
                                  f"{vocabulary}{hint}")
    raise CheckpointError(f"{model_dir / vocabulary}: the vocabulary has no unknown token {model.unk_token!r} "
                          "(transformers' default where no file names one): give yours as unk_token in "
                          "tokenizer_config.json")


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_dir``, one that makes question-answering windows.

    Raises:
        CheckpointError: a tokenizer file is not a JSON object, or ``tokenizer_config.json`` gives ``do_lower_case``,
            ``strip_accents`` or ``tokenize_chinese_chars`` a value that is not a boolean (naming the file and key);
            no tokenizer loads from the directory (or only the vocabulary-less one transformers builds
            from a config.json without tokenizer files), or the one that loads lacks what the windows need:
            character offsets (a fast tokenizer), a pad token, and a CLS token first in a question-context pair
            (the position of "no answer"). A bare ``tokenizers`` file (``tokenizer.json`` written by
            ``Tokenizer.save``) has neither special tokens nor a pair template: it must be saved through its
            model's tokenizer class (e.g. ``RobertaTokenizerFast(tokenizer_object=...).save_pretrained(dir)``).
            A ``tokenizer.json`` the tokenizers library refuses (a field of the wrong type) is named with its error.
            A WordPiece vocabulary without the unknown token the files name (or transformers' "[UNK]" where none
            does) is refused naming the file that gave it.

    A BERT-family ``tokenizer.json`` keeps its own normalizer (cased or not, accents kept or stripped, of another
    kind or none) where ``tokenizer_config.json`` does not say otherwise, its own pre-tokenizer, WordPiece settings
    (subword prefix, longest word), decoder and post-processor, and its own unknown token where no other file names
    one. A RoBERTa-family ``tokenizer.json`` keeps its model settings (a Unigram model's ``unk_id`` and
    ``byte_fallback``, a BPE model's all but ``dropout``), its normalizer, pre-tokenizer, decoder and
    post-processor, with the ``add_prefix_space`` and ``trim_offsets`` of ``tokenizer_config.json`` applied where it
    gives them.
    """
    directory = Path(model_dir)
    given = _tokenizer_file(directory / "tokenizer_config.json") or {}  # each file read once, here
    recorded = _tokenizer_file(directory / "tokenizer.json") or {}
    special_map = _tokenizer_file(directory / "special_tokens_map.json") or {}
    named = {"tokenizer_config.json": given.get("unk_token"), "special_tokens_map.json": special_map.get("unk_token")}
    settings = {**_normalizer_settings(given, recorded), **_unknown_token_setting(named, recorded)}
    # What the tokenizers library refuses in tokenizer.json (a word limit written "100") is said here, in one line,
    # rather than in transformers' traceback.
    own = _recorded_pipeline(directory / "tokenizer.json", recorded) if recorded else None
    tokenizer = _auto_tokenizer(directory, recorded, settings)
    if (type(tokenizer).__name__ == "CamembertTokenizer" and recorded
            and not any(key in files for key in _EXTRA_TOKEN_KEYS for files in (given, special_map))):
        # transformers' CamemBERT class adds its default extra tokens where tokenizer.json lacks them: tokens past
        # the vocabulary (and the model's embeddings), which make len(tokenizer) larger than both.
        kept = [token for token in _CAMEMBERT_TOKENS
                if (index := tokenizer.convert_tokens_to_ids(token)) is not None and index < tokenizer.vocab_size]
        if len(kept) < len(_CAMEMBERT_TOKENS):
            tokenizer = _auto_tokenizer(directory, recorded, {**settings, "additional_special_tokens": kept})
    kept_post_processor = _keep_recorded_pipeline(directory, tokenizer, given, recorded, own)
    _keep_recorded_family_model(tokenizer, recorded, own)
    if _keep_recorded_family_pipeline(directory, tokenizer, given, recorded, own):
        kept_post_processor = True
    _check_unknown_token(directory, tokenizer, named, recorded)
    special = set(tokenizer.all_special_tokens)
    # The vocabulary is listed only where its own part is no larger than the special tokens (listing it is slow).
    if tokenizer.vocab_size <= len(special) and set(vocabulary := tokenizer.get_vocab()) <= special:
        # What transformers builds from config.json alone: every word would be the unknown token.
        raise CheckpointError(f"{model_dir}: no tokenizer files (what loads from config.json alone holds only its "
                              f"{len(vocabulary)} special tokens)")
    problem = None
    if not getattr(tokenizer, "is_fast", False):
        problem = "is not a fast tokenizer (the windows need character offsets)"
    elif tokenizer.pad_token_id is None:
        problem = "has no pad token"
    elif tokenizer.cls_token_id is None or (first := tokenizer("q", "c")["input_ids"][:1]) != [tokenizer.cls_token_id]:
        problem = "does not put a CLS token first in a question-context pair"
        if kept_post_processor and tokenizer.cls_token_id is not None:
            raise CheckpointError(f"{directory / 'tokenizer.json'}: its post_processor puts "
                                  f"{tokenizer.convert_ids_to_tokens(first[0])!r} first in a question-context pair, "
                                  f"not the CLS token {tokenizer.cls_token!r}, whose position the windows read as "
                                  "\"no answer\" (where that token is the model's CLS token, give it as cls_token in "
                                  "tokenizer_config.json)")
    if problem is not None:
        raise CheckpointError(f"{model_dir}: the tokenizer ({type(tokenizer).__name__}) {problem}: save it with "
                              "its model's tokenizer class (e.g. RobertaTokenizerFast) and save_pretrained")
    _warn_unreachable_vocabulary(directory, tokenizer, special, given, recorded)
    return tokenizer


def tokenizer_misfit(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
                     named: str = "the tokenizer") -> str | None:
    """Why a model of ``config`` cannot embed the windows ``tokenizer`` makes (every forward would fail with an index
    error inside an embedding), or None where it can: token ids past its word embeddings (``vocab_size``), or a
    context token type past its token-type embeddings (``type_vocab_size``, 1 in the RoBERTa family). ``named``:
    the tokenizer, as the message calls it."""
    size = int(getattr(config, "vocab_size", 0) or 0)
    if size and size < len(tokenizer):
        return f"vocab_size {size} is smaller than {named}'s {len(tokenizer)} tokens"
    types = tokenizer("q", "c", return_token_type_ids=True).get("token_type_ids") or [0]
    limit = int(getattr(config, "type_vocab_size", 0) or 0)
    if limit and max(types) >= limit:
        return f"type_vocab_size {limit}, but {named} gives the context token type {max(types)}"
    return None


def check_tokenizer_fits(model_dir: str | Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a model directory whose tokenizer makes ids its model cannot embed (see :func:`tokenizer_misfit`).

    Raises:
        CheckpointError: naming the directory's ``config.json`` and the field.
    """
    if (misfit := tokenizer_misfit(config, tokenizer)) is not None:
        raise CheckpointError(f"{Path(model_dir) / 'config.json'}: {misfit}: the model and the tokenizer files "
                              "beside it do not belong together (save the model with its own tokenizer)")


# The extra special tokens transformers' CamemBERT class adds where no tokenizer file names any.
_CAMEMBERT_TOKENS = ("<s>NOTUSED", "</s>NOTUSED", "<unk>NOTUSED")
_EXTRA_TOKEN_KEYS = ("additional_special_tokens", "extra_special_tokens")


def _auto_tokenizer(directory: Path, recorded: dict[str, Any], settings: dict[str, Any]) -> PreTrainedTokenizerBase:
    """The tokenizer transformers loads from ``directory`` with ``settings``.

    Raises:
        CheckpointError: no tokenizer loads from the directory, or the tokenizers library refuses a part of
            ``tokenizer.json`` (``recorded``) that :func:`_recorded_pipeline` did not read (a Unigram vocabulary
            entry past the unknown token), naming it.
    """
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **settings)
    except (OSError, ValueError, TypeError, AttributeError) as err:  # the last two: files of an unexpected shape
        raise CheckpointError(f"{directory}: no usable tokenizer files ({str(err).splitlines()[0]})") from None
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        if type(err) is not Exception or not recorded:
            raise
        _recorded_pipeline(directory / "tokenizer.json", recorded, whole=True)  # names the file and the part
        raise


def _keep_recorded_pipeline(model_dir: Path, tokenizer: PreTrainedTokenizerBase, given: dict[str, Any],
                            recorded: dict[str, Any], own: Any = None) -> bool:
    """Put back the normalizer, pre-tokenizer, WordPiece settings, decoder and post-processor ``tokenizer.json``
    (``recorded``; ``own``: the pipeline :func:`_recorded_pipeline` built from it, if any) records where
    transformers replaced them with BERT's; True where its post-processor is kept.

    transformers builds a BERT-family tokenizer's pipeline from its class, not from ``tokenizer.json``:

    * its ``BertPreTokenizer`` splits words at whitespace and at every punctuation character, so a tokenizer saved
      with another pre-tokenizer (``WhitespaceSplit``, for a vocabulary holding "it's" or "cat.") would cut text into
      other words than the ones its vocabulary was made from;
    * its ``BertNormalizer`` comes from ``tokenizer_config.json``'s settings (``given``) and the class's defaults
      (lower case, accents stripped): a normalizer of another kind (``Sequence([NFD, StripAccents])``, which keeps
      the case, or none at all) is kept where ``tokenizer_config.json`` gives none of those settings (where it gives
      one, it decides, as in transformers; a ``BertNormalizer`` of the file is kept by :func:`_normalizer_settings`);
    * its WordPiece model marks word pieces with ``##`` and reads a word of more than 100 characters as the unknown
      token, whatever the file's ``continuing_subword_prefix`` and ``max_input_chars_per_word``: a vocabulary whose
      pieces start with another prefix ("@@ing") would cut words into other pieces, most of them unknown;
    * its decoder is BERT's ``WordPiece(prefix="##")``, whatever ``tokenizer.json``'s;
    * its post-processor wraps a question-context pair as ``[CLS] A [SEP] B [SEP]`` with type ids 0 then 1,
      whatever the file's template (type ids all 0, for a model of one token type; two [SEP] between the texts;
      other special tokens or ids).

    Only BERT's parts are replaced here; :func:`_keep_recorded_family_pipeline` puts back those of the RoBERTa
    family.
    """
    path = model_dir / "tokenizer.json"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre_tokenizer = recorded.get("pre_tokenizer")
    keep_pre_tokenizer = (isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") != "BertPreTokenizer"
                          and type(getattr(backend, "pre_tokenizer", None)).__name__ == "BertPreTokenizer")
    kept_post_processor = _keep_recorded_model_parts(tokenizer, recorded, own)
    normalizer = recorded.get("normalizer", "absent")
    other_normalizer = normalizer is None or isinstance(normalizer, dict) and normalizer.get("type") != "BertNormalizer"
    keep_normalizer = (other_normalizer and type(getattr(backend, "normalizer", None)).__name__ == "BertNormalizer"
                       and not any(key in given for key in _NORMALIZER_KEYS))
    if not (keep_pre_tokenizer or keep_normalizer):
        return kept_post_processor
    own = own or _recorded_pipeline(path, recorded)
    if keep_pre_tokenizer:
        backend.pre_tokenizer = own.pre_tokenizer
    if keep_normalizer:
        backend.normalizer = own.normalizer
        # The class's settings describe the normalizer replaced: saved in tokenizer_config.json beside a run's model,
        # they would decide when it is read again.
        for key in _NORMALIZER_KEYS:
            tokenizer.init_kwargs.pop(key, None)
    return kept_post_processor


def _keep_recorded_model_parts(tokenizer: PreTrainedTokenizerBase, recorded: dict[str, Any], own: Any) -> bool:
    """Put back the WordPiece settings (subword prefix, longest word), decoder and post-processor of
    ``tokenizer.json`` (``recorded``, built as ``own``) where transformers rebuilt them as BERT's; the settings a run
    saves with its model are then the file's too. A file without a post-processor keeps BERT's ``[CLS] A [SEP] B
    [SEP]``, which the windows need. True where the file's post-processor is kept."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if own is None or type(model).__name__ != "WordPiece" or type(own.model).__name__ != "WordPiece":
        return False
    _copy_settings(own.model, model, ("continuing_subword_prefix", "max_input_chars_per_word"))
    if "decoder" in recorded:
        backend.decoder = own.decoder
    if isinstance(recorded.get("post_processor"), dict):
        backend.post_processor = own.post_processor
        return True
    return False


def _copy_settings(source: Any, target: Any, names: tuple[str, ...]) -> None:
    """Set each setting ``names`` of the tokenizers model ``target`` (the backend's own, changed in place) to
    ``source``'s where they differ."""
    for name in names:
        if getattr(target, name) != getattr(source, name):
            setattr(target, name, getattr(source, name))


# transformers' RoBERTa-family tokenizer classes, which build their model from the vocabulary of tokenizer.json and
# their own defaults.
_FAMILY = ("RobertaTokenizer", "XLMRobertaTokenizer", "CamembertTokenizer")
# The settings of a BPE model beside its vocabulary and merges (dropout aside: windows read the same every time).
_BPE_SETTINGS = ("unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback",
                 "ignore_merges")
# A character no vocabulary holds, whose token shows which id a Unigram model gives an unknown character.
_PROBE = "\U0010fffd"


def _keep_recorded_family_model(tokenizer: PreTrainedTokenizerBase, recorded: dict[str, Any], own: Any) -> None:
    """Put back the model settings of ``tokenizer.json`` (``recorded``, built as ``own``) where a RoBERTa-family
    class rebuilt its model with its own.

    transformers' XLM-RoBERTa class gives a Unigram model the unknown id 3 (CamemBERT's: its unknown token's id) and no
    byte fallback, whatever the file's ``unk_id`` and ``byte_fallback``: a vocabulary whose unknown token is at
    id 0 read every character outside it as the token at id 3 (``</s>`` in a context), and one with byte fallback
    read such a character as the unknown token rather than its bytes. Its RoBERTa class gives a BPE model no unknown
    token, subword prefix or word suffix, fuse_unk, byte fallback or ignore_merges, whatever the file's.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = recorded.get("model")
    if type(tokenizer).__name__ not in _FAMILY or own is None or not isinstance(model, dict):
        return
    kind = type(backend.model).__name__
    if kind == "BPE" and type(own.model).__name__ == "BPE":
        _copy_settings(own.model, backend.model, _BPE_SETTINGS)
        return
    unknown, fallback = model.get("unk_id"), model.get("byte_fallback") is True
    if kind != "Unigram" or model.get("type") != "Unigram" or unknown is None:
        return
    if not fallback and backend.model.token_to_id(_PROBE) is None and [
            token.id for token in backend.model.tokenize(_PROBE)] == [unknown]:
        return  # transformers' model reads an unknown character as the file's does
    from tokenizers import models

    backend.model = models.Unigram([tuple(entry) for entry in model["vocab"]], unknown, fallback)


# The tokenizer_config.json settings from which transformers builds a RoBERTa-family pipeline.
_FAMILY_SETTINGS = ("add_prefix_space", "trim_offsets")


def _keep_recorded_family_pipeline(model_dir: Path, tokenizer: PreTrainedTokenizerBase, given: dict[str, Any],
                                   recorded: dict[str, Any], own: Any) -> bool:
    """Put back the normalizer, pre-tokenizer, decoder and post-processor of ``tokenizer.json`` (``recorded``, built
    as ``own``) where a RoBERTa-family class rebuilt them with its own; True where its post-processor is kept.

    transformers' RoBERTa, XLM-RoBERTa and CamemBERT classes build their pipeline from ``tokenizer_config.json``'s
    ``add_prefix_space`` and ``trim_offsets`` (``given``) and their defaults, not from ``tokenizer.json``: no
    normalizer (a lower-casing one dropped: "Paris" read as other tokens than "paris"), a ``ByteLevel`` or
    ``WhitespaceSplit`` + ``Metaspace`` pre-tokenizer without the file's prefix space, and RoBERTa's
    ``RobertaProcessing`` (offsets trimmed of their spaces, whatever the file's ``trim_offsets``) or XLM-R's
    ``<s> A </s></s> B </s>`` in place of the file's template. The file's parts are kept, with the
    ``add_prefix_space`` and ``trim_offsets`` that ``tokenizer_config.json`` gives applied to them, as
    transformers 4 did; the class's defaults for those two are dropped from the settings a run saves with its
    model, which would otherwise decide when it is read again.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(tokenizer).__name__ not in _FAMILY or own is None or backend is None:
        return False
    settings = {key: given[key] for key in _FAMILY_SETTINGS if isinstance(given.get(key), bool)}
    if settings:
        parts = {part: _with_settings(recorded.get(part), settings, part == "post_processor")
                 for part in ("pre_tokenizer", "decoder", "post_processor")}
        own = _recorded_pipeline(model_dir / "tokenizer.json", {**recorded, **parts})
    if "normalizer" in recorded:
        backend.normalizer = own.normalizer
    if "pre_tokenizer" in recorded:
        backend.pre_tokenizer = own.pre_tokenizer
    if "decoder" in recorded:
        backend.decoder = own.decoder
    for key in _FAMILY_SETTINGS:
        if key not in settings:
            tokenizer.init_kwargs.pop(key, None)
    if not isinstance(recorded.get("post_processor"), dict):
        return False  # the class's, which the windows need
    backend.post_processor = own.post_processor
    return True


def _with_settings(part: Any, settings: dict[str, bool], post_processor: bool) -> Any:
    """A copy of the JSON of a pipeline part (and of the parts of a ``Sequence``) with ``tokenizer_config.json``'s
    ``add_prefix_space`` and, in a post-processor, ``trim_offsets`` (``settings``) applied where it has them."""
    if isinstance(part, list):
        return [_with_settings(item, settings, post_processor) for item in part]
    if not isinstance(part, dict):
        return part
    part = {key: _with_settings(value, settings, post_processor) if isinstance(value, list) else value
            for key, value in part.items()}
    if part.get("type") in ("ByteLevel", "RobertaProcessing"):
        part.update({key: value for key, value in settings.items()
                     if key == "add_prefix_space" or post_processor})
    elif part.get("type") == "Metaspace" and "add_prefix_space" in settings:
        part["prepend_scheme"] = "always" if settings["add_prefix_space"] else "never"
    return part


def _recorded_pipeline(path: Path, recorded: dict[str, Any], whole: bool = False) -> Any:
    """The ``tokenizers.Tokenizer`` that ``tokenizer.json`` (``path``, read as ``recorded``) describes, built
    without its vocabulary where its model allows (as transformers does): its normalizer, pre-tokenizer, model
    settings, post-processor and decoder, without parsing the file again. A Unigram model keeps the first entries of
    its vocabulary, up to its unknown token's, the least it is read with. With ``whole``, or where the vocabulary
    cannot be left out, the whole file is parsed.

    Raises:
        CheckpointError: the tokenizers library refuses the file, naming it and the part refused.
    """
    from tokenizers import Tokenizer

    model = recorded.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    unknown = model.get("unk_id") if kind == "Unigram" else None
    small = not whole and (kind in ("WordPiece", "BPE", "WordLevel") or (
        isinstance(unknown, int) and not isinstance(unknown, bool) and unknown >= 0
        and isinstance(model.get("vocab"), list)))
    if small:
        if kind == "Unigram":
            empty = {"vocab": model["vocab"][:unknown + 1]}
        else:
            empty = {"vocab": {}, **({"merges": []} if kind == "BPE" else {})}
        recorded = {**recorded, "model": {**model, **empty}, "added_tokens": []}
    try:
        return Tokenizer.from_str(json.dumps(recorded)) if small else Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - the Rust parser's own error type
        error = str(err).splitlines()[0]
    if small:  # a line and column of the text rebuilt here, not of the file
        error = re.sub(r" at line \d+ column \d+$", "", error)
    for part in _PARTS:  # the part refused: the one without which the rest is read
        try:
            Tokenizer.from_str(json.dumps({**recorded, part: None}))
        except Exception:  # noqa: BLE001
            continue
        error = f"{part}: {error}"
        break
    else:
        error = f"model: {error}"
    raise CheckpointError(f"{path}: not a tokenizer file ({error})")


# The parts of tokenizer.json besides its model, any of which may be null.
_PARTS = ("normalizer", "pre_tokenizer", "post_processor", "decoder", "truncation", "padding")


# A token BERT's normalizer leaves as it is, whatever its settings: printable ASCII without spaces or capitals.
# Only the others need normalizing to see whether the tokenizer can produce them (most of an English vocabulary
# is of this kind); where it does not lower-case, capitals are left as they are too.
_PLAIN = re.compile(r"[!-@\[-~]+")
_PLAIN_CASED = re.compile(r"[!-~]+")
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # a byte piece (byte fallback), not text


def _warn_unreachable_vocabulary(model_dir: Path, tokenizer: PreTrainedTokenizerBase, special: set[str],
                                 given: dict[str, Any], recorded: dict[str, Any]) -> None:
    """One warning for a vocabulary whose tokens hold capitals or accents that the tokenizer, lower-casing or
    stripping accents, never produces: a cased vocabulary read as an uncased one, whose cased words all become other
    tokens. Whatever gave the settings is named: ``tokenizer_config.json``, ``tokenizer.json``'s normalizer, or
    transformers' defaults where no file gives them (a bare ``vocab.txt``, a ``tokenizer_config.json`` that gives
    ``strip_accents`` but not ``do_lower_case``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    if normalizer is None or "ByteLevel(" in repr(backend.pre_tokenizer):
        return  # a byte-level vocabulary holds bytes shown as characters ("Ã" for 0xC3), not normalized text
    plain = None
    if type(normalizer).__name__ == "BertNormalizer":
        plain = (_PLAIN if normalizer.lowercase else _PLAIN_CASED).fullmatch
    prefix = getattr(tokenizer.backend_tokenizer.model, "continuing_subword_prefix", None) or "##"
    pieces = [token.removeprefix(prefix) for token in tokenizer.get_vocab() if token not in special
              and not _BYTE_PIECE.fullmatch(token)]
    unreachable = [piece for piece in pieces if piece and not (plain and plain(piece))
                   and normalizer.normalize_str(piece).strip() != piece]
    if not unreachable:
        return
    vocabulary = model_dir / ("vocab.txt" if (model_dir / "vocab.txt").is_file() else "tokenizer.json")
    logger.warning("%s: %d of its %d tokens (e.g. %r) hold capitals or accents, which the tokenizer never produces: "
                   "%s", vocabulary, len(unreachable), len(pieces), unreachable[0],
                   _normalizing(normalizer, given, recorded))


def _normalizing(normalizer: Any, given: dict[str, Any], recorded: dict[str, Any]) -> str:
    """What the tokenizer's normalizer does to a cased vocabulary, which file (or default) says so, and the
    ``tokenizer_config.json`` settings that keep the vocabulary's capitals and accents."""
    if type(normalizer).__name__ != "BertNormalizer":
        return f"its normalizer ({type(normalizer).__name__}, in tokenizer.json) changes them"
    normalizer_recorded = recorded.get("normalizer")
    in_file = isinstance(normalizer_recorded, dict) and normalizer_recorded.get("type") == "BertNormalizer"

    def origin(key: str) -> str:
        if key in given:
            return "in tokenizer_config.json"
        if in_file:
            return "from tokenizer.json's normalizer"
        return "by default: no tokenizer file gives it"

    lower = bool(normalizer.lowercase)
    strip = normalizer.strip_accents
    done, keys = [], []
    if lower:
        done.append(f"lower-cases (do_lower_case true, {origin('do_lower_case')})")
        keys.append('"do_lower_case": false')
    if strip or (strip is None and lower):
        follows = ", which follows do_lower_case" if strip is None else ""
        done.append(f"strips accents (strip_accents {json.dumps(strip)}{follows}, {origin('strip_accents')})")
        if strip:
            keys.append('"strip_accents": false')
    if not done:
        return "its normalizer changes them"
    return (f"it {' and '.join(done)}; for a cased vocabulary set {', '.join(keys)} in tokenizer_config.json "
            "(or save the tokenizer with save_pretrained)")


def _config(model_dir: Path) -> tuple[dict[str, Any], PretrainedConfig]:
    config_file = model_dir / "config.json"
    raw = read_json(config_file)
    model_type = raw.get("model_type", DEFAULT_MODEL_TYPE)
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not supported "
                              f"({', '.join(sorted(ARCHITECTURES))})")
    # auto_map names code files of this directory (a hub model's own classes): the model is built here with the
    # stock class of its model_type, and a directory written from it carries none of them.
    clean = {k: v for k, v in raw.items() if k not in (MASKS_KEY, AUTO_MAP)}
    try:
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


def load_model(model_dir: str | Path, qa_head: bool = False) -> nn.Module:
    """Open a dense, masked or packed QA model directory, in eval mode on the CPU, in float32.

    Weights stored in half precision (a config.json with ``dtype: bfloat16``, say) are widened: parameters, mask
    scores and optimizer state are float32, whatever the run's ``precision`` autocasts.

    A dense directory without a QA head (a pre-trained encoder) gets a freshly initialised ``qa_outputs`` (the
    start of a fine-tune), unless ``qa_head`` asks for a model that answers questions as it is (a teacher, a model
    to evaluate, pack or export): then it is an error.

    Raises:
        CheckpointError: the directory, its config or its weights are missing or corrupted, or (with ``qa_head``)
            the weights hold no QA head.
    """
    model_dir = Path(model_dir)
    if model_dir.is_file():  # its config.json or weights file, say: as resolve_model says it
        raise CheckpointError(f"{model_dir}: is a file; a model directory is expected")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory not found")
    weights_there = any((model_dir / name).is_file() for name in (WEIGHTS, WEIGHTS_INDEX_NAME))
    if (model_dir / EXPORT_MANIFEST).is_file() and not weights_there:
        raise CheckpointError(f"{model_dir}: is an ONNX export ({EXPORT_MANIFEST}), which eval, ask and serving run; "
                              "give the PyTorch model directory it was exported from")
    raw, config = _config(model_dir)
    if raw.get(PACKED_FLAG):
        return load_packed(model_dir).float()
    settings = raw.get(MASKS_KEY)
    if settings is None:
        with _weights_errors():  # a clear error for a missing or corrupted file before transformers reads it
            weights, stored = weight_dtypes(model_dir)
        if qa_head and not any(name.endswith(QA_HEAD) for name in stored):
            raise CheckpointError(f"{model_dir}: not a question-answering model ({weights.name} has no {QA_HEAD}: a "
                                  "pre-trained encoder, whose answers would come from a random head); fine-tune it "
                                  "with `fineprune train` first")
        try:
            # Mismatched shapes come back in the loading info (checked below) rather than as an error that points
            # at a table in the log; so does all that transformers' table of the loading (its "LOAD REPORT") would
            # say, and the expected differences (a fresh QA head, a pooler dropped) need no table of a dozen lines.
            with quiet_transformers(), leaving_out("transformers.modeling_utils", lambda m: "LOAD REPORT" in m):
                model, info = qa_model_class(config.model_type).from_pretrained(
                    str(model_dir), local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True,
                    dtype=torch.float32, use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{model_dir}: cannot load model ({str(err).splitlines()[0]})") from None
        except Exception as err:  # the modules check their config values (an activation's name, say) as they build
            raise CheckpointError(_cannot_build(model_dir, config, err)) from None
        _check_loading_info(weights, info)
        if info.get("missing_keys"):  # only the QA head may be missing: a pre-trained encoder
            logger.info("%s: a pre-trained encoder without a question-answering head; qa_outputs starts from random "
                        "weights", model_dir)
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
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{weights}: weights do not match the config ({name} has shape "
                                  f"{tuple(tensor.shape)}, the config gives {tuple(expected[name].shape)})")
    with _weights_errors():
        check_kinds(weights, {name: tensor.dtype for name, tensor in state.items()}, expected)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        names = (missing or unexpected)[:3]
        raise CheckpointError(f"{weights}: weights do not match the config "
                              f"({'missing' if missing else 'unexpected'}: {', '.join(names)})")
    if settings.get("mode") == "fixed":
        _refix(model, settings)
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
    try:
        threshold = float(first["threshold"])
    except (KeyError, TypeError, ValueError):
        key = "fill_from.threshold" if mode == "fixed" else "threshold"
        raise CheckpointError(f"{where}.{key}: invalid value {first.get('threshold')!r}") from None
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
            (a list) is not what a training checkpoint writes.
    """
    checkpoint_dir = Path(checkpoint_dir)
    state = read_json(checkpoint_dir / STATE)
    step = state.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise CheckpointError(f"{checkpoint_dir / STATE}: step must be an integer >= 0, got {step!r}")
    for key, kind in (("history", list), ("pruning", dict), ("counters", dict)):
        if not isinstance(state.get(key, kind()), kind):
            raise CheckpointError(f"{checkpoint_dir / STATE}: {key} must be a {'list' if kind is list else 'mapping'}")
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
