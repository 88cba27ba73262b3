"""An error told in one line, inside a message of this package's own: the first line of what the error says, which
for a library's error is often a paragraph or a traceback of its own, and for some is nothing at all."""

from __future__ import annotations

__all__ = ["error_line", "typed_error_line"]


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
