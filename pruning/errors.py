"""An error told in one line, inside a message of this package's own: the first line of what the error says, which
for a library's error is often a paragraph or a traceback of its own, and for some is nothing at all; and the name a
misspelt one was likely meant to be."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["error_line", "typed_error_line", "did_you_mean"]


def error_line(error: BaseException, default: str | None = None) -> str:
    """The first line of ``error``'s message, or ``default`` (its type's name) where the message says nothing."""
    return _first_line(error) or default or type(error).__name__


def typed_error_line(error: BaseException) -> str:
    """``"Type: first line"``, where what the error says means little without its type (an ``OSError`` against an
    ``ExportError`` of the same words); ``"Type"`` alone where the message says nothing."""
    line = _first_line(error)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else ""


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """``"did you mean 'x'?"`` for the choice closest to a misspelt ``word`` (other than ``word`` itself), else
    ``""`` (none is close enough)."""
    close = difflib.get_close_matches(str(word), sorted(set(choices) - {str(word)}), n=1)
    return f"did you mean {close[0]!r}?" if close else ""
