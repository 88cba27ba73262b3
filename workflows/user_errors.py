"""The errors of bad input: the command line and the bench scripts print each as one line, exit status 2.

Looked up among the modules already imported (an error can only come from a module that was), so that catching
them imports nothing: a bench script on a machine with only torch and transformers never pulls in Ray or MLflow.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

__all__ = ["USER_ERRORS", "user_errors", "output_path_problem", "utf8_name_problem", "write_problem"]

# (module, exception class) of every library error that means bad input.
USER_ERRORS = (
    ("pruning.config", "ConfigError"),
    ("pruning.checkpoint", "CheckpointError"),
    ("pruning.trainer", "TrainingDiverged"),
    ("pruning.resources", "ResourceError"),
    ("pruning.squad_data", "SquadFormatError"),
    ("pruning.squad", "NonFiniteLogits"),
    ("pruning.packing", "PackingError"),
    ("pruning.export", "ExportError"),
    ("pruning.inference", "RecordError"),
    ("workflows.record", "RecordError"),
    ("workflows.space", "SpaceError"),
    ("workflows.registry", "SelectionError"),
    ("workflows.version_files", "VersionError"),
    ("workflows.sweep", "RayUnavailable"),
    ("workflows.sweep", "ResumeError"),
    ("workflows.sweep", "StorageError"),
    ("workflows.warm_start", "WarmStartError"),
    ("workflows.retry", "OutageLimitError"),
    ("workflows.tracking", "TrackingStoreError"),
)


def user_errors(*own: type[BaseException]) -> tuple[type[BaseException], ...]:
    """``own`` (the caller's error classes) and those of :data:`USER_ERRORS` whose module is imported."""
    found = list(own)
    for module, name in USER_ERRORS:
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def output_path_problem(path: str | Path, directory: bool, writable: bool = False, staged: bool = True,
                        utf8: bool = False) -> str | None:
    """Why ``path`` cannot be made as an output (a directory when ``directory``, else a file), or None: a file
    where a directory goes, a directory where a file goes, or a file above it. With ``writable``, also one that
    cannot be written: a directory that takes no new files, or would be made in one (:func:`write_problem`); a file
    that may not be replaced, or whose directory (or the one it would be made in) takes no new files, where a file is
    written beside it and renamed over it (and SQLite writes a database's journal); a device or a pipe
    (``/dev/null``, ``/dev/stdout``), written into as it is, that may not be written. A file given as a symbolic
    link is checked where the link points, where it is written (the link stays). With ``writable`` and ``staged``
    (an output written under another name beside it first, then renamed: every one but a run's output directory), a
    name too long for the name it is first written under (:func:`pruning.atomic.sibling_name_problem`). With
    ``utf8`` (a directory a model's tokenizer is saved into), a name that is not UTF-8 under this process's locale
    (:func:`utf8_name_problem`). Checked before any work."""
    if utf8 and (problem := utf8_name_problem(path)) is not None:
        return problem
    path = Path(path)
    if not directory and path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists():
        if directory and not path.is_dir():
            return "exists and is not a directory"
        if not directory and path.is_dir():
            return "is a directory, not a file"
    else:
        ancestor = next((a for a in path.parents if a.exists()), None)
        if ancestor is not None and not ancestor.is_dir():
            return f"{ancestor} is a file, not a directory"
    if not writable:
        return None
    if staged and not (path.exists() and not path.is_file() and not directory):  # a device is written as it is
        from pruning.atomic import sibling_name_problem

        if (too_long := sibling_name_problem(path)) is not None:
            return too_long
    if directory:
        return write_problem(path)
    if path.exists() and not os.access(path, os.W_OK):
        return "cannot be written (no permission to write it)"
    if path.exists() and not path.is_file():  # a device or a pipe (/dev/null, /dev/stdout): written into, not replaced
        return None
    parent = path.absolute().parent
    if write_problem(parent) is None:
        return None
    nearest = next(p for p in (parent, *parent.parents) if p.exists())
    return f"cannot be {'written' if path.exists() else 'made'} ({nearest} takes no new files)"


def utf8_name_problem(path: str | Path) -> str | None:
    """Why the tokenizer library cannot save a model's files under ``path``, or None: it takes a path as text and
    writes it by its UTF-8 bytes, which are other bytes than the file's name where this process's locale is not
    UTF-8 (Python's UTF-8 mode off: ``PYTHONUTF8=0``, or a Latin-1 locale) and the name is not ASCII. Found only at
    the end of a run otherwise, when its model is saved."""
    name = os.fspath(path)
    try:
        same = name.encode("utf-8") == os.fsencode(name)
    except UnicodeEncodeError:  # bytes the locale could not decode, held as lone surrogates
        same = False
    if same:
        return None
    return (f"its name is not UTF-8 under this process's locale (file names are {sys.getfilesystemencoding()}), "
            "and the tokenizer library saves a model's files by UTF-8 names; run with a UTF-8 locale "
            "(LANG=C.UTF-8) or PYTHONUTF8=1, or give an ASCII name")


def write_problem(path: str | Path) -> str | None:
    """Why nothing can be written at the directory ``path``, or None: the nearest directory of it that exists (itself
    or the one its missing parents would be made in) takes no new files (no write permission, an immutable directory,
    a read-only filesystem, a kernel's filesystem such as ``/proc``). Checked before any work, by
    :func:`output_path_problem` with ``writable``."""
    path = Path(path).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or _takes_files(existing):
        return None
    return "cannot be written (no permission to write into it)" if existing == path else (
        f"cannot be made ({existing} takes no new files)")


def _takes_files(directory: Path) -> bool:
    """Whether a file can be made in ``directory``: its permissions allow it, and a file made there (and removed at
    once) says so. Permissions alone do not tell: root may write anywhere by them, yet ``/proc`` makes no file, and
    MLflow retries a SQLite database it cannot make there for a minute and a half before it says so."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        handle, name = tempfile.mkstemp(prefix=".fineprune-probe-", dir=directory)
    except OSError:
        return False
    os.close(handle)
    os.unlink(name)
    return True
