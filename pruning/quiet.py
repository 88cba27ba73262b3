"""Other libraries' output a command need not show: transformers' progress bars, and single log messages that say
nothing a user can act on (each site says why its message is left out)."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

__all__ = ["quiet_transformers", "leaving_out", "starting_with"]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' own progress bars ("Loading weights", "Writing model shards") while a model is read or
    written: a command's stderr holds its log and its own bars only. The bars come back as they were after."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def leaving_out(logger_name: str, unwanted: Callable[[str], bool]) -> Iterator[None]:
    """Drop the records of the logger ``logger_name`` whose message ``unwanted`` picks, while the block runs; every
    other record of it is handled as before."""
    target = logging.getLogger(logger_name)

    def keep(record: logging.LogRecord) -> bool:
        return not unwanted(record.getMessage())

    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def starting_with(start: str) -> Callable[[str], bool]:
    """For :func:`leaving_out`: picks the messages that start with ``start``."""
    return lambda message: message.startswith(start)
