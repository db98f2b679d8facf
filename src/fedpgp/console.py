"""Progress lines on the terminal while a command runs.

The library logs what it is doing to the ``fedpgp`` logger; the records that a user watching
the terminal wants (loading the backbone, the dataset, encoding images, each evaluated round)
carry ``extra=PROGRESS``. :func:`console` shows those, and every warning, on stderr; the other
INFO records (paths, timings) stay details for run.log.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

# ``extra=`` of a log record that the terminal shows.
PROGRESS = {"progress": True}


def _is_progress(record: logging.LogRecord) -> bool:
    """Whether ``record`` was logged with ``extra=PROGRESS``."""
    return bool(getattr(record, "progress", False))


class _ConsoleHandler(logging.Handler):
    """Progress records as their bare message, warnings and errors as ``LEVEL: message``;
    written through tqdm so that a progress bar on the same stream is redrawn below them
    instead of being torn apart."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(logging.INFO)
        self.stream = stream

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _is_progress(record)

    def emit(self, record: logging.LogRecord) -> None:
        # Imported by the first line, not by every `fedpgp --help` (about 60 ms).
        from tqdm import tqdm

        try:
            message = record.getMessage()
            if not _is_progress(record):
                message = f"{record.levelname}: {message}"
            tqdm.write(message, file=self.stream)
        except Exception:  # as logging.StreamHandler: a log line never stops the command
            self.handleError(record)


@contextlib.contextmanager
def attached(handler: logging.Handler) -> Iterator[None]:
    """``handler`` on the ``fedpgp`` logger for the duration, which logs INFO at least and stops
    propagating meanwhile (so that nothing reaches the terminal twice, and the root handler
    prints no INFO details)."""
    log = logging.getLogger("fedpgp")
    previous_level, previous_propagate = log.level, log.propagate
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)
        log.propagate = previous_propagate


@contextlib.contextmanager
def console() -> Iterator[None]:
    """Show the ``fedpgp`` logger's progress lines and warnings on stderr for the duration."""
    with attached(_ConsoleHandler(sys.stderr)):
        yield
