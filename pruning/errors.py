"""An error told in one line, inside a message of this package's own: the first line of what the error says, which
for a library's error is often a paragraph or a traceback of its own, and for some is nothing at all; and the name a
misspelt one (or a path that is not there) was likely meant to be."""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path
from typing import Iterable

__all__ = ["error_line", "typed_error_line", "did_you_mean", "name_hint", "path_hint", "interrupt_behind",
           "raise_interrupt_behind"]


def error_line(error: BaseException, default: str | None = None) -> str:
    """The first line of ``error``'s message, or ``default`` (its type's name) where the message says nothing."""
    return _first_line(error) or default or type(error).__name__


def typed_error_line(error: BaseException) -> str:
    """``"Type: first line"``, where what the error says means little without its type (an ``OSError`` against an
    ``ExportError`` of the same words); ``"Type"`` alone where the message says nothing."""
    line = _first_line(error)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or SIGTERM as the command line raises it) that ``error`` was raised from or
    while handling, or None.

    Most code lets a KeyboardInterrupt through as it is. A native module interrupted as it initialises (ONNX
    Runtime's, the first time a command imports it) raises ``ImportError: initialization failed`` from it instead,
    which a handler of ordinary errors would take for a model that cannot be loaded, and go on. Such a handler asks
    this first, and raises the interrupt.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def raise_interrupt_behind(error: BaseException) -> None:
    """Raise the KeyboardInterrupt behind ``error`` (:func:`interrupt_behind`), if there is one: the first line of a
    handler of ordinary errors that would otherwise go on."""
    stop = interrupt_behind(error)
    if stop is not None:
        raise stop from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else ""


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """``"did you mean 'x'?"`` for the choice closest to a misspelt ``word`` (other than ``word`` itself), else
    ``""`` (none is close enough)."""
    close = _closest(str(word), choices)
    return f"did you mean {close!r}?" if close else ""


def name_hint(word: object, choices: Iterable[str]) -> str:
    """:func:`did_you_mean` as a message's tail: ``"; did you mean 'x'?"``, else ``""``."""
    close = did_you_mean(word, choices)
    return f"; {close}" if close else ""


def path_hint(path: Path) -> str:
    """``"; did you mean 'dir/x'?"`` for a ``path`` that is not there, with the entry beside it whose name is
    closest to its name (``configs/dense_minilm.yml`` for ``configs/dense_minilm.yaml``), else ``""``."""
    try:
        names = [entry.name for entry in itertools.islice(path.parent.iterdir(), _LISTED)]
    except OSError:  # its directory is not there either, or cannot be listed
        return ""
    close = _closest(path.name, names)
    return f"; did you mean {str(path.with_name(close))!r}?" if close else ""


_LISTED = 10_000  # entries of a directory compared at most


def _closest(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, sorted(set(choices) - {word}), n=1)
    return close[0] if close else None
