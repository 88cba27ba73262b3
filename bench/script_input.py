"""Input and output of the bench scripts: bad input is one line on stderr and exit status 2, checked before any work
where it can be; an output that cannot be written once the work is done (a full disk) is one line and status 1.

A script's ``main`` is wrapped in :func:`one_line_errors`; the library's own input errors (a missing model
directory, a bad config value, a malformed SQuAD file) and :class:`InputError` (a missing or malformed JSON file, a
path that cannot be written, a device this machine does not have) then print as ``SCRIPT: message``, and so does
a write of :func:`write_text` or :func:`write_bytes` that fails. Needs only the standard library, and for writing
``pruning.atomic`` (safetensors: the GPU scripts run on machines with nothing but torch and transformers).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # a bare checkout, nothing installed
    sys.path.insert(0, _ROOT)
from pruning.errors import error_line  # noqa: E402  (stdlib only)
from workflows.user_errors import output_path_problem, user_errors  # noqa: E402  (stdlib only)

__all__ = ["InputError", "one_line_errors", "read_json", "require", "check_output", "check_output_dir", "write_text",
           "write_bytes"]

class InputError(ValueError):
    """Bad input to a bench script; printed as one line, exit status 2."""


def one_line_errors(script: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Decorate a script's ``main``: an input error becomes ``SCRIPT: message`` on stderr and the return value 2."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return int(main(*args, **kwargs) or 0)
            except Exception as err:
                failed_write = _is_write_error(err)
                if not failed_write and not isinstance(err, user_errors(InputError)):
                    raise
                message = error_line(err)
                print(f"{script}: {message}", file=sys.stderr)
                return 1 if failed_write else 2

        return run

    return wrap


def _is_write_error(err: BaseException) -> bool:
    """Whether ``err`` is an output that could not be written once the work was done (looked up as
    :func:`user_errors` looks up its classes: only a script that wrote through ``pruning.atomic`` can raise it)."""
    atomic = sys.modules.get("pruning.atomic")
    return atomic is not None and isinstance(err, atomic.WriteError)


def read_json(path: str | Path, flag: str) -> Any:
    """The JSON value in ``path`` (named on the command line by ``flag``), or an :class:`InputError` naming both."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{flag} {path}: is a directory, not a file") from None
    except UnicodeDecodeError:
        raise InputError(f"{flag} {path}: not a UTF-8 text file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{flag} {path}: not valid JSON ({err})") from None


def require(value: Any, fields: dict[str, type | tuple[type, ...]], where: str) -> None:
    """Check that ``value`` is a JSON object with each of ``fields`` of its type; ``where`` names the file and the
    object for the error (``--results FILE: students[2]``)."""
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(value).__name__}")
    for name, kind in fields.items():
        if name not in value:
            raise InputError(f"{where}: no field {name!r}")
        if not isinstance(value[name], kind) or (isinstance(value[name], bool) and bool not in _as_tuple(kind)):
            names = " or ".join(k.__name__ for k in _as_tuple(kind))
            raise InputError(f"{where}: field {name!r} must be {names}, got {type(value[name]).__name__}")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def check_output(path: str | Path | None, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a directory there, a file above it, a file
    there that may not be replaced, or a directory it would go in (or be made in) that takes no new files."""
    if path is None:
        return
    problem = output_path_problem(path, directory=False, writable=True)
    if problem is not None:
        raise InputError(f"{flag} {path}: {problem}")


def check_output_dir(path: str | Path, flag: str) -> None:
    """Refuse, before any work, an output directory that cannot be made or written into: a file there or above it,
    or a directory that takes no new files."""
    problem = output_path_problem(path, directory=True, writable=True)
    if problem is not None:
        raise InputError(f"{flag} {path}: {problem}")


def write_text(path: str | Path, text: str) -> None:
    """Write an output file whole or not at all, making its directory first (:func:`write_bytes`)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write an output file whole or not at all, making its directory first: a write that fails (a full disk, a
    directory made read-only meanwhile) leaves the file there before as it was, and is one line naming the file,
    status 1, under :func:`one_line_errors`."""
    from pruning import atomic  # here, not at the top: reading a script's input needs only the standard library

    atomic.write_bytes(path, data)
