"""A model directory's tokenizer, loaded to split text as the model was trained on it.

transformers builds a tokenizer from ``tokenizer_config.json`` and can lose what ``tokenizer.json`` records (a cased
normalizer, a WordPiece prefix, a Unigram model's unknown id, a RoBERTa-family pipeline): :func:`load_tokenizer`
keeps the pipeline ``tokenizer.json`` records where ``tokenizer_config.json`` does not say otherwise, and refuses in
one line a tokenizer that cannot make question-answering windows. :func:`tokenizer_misfit` and
:func:`check_tokenizer_fits` tell whether a tokenizer's ids fit a model's embeddings.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .checkpoint import CheckpointError, read_json
from .errors import error_line

__all__ = ["load_tokenizer", "tokenizer_misfit", "check_tokenizer_fits", "check_tokenizer_ids"]

logger = logging.getLogger(__name__)


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
            setting that is not a boolean or a ``model_max_length`` that is not a number, naming the file and the
            key.
    """
    if not path.is_file():
        return None
    value = read_json(path)
    if path.name == "tokenizer_config.json":
        for key, nullable in _BOOLEAN_SETTINGS.items():
            if key in value and not (isinstance(value[key], bool) or (nullable and value[key] is None)):
                raise CheckpointError(f"{path}: {key} must be true or false, got {value[key]!r}")
        # transformers compares it with text lengths: anything but a number stops a command in a traceback.
        length = value.get("model_max_length")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int | float)):
            raise CheckpointError(f"{path}: model_max_length must be a number, got {length!r}")
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
    # The windows are question first, context second, padded after their tokens and cut from the context's end
    # (each next one doc_stride tokens before the last ended): whatever sides tokenizer_config.json gives for
    # padding and truncation (a left padding side stopped every command; a left truncation side cut each window
    # from the context's end and scored other windows than documented).
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
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


def check_tokenizer_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer whose ids ``model`` cannot embed (another model's, with a larger vocabulary), in one line
    rather than an index error inside the embedding; a model without a config is not checked.

    Raises:
        ValueError: naming the config field and the tokenizer's size.
    """
    config = getattr(model, "config", None)
    if config is not None and (misfit := tokenizer_misfit(config, tokenizer)) is not None:
        raise ValueError(f"the model's {misfit}: they do not belong together (give the tokenizer saved with the "
                         "model)")


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
    except (OSError, ValueError, TypeError, AttributeError, LookupError) as err:  # the last three: files of an
        # unexpected shape (a tokenizer.json without its "added_tokens" list)
        detail = f"no {err.args[0]!r} entry" if isinstance(err, KeyError) and err.args else error_line(err)
        raise CheckpointError(f"{directory}: no usable tokenizer files ({detail})") from None
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
        error = error_line(err)
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
    # A piece of whitespace alone ("\n" in a SentencePiece vocabulary) holds no capitals or accents.
    unreachable = [piece for piece in pieces if piece.strip() and not (plain and plain(piece))
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
